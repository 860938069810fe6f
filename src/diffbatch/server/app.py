"""The FastAPI app factory: middlewares (auth, body limit), lifespan (engine loop, job runner), routes."""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..engine import Engine
from .config import ServerConfig
from .jobs import JobRunner
from .loop import EngineLoop
from .metrics import Metrics
from .routes import router
from .schemas import ApiError
from .state import ServerState
from .store import Store

log = logging.getLogger("diffbatch.server")
OPEN_PATHS = ("/health", "/ui")  # the UI page holds no data: its requests need the key


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """The server app. ``engine``: an already-loaded engine (tests); otherwise ``config.model`` is loaded."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = start_state(config, engine)
        app.state.server = state
        try:
            yield
        finally:
            stop_state(state)

    app = FastAPI(title="diffbatch", version=_version(), lifespan=lifespan)
    _add_error_handlers(app)
    _add_middlewares(app, config)
    app.include_router(router)
    return app


def start_state(config: ServerConfig, engine: Engine | None) -> ServerState:
    engine = engine or Engine.from_pretrained(config.model, device=config.device, dtype=config.dtype,
                                              max_batch_size=config.max_batch_size, backend=config.backend,
                                              lora_dir=config.lora_dir)
    loop = EngineLoop(engine, config.max_queue, config.batching, config.window_ms / 1000)
    store = Store(config.data_dir)
    jobs = JobRunner(store, loop, 2 * config.max_batch_size)
    loop.start()
    jobs.start()  # resumes unfinished jobs from the store
    log.info("diffbatch serving %s (batching: %s)", engine.model_name, config.batching)
    return ServerState(config, engine, loop, store, jobs, Metrics())


def stop_state(state: ServerState) -> None:
    """Graceful: stop admitting, let running images finish (or stay pending in the store), then close."""
    state.jobs.stop(timeout=1.0)
    state.loop.stop(state.config.drain_seconds)
    state.jobs.stop(timeout=5.0)  # record what finished while draining
    state.store.close()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return JSONResponse(ApiError(400, f"{param}: {first.get('msg')}", param or None).body(), status_code=400)


def _add_middlewares(app: FastAPI, config: ServerConfig) -> None:
    app.add_middleware(LimitsAndAuth, config=config)


class LimitsAndAuth:
    """API key and body-size checks, as a plain ASGI middleware: Starlette's ``@app.middleware("http")``
    (BaseHTTPMiddleware) hides the client's disconnect from the endpoint, which must see it to drop the
    images of a client that went away."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(Request(scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, request: Request) -> JSONResponse | None:
        config = self.config
        if config.api_key and request.url.path not in OPEN_PATHS and not _authorized(request, config.api_key):
            return JSONResponse(ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                         kind="authentication_error").body(),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is None and "chunked" in request.headers.get("transfer-encoding", ""):
            return JSONResponse(ApiError(411, "send a Content-Length (chunked bodies are not accepted)").body(),
                                status_code=411)
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return JSONResponse(ApiError(413, f"request body over {config.max_body_bytes} bytes").body(),
                                status_code=413)
        return None


def _authorized(request: Request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _version() -> str:
    return __version__
