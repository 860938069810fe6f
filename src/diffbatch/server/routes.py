"""HTTP routes. Handlers validate, submit to the engine loop, and await: no model code runs here."""

from __future__ import annotations

import asyncio
import base64
import importlib.resources
import io
import json
import re
import secrets
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from PIL import Image, UnidentifiedImageError

from ..engine import Result
from ..errors import DiffbatchError, SpecError
from ..io.infotext import parse_infotext, png_parameters
from ..io.writer import encode_png, save_png
from ..samplers import SAMPLERS
from ..spec import GenerationSpec, parse_size, spec_from_record
from .keys import KeyLimit
from .loop import Cancelled, QueueFull, ShuttingDown
from .metrics import CONTENT_TYPE
from .retention import delete_job
from .schemas import ApiError, CancelRequest, ImageGenerationRequest
from .state import ServerState
from .store import URL_FILES

router = APIRouter()
FILE_ID = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
EDIT_FIELDS = ("prompt", "model", "n", "size", "response_format", "user", "strength", "seed", "negative_prompt",
               "num_inference_steps", "guidance_scale", "guidance_rescale", "scheduler", "quality",
               "variation_seed", "variation_strength", "request_id", "loras")


def state(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/health")
async def health(request: Request) -> dict:
    return {"status": "ok", "model": state(request).engine.model_name}


@router.get("/v1/models")
async def models(request: Request) -> dict:
    name = state(request).engine.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "diffbatch"}]}


@router.get("/ui")
async def ui(request: Request) -> HTMLResponse:
    """The browser UI: a static page that calls this API with the user's key (server/ui.html)."""
    page = importlib.resources.files(__package__).joinpath("ui.html").read_text(encoding="utf-8")
    page = page.replace("__SAMPLERS__", _script_json(list(SAMPLERS)))
    return HTMLResponse(page.replace("__MODEL__", _script_json(state(request).engine.model_name)))


def _script_json(value: Any) -> str:
    return json.dumps(value).replace("<", "\\u003c")  # never a "</script>" inside the page's script


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    s = state(request)
    text = s.metrics.render(s.loop.queue_length(), s.engine.stats)
    return PlainTextResponse(text, media_type=CONTENT_TYPE)


# Images ----------------------------------------------------------------------------------------------------
@router.post("/v1/images/generations")
async def generations(body: ImageGenerationRequest, request: Request) -> dict:
    s = state(request)
    fields = body.model_dump(exclude={"model", "n", "size", "response_format", "user", "quality", "style",
                                      "request_id"})
    specs = _specs(s, fields, body.model, body.n, body.size)
    return await _generate(request, specs, body.response_format, body.request_id)


@router.post("/v1/images/cancel")
async def cancel(body: CancelRequest, request: Request) -> dict:
    """Cancel the images of a generation sent with this ``request_id`` (waiting or running); it answers 409."""
    s = state(request)
    with s.running_lock:
        futures = list(s.running.get(body.request_id, []))
    return {"request_id": body.request_id, "cancelled": s.loop.cancel(futures)}


@router.get("/v1/images/history")
async def history(request: Request, limit: int = 100) -> dict:
    """The images this server stored for URL responses, newest first, with their settings (the UI's history;
    it survives restarts: the SQLite store)."""
    base = str(request.base_url).rstrip("/")
    items = state(request).store.history(max(1, min(limit, 1000)))
    return {"object": "list", "data": [{**item, "url": f"{base}/files/{item.pop('file_id')}.png"} for item in items]}


@router.post("/v1/images/parameters")
async def parameters(request: Request) -> dict:
    """The settings in a PNG's parameters chunk (diffbatch's or AUTOMATIC1111's), as spec fields: what
    ``generate --from`` reads, for a client that lets users drop a PNG."""
    form = await request.form(max_files=1, max_fields=1)
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "image: a PNG file is required", "image")
    try:
        found = parse_infotext(png_parameters(io.BytesIO(await upload.read())))
    except ValueError as exc:
        raise ApiError(400, f"image: {exc}", "image") from None
    return {"fields": found.fields, "model": found.model, "sampler": found.default_sampler}


@router.post("/v1/images/edits")
async def edits(request: Request) -> dict:
    s = state(request)
    form = await request.form(max_files=1, max_fields=len(EDIT_FIELDS) + 2)
    unknown = sorted(set(form) - set(EDIT_FIELDS) - {"image", "image[]"})
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}", unknown[0])
    upload = form.get("image") or form.get("image[]")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "image: an image file is required (multipart field 'image')", "image")
    image = _read_upload(await upload.read(), s.config.max_image_pixels)
    fields = {k: _form_value(k, form[k]) for k in EDIT_FIELDS if k in form and k not in ("model", "n", "size")}
    response_format = fields.pop("response_format", "b64_json")
    fields.pop("user", None), fields.pop("quality", None)
    if response_format not in ("b64_json", "url"):
        raise ApiError(400, "response_format: must be b64_json or url", "response_format")
    n = _form_value("n", form.get("n", "1"))
    request_id = fields.pop("request_id", None)
    if request_id is not None and not FILE_ID.match(request_id):
        raise ApiError(400, "request_id: 1 to 80 of A-Z a-z 0-9 _ -", "request_id")
    specs = _specs(s, {**fields, "image": image}, form.get("model"), n, form.get("size"))
    return await _generate(request, specs, response_format, request_id)


