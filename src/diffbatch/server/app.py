"""The FastAPI app factory: middlewares (auth, body limit), lifespan (engine loop, job runner), routes."""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..engine import Engine
from ..errors import is_disk_full
from ..executors.local import EngineLoop
from ..quiet import quiet_loading
from .browsers import content_type_refusal, host_refusal, origin_refusal
from .config import ServerConfig
from .jobs import JobRunner
from .keys import KeyLimiter, load_keys
from .metrics import Metrics
from .retention import Janitor
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
        state = start_state(config, engine, limiter)
        app.state.server = state
        try:
            yield
        finally:
            stop_state(state)

    limiter = KeyLimiter(load_keys(config.api_keys)) if config.api_keys is not None else None
    app = FastAPI(title="diffbatch", version=_version(), lifespan=lifespan)
    _add_error_handlers(app)
    app.add_middleware(LimitsAndAuth, config=config, limiter=limiter)
    app.include_router(router)
    return app


def start_state(config: ServerConfig, engine: Engine | None, limiter: KeyLimiter | None = None) -> ServerState:
    quiet_loading()  # diffusers' and transformers' warnings quote the user's prompt (CLIP truncation): not in logs
    if config.replicas is not None:
        engine, loop = _replica_loop(config)
    else:
        engine = engine or Engine.from_pretrained(config.model, device=config.device, dtype=config.dtype,
                                                  max_batch_size=config.max_batch_size, backend=config.backend,
                                                  lora_dir=config.lora_dir, embeddings_dir=config.embeddings_dir)
        loop = EngineLoop(engine, config.max_queue, config.batching, config.window_ms / 1000)
    store = Store(config.data_dir)
    jobs = JobRunner(store, loop, 2 * config.max_batch_size)
    janitor = Janitor(store, config.retention)
    loop.start()
    jobs.start()  # resumes unfinished jobs from the store
    janitor.start()
    log.info("diffbatch serving %s (batching: %s)", engine.model_name, config.batching)
    return ServerState(config, engine, loop, store, jobs, Metrics(), janitor, limiter)


def _replica_loop(config: ServerConfig) -> tuple[Any, Any]:
    """``serve --ray``: this process resolves (the model's configuration, no weights) and the engine replicas
    of a Ray Serve deployment make the images (executors/serve.py)."""
    from ..executors.serve import ReplicaLoop, deploy
    from ..resolver import Resolver

    resolver = Resolver.for_model(config.model, config.lora_dir, backend=config.backend)
    return resolver, ReplicaLoop(resolver, deploy(config.replicas), config.max_queue)


def stop_state(state: ServerState) -> None:
    """Graceful: stop admitting, let running images finish (or stay pending in the store), then close."""
    state.janitor.stop()
    state.planning.shutdown(wait=True, cancel_futures=True)  # a job being planned is stored, or refused, first
    state.jobs.stop(timeout=1.0)
    state.loop.stop(state.config.drain_seconds)
    state.jobs.stop(timeout=5.0)  # record what finished while draining
    state.store.close()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (a body it cannot parse, too many multipart parts, an unknown route or
        method) in OpenAI's shape too."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind=kind).body(),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.OperationalError)
    async def storage_error(request: Request, exc: Exception) -> JSONResponse:
        if not is_disk_full(exc):
            raise exc
        log.error("disk full: %s", exc)
        return JSONResponse(ApiError(507, "the server's disk is full: this request's results could not be "
                                          "stored; retry later", kind="server_error").body(), status_code=507)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return JSONResponse(ApiError(400, f"{param}: {first.get('msg')}", param or None).body(), status_code=400)


class LimitsAndAuth:
    """Browser checks (Host, Origin, Content-Type: browsers.py), API key, per-key request rate and body size,
    as a plain ASGI middleware: Starlette's ``@app.middleware("http")`` (BaseHTTPMiddleware) hides the
    client's disconnect from the endpoint, which must see it to drop the images of a client that went away. A
    request by a listed key (``--api-keys``) carries its ``KeyLimit`` to the routes as
    ``request.state.key_limit``."""

    def __init__(self, app: ASGIApp, config: ServerConfig, limiter: KeyLimiter | None = None) -> None:
        self.app = app
        self.config = config
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(Request(scope))
            if refusal is not None:
                await JSONResponse(refusal.body(), status_code=refusal.status, headers=refusal.headers)(
                    scope, receive, send)
                return
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:
            pass  # the client went away (or timed out: connections.py) while sending its body: nobody to answer

    def _refusal(self, request: Request) -> ApiError | None:
        """The first check the request fails, in this order: a foreign page is refused whatever key it has."""
        headers, method, path = request.headers, request.method, request.url.path
        host, server = headers.get("host", ""), request.scope.get("server")
        needs_key = bool(self.config.api_key or self.limiter) and path not in OPEN_PATHS
        return (host_refusal(host, self.config, server[0] if server else None)
                or origin_refusal(method, headers.get("origin"), host)
                or (self._key_refusal(request) if needs_key else None)
                or self._length_refusal(request)
                or content_type_refusal(method, path, headers.get("content-type", ""), _has_body(request)))

    def _length_refusal(self, request: Request) -> ApiError | None:
        length = request.headers.get("content-length")
        if length is None and "chunked" in request.headers.get("transfer-encoding", ""):
            return ApiError(411, "send a Content-Length (chunked bodies are not accepted)")
        if length is not None and (not length.isdigit() or int(length) > self.config.max_body_bytes):
            return ApiError(413, f"request body over {self.config.max_body_bytes} bytes")
        return None

    def _key_refusal(self, request: Request) -> ApiError | None:
        token = _bearer(request)
        if self.config.api_key and _same(token, self.config.api_key):
            return None  # the operator's key: no per-key limits
        # every listed key compared in constant time, so the answer's timing tells nothing about a key
        matches = [limit for key, limit in (self.limiter.keys.items() if self.limiter else ()) if _same(token, key)]
        if not matches:
            return ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", kind="authentication_error",
                            headers={"WWW-Authenticate": "Bearer"})
        retry = self.limiter.admit_request(matches[0])
        if retry is not None:
            return ApiError(429, f"key {matches[0].name}: over {matches[0].rpm} requests per minute",
                            kind="rate_limit_error", headers={"Retry-After": str(max(1, math.ceil(retry)))})
        request.scope.setdefault("state", {})["key_limit"] = matches[0]
        return None


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length", "")
    return length.isdigit() and int(length) > 0


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _same(token: str, key: str) -> bool:
    return hmac.compare_digest(token.encode(), key.encode())


def _version() -> str:
    return __version__