def _specs(s, fields: dict[str, Any], model: str | None, n: int, size: str | None) -> list[GenerationSpec]:
    """Check the request against the server's limits and build one spec per image (seeds ``seed + i``)."""
    config = s.config
    if model not in (None, "", s.engine.model_name):
        raise ApiError(400, f"model: {model!r} is not served here; available: {s.engine.model_name}", "model")
    _bound("n", n, 1, config.max_n)
    _bound("num_inference_steps", fields.get("num_inference_steps"), 1, config.max_steps)
    if len(fields.get("prompt") or "") > config.max_prompt_chars:
        raise ApiError(400, f"prompt: longer than {config.max_prompt_chars} characters", "prompt")
    if size not in (None, "", "auto"):
        fields["width"], fields["height"] = _parse_size(size, config.max_side)
    seed = fields.pop("seed", None)
    base = secrets.randbits(31) if seed is None else seed
    try:
        return [GenerationSpec(**fields, seed=base + i) for i in range(n)]
    except DiffbatchError as exc:
        raise ApiError(400, str(exc), exc.field) from None


async def _generate(request: Request, specs: list[GenerationSpec], response_format: str,
                    request_id: str | None = None) -> dict:
    s = state(request)
    began = time.monotonic()
    limit = request.scope.get("state", {}).get("key_limit")
    futures = await asyncio.get_running_loop().run_in_executor(None, _submit, s, specs, limit)
    if request_id:
        with s.running_lock:
            s.running.setdefault(request_id, []).extend(futures)
    try:
        results = await _results_while_connected(request, s, futures)
    except Cancelled as exc:
        s.metrics.cancelled.labels("request").inc(len(futures))
        raise ApiError(409, f"request_id {request_id!r}: {exc}", "request_id", kind="cancelled") from None
    except DiffbatchError as exc:  # found when admitted (a LoRA that does not load into this model)
        raise ApiError(400, str(exc), exc.field) from None
    finally:
        if request_id:
            with s.running_lock:
                kept = [f for f in s.running.pop(request_id, []) if f not in futures]
                if kept:
                    s.running[request_id] = kept
    s.metrics.observe_request(time.monotonic() - began, len(results))
    data = [await asyncio.get_running_loop().run_in_executor(None, _item, s, request, r, response_format)
            for r in results]
    return {"created": int(time.time()), "data": data}


DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there


async def _results_while_connected(request: Request, s: ServerState, futures: list) -> list[Result]:
    """The images' results; if the client goes away first, its images leave the queue, or the running batch
    at the next step (nobody will read them, and they would crowd out work somebody waits for)."""
    waiting = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            dropped = s.loop.cancel(futures)
            s.metrics.cancelled.labels("disconnect").inc(dropped)
            waiting.cancel()
            raise ApiError(499, "the client disconnected", kind="cancelled")


def _submit(s, specs: list[GenerationSpec], limit: KeyLimit | None = None) -> list:
    """Queue the images (all or none); a listed key's images count against its ``images`` limit until each
    finishes, fails or is cancelled."""
    if limit is None:
        return _queue(s, specs)
    held = s.limiter.reserve_images(limit, len(specs))
    if held is not None:
        raise ApiError(429, f"key {limit.name}: {held} images in flight; its limit is {limit.images}",
                       kind="rate_limit_error", headers={"Retry-After": "1"})
    try:
        futures = _queue(s, specs)
    except BaseException:
        s.limiter.release_images(limit, len(specs))
        raise
    for future in futures:
        future.add_done_callback(lambda _, limit=limit: s.limiter.release_images(limit))
    return futures


def _queue(s, specs: list[GenerationSpec]) -> list:
    try:
        return s.loop.submit(specs)
    except QueueFull as exc:
        raise ApiError(429, str(exc), kind="rate_limit_error", headers={"Retry-After": "1"}) from None
    except ShuttingDown as exc:
        raise ApiError(503, str(exc), kind="server_error", headers={"Retry-After": "5"}) from None
    except DiffbatchError as exc:
        raise ApiError(400, str(exc), exc.field) from None


def _item(s, request: Request, result: Result, response_format: str) -> dict[str, Any]:
    settings = {**result.spec.to_record(), "sampler": result.sampler, "model": result.model}  # an extension
    if response_format == "b64_json":
        return {"b64_json": base64.b64encode(encode_png(result)).decode(), "seed": result.spec.seed,
                "settings": settings}
    file_id = secrets.token_hex(16)
    path = save_png(s.store.data_dir / URL_FILES / f"{file_id}.png", result)
    s.store.add_file(path, file_id, settings)
    return {"url": f"{str(request.base_url).rstrip('/')}/files/{file_id}.png", "seed": result.spec.seed,
            "settings": settings}


# Batch jobs ------------------------------------------------------------------------------------------------
@router.post("/v1/batches")
async def create_batch(request: Request) -> dict:
    s = state(request)
    lines = (await request.body()).decode("utf-8", errors="replace").splitlines()
    records = await asyncio.get_running_loop().run_in_executor(None, _batch_records, s, lines)
    job_id = s.store.create_job(records, s.engine.model_hash)
    s.jobs.wake()
    return s.store.job(job_id)


def _batch_records(s, lines: list[str]) -> list[dict[str, Any]]:
    """Validate every line (errors name it), fix every seed now: a resumed job makes the same images."""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"{where}: malformed JSON ({exc.msg})", "body") from None
        if isinstance(record, dict) and "image" in record:
            raise ApiError(400, f"{where}: 'image' is not accepted in batch lines; use /v1/images/edits", "image")
        try:
            spec = s.engine.resolve(spec_from_record(record, where), seed=len(records))
        except DiffbatchError as exc:
            raise ApiError(400, str(exc), exc.field) from None
        records.append(spec.to_record())
    if not records:
        raise ApiError(400, "the batch body holds no JSON lines", "body")
    if len(records) > s.config.max_batch_lines:
        raise ApiError(400, f"the batch holds {len(records)} lines; the limit is {s.config.max_batch_lines}", "body")
    return records


@router.get("/v1/batches/{job_id}")
async def get_batch(job_id: str, request: Request) -> dict:
    return _job_or_404(state(request), job_id)


@router.get("/v1/batches/{job_id}/results")
async def batch_results(job_id: str, request: Request) -> Response:
    s = state(request)
    _job_or_404(s, job_id)
    base = str(request.base_url).rstrip("/")
    lines = [json.dumps({**{k: v for k, v in row.items() if k != "file_id"},
                         "url": f"{base}/files/{row['file_id']}.png"}) for row in s.store.results(job_id)]
    return Response("".join(line + "\n" for line in lines), media_type="application/jsonl")


@router.post("/v1/batches/{job_id}/cancel")
async def cancel_batch(job_id: str, request: Request) -> dict:
    s = state(request)
    _job_or_404(s, job_id)
    s.store.cancel(job_id)
    return s.store.job(job_id)


@router.delete("/v1/batches/{job_id}")
async def delete_batch(job_id: str, request: Request) -> dict:
    """Delete a batch job and its images (cancelled first if it is still running)."""
    s = state(request)
    _job_or_404(s, job_id)
    await asyncio.get_running_loop().run_in_executor(None, delete_job, s.store, job_id)
    return {"id": job_id, "object": "batch.deleted", "deleted": True}


def _job_or_404(s, job_id: str) -> dict:
    job = s.store.job(job_id) if FILE_ID.match(job_id) else None
    if job is None:
        raise ApiError(404, f"no batch {job_id!r}", "batch_id", kind="not_found_error")
    return job


# Files -----------------------------------------------------------------------------------------------------
@router.get("/files/{name}")
async def files(name: str, request: Request) -> FileResponse:
    stem = name.removesuffix(".png")
    path = state(request).store.file_path(stem) if name.endswith(".png") and FILE_ID.match(stem) else None
    if path is None or not path.is_file():
        raise ApiError(404, f"no file {name!r}", "name", kind="not_found_error")
    return FileResponse(path, media_type="image/png")


# Helpers ---------------------------------------------------------------------------------------------------
def _read_upload(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise ApiError(400, f"image: {image.width}x{image.height} is over {max_pixels} pixels", "image")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ApiError(400, "image: not a readable image file", "image") from None


def _form_value(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        raise ApiError(400, f"{key}: must be a text field", key)
    converters = {"n": int, "seed": int, "num_inference_steps": int, "strength": float, "guidance_scale": float,
                  "guidance_rescale": float, "variation_seed": int, "variation_strength": float, "loras": json.loads}
    try:
        return converters.get(key, str)(value)
    except ValueError:
        raise ApiError(400, f"{key}: {value!r} is not a number", key) from None


def _parse_size(size: str, max_side: int) -> tuple[int, int]:
    try:
        width, height = parse_size(size)
    except SpecError as exc:
        raise ApiError(400, f"size: {exc}", "size") from None
    _bound("size", max(width, height), 8, max_side)
    return width, height


def _bound(name: str, value: int | None, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        raise ApiError(400, f"{name}: {value} is out of range [{low}, {high}]", name)
