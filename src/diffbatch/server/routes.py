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
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from PIL import Image, UnidentifiedImageError

from ..engine import Result
from ..errors import DiffbatchError, InputError, SpecError, shown
from ..executors.base import Cancelled, QueueFull, ShuttingDown
from ..io.a1111 import differs_note, refusal
from ..io.dynamic import parse_dynamic
from ..io.images import as_rgb
from ..io.infotext import parse_infotext, png_parameters
from ..io.prompts import JobSource, plan_records
from ..io.sweep import parse_sweep
from ..io.writer import encode_png, save_png
from ..numbers import loads_json
from ..samplers import SAMPLERS
from ..seeds import JOB_BASE_SEED, job_seed, random_seed
from ..spec import GenerationSpec, parse_size, without_nulls
from .admission import Policy
from .keys import KeyLimit
from .metrics import CONTENT_TYPE
from .retention import delete_job
from .schemas import (
    BATCH_BODY,
    BODY_FIELDS,
    EDIT_BODY,
    EDIT_FIELDS,
    FORM_TYPES,
    PARAMETERS_BODY,
    ApiError,
    CancelRequest,
    ImageGenerationRequest,
)
from .state import ServerState

router = APIRouter()
SWEEP_HELP = ("a sweep axis, FIELD=V1,V2,... (repeatable, up to 3: X, Y, Z; as `generate --sweep`): every line once "
              "per cell, on its line's seed")
DYNAMIC_HELP = "each line's prompt a dynamic prompt: combinatorial (every {a|b} variant) or random:N"
FILE_ID = re.compile(r"[A-Za-z0-9_-]{1,80}")  # used with fullmatch


def state(request: Request) -> ServerState:
    return request.app.state.server


def _key_limit(request: Request) -> KeyLimit | None:
    """The listed key (``--api-keys``) that sent this request; None for the operator's key or a keyless server."""
    return request.scope.get("state", {}).get("key_limit")


def _tenant(request: Request) -> str | None:
    """Whose work this request may see and touch: a listed key's own (its tenant id), or everything (None)."""
    limit = _key_limit(request)
    return None if limit is None else limit.tenant


def _policy(s: ServerState) -> Policy:
    return Policy.of(s.config)


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
    page = page.replace("__BODY_FIELDS__", _script_json(list(BODY_FIELDS)))
    return HTMLResponse(page.replace("__MODEL__", _script_json(state(request).engine.model_name)))


def _script_json(value: Any) -> str:
    return json.dumps(value).replace("<", "\\u003c")  # never a "</script>" inside the page's script


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    s = state(request)
    live = getattr(s.loop, "live_facts", None)  # serve --ray: the replicas alive now (a GCS call: off the loop)
    replicas = None if live is None else await asyncio.get_running_loop().run_in_executor(None, live)
    text = s.metrics.render(s.loop.queue_length(), s.engine.stats, replicas)
    return PlainTextResponse(text, media_type=CONTENT_TYPE)


# Images ----------------------------------------------------------------------------------------------------
@router.post("/v1/images/generations")
async def generations(body: ImageGenerationRequest, request: Request) -> dict:
    s = state(request)
    fields = without_nulls(body.model_dump(include={"prompt", *BODY_FIELDS}))  # the spec's; the rest are OpenAI's
    specs = _specs(s, fields, body.model, body.n, body.size)
    return await _generate(request, specs, body.response_format, body.request_id)


@router.post("/v1/images/cancel")
async def cancel(body: CancelRequest, request: Request) -> dict:
    """Cancel the images of a generation sent with this ``request_id`` (waiting or running); it answers 409."""
    s = state(request)
    with s.running_lock:  # a request_id names images of this tenant only: another key cannot cancel them
        futures = list(s.running.get((_tenant(request), body.request_id), []))
    return {"request_id": body.request_id, "cancelled": s.loop.cancel(futures)}


@router.get("/v1/images/history")
async def history(request: Request, limit: int = 100) -> dict:
    """The images this server stored for URL responses, newest first, with their settings (the UI's history;
    it survives restarts: the SQLite store)."""
    base = str(request.base_url).rstrip("/")
    items = state(request).store.history(max(1, min(limit, 1000)), _tenant(request))
    return {"object": "list", "data": [{**item, "url": f"{base}/files/{item.pop('file_id')}.png"} for item in items]}


@router.post("/v1/images/parameters", openapi_extra=PARAMETERS_BODY)
async def parameters(request: Request) -> dict:
    """The settings in a PNG's parameters chunk (diffbatch's or AUTOMATIC1111's), as spec fields: what
    ``generate --from`` reads, for a client that lets users drop a PNG."""
    form = await request.form(max_files=1, max_fields=2)
    upload, ignore = form.get("image"), form.get("ignore") or ""
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "image: a PNG file is required", "image")
    if not isinstance(ignore, str):
        raise ApiError(400, "ignore: a comma-separated list of setting names", "ignore")
    data = await upload.read()
    try:  # decoding and parsing a large text chunk takes time: off the event loop, which serves everyone
        found = await asyncio.get_running_loop().run_in_executor(None, _infotext, data)
    except ValueError as exc:
        raise ApiError(400, f"image: {exc}", "image") from None
    found.ignore({key.strip() for key in ignore.split(",")})
    if found.refused:
        raise ApiError(400, refusal("image", found.refused, found.settings, http=True), "image")
    return {"fields": found.fields, "model": found.model, "sampler": found.default_sampler,
            "notes": [differs_note("image", found.a1111).removeprefix("diffbatch: ")] if found.a1111 else []}


def _infotext(data: bytes):  # noqa: ANN202 - io.infotext.Infotext
    return parse_infotext(png_parameters(io.BytesIO(data)))


@router.post("/v1/images/edits", openapi_extra=EDIT_BODY)
async def edits(request: Request) -> dict:
    s = state(request)
    form = await request.form(max_files=1, max_fields=len(EDIT_FIELDS) + 2)
    unknown = sorted(set(form) - set(EDIT_FIELDS) - {"image", "image[]"})
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}", unknown[0])
    upload = form.get("image") or form.get("image[]")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "image: an image file is required (multipart field 'image')", "image")
    data = await upload.read()
    image = await asyncio.get_running_loop().run_in_executor(None, _read_upload, data, s.config.max_image_pixels)
    fields = {k: _form_value(k, form[k]) for k in EDIT_FIELDS if k in form and k not in ("model", "n", "size")}
    response_format = fields.pop("response_format", "b64_json")
    fields.pop("user", None), fields.pop("quality", None)
    if response_format not in ("b64_json", "url"):
        raise ApiError(400, "response_format: must be b64_json or url", "response_format")
    n = _form_value("n", form.get("n", "1"))
    request_id = fields.pop("request_id", None)
    if request_id is not None and not FILE_ID.fullmatch(request_id):
        raise ApiError(400, "request_id: 1 to 80 of A-Z a-z 0-9 _ -", "request_id")
    specs = _specs(s, {**fields, "image": image}, form.get("model"), n, form.get("size"))
    return await _generate(request, specs, response_format, request_id)


def _specs(s, fields: dict[str, Any], model: str | None, n: int, size: str | None) -> list[GenerationSpec]:
    """Check what can be checked before resolving (model, count, text lengths) and build one spec per image
    (seeds ``seed + i``); ``_submit`` checks the resolved specs against the rest of the policy."""
    if model not in (None, "", s.engine.model_name):
        raise ApiError(400, f"model: {shown(model)} is not served here; available: {s.engine.model_name}", "model")
    if not isinstance(fields.get("prompt"), str):  # a form without one (the JSON routes' schema requires it)
        raise ApiError(400, "prompt: a text prompt is required", "prompt")
    policy = _policy(s)
    policy.check_count(n)
    policy.check_text(fields)
    if size not in (None, "", "auto"):
        fields["width"], fields["height"] = _parse_size(size)
    seed = fields.pop("seed", None)
    base = random_seed() if seed is None else seed
    try:
        return [GenerationSpec(**fields, seed=job_seed(base, i)) for i in range(n)]
    except DiffbatchError as exc:
        raise ApiError(400, str(exc), exc.field) from None


async def _generate(request: Request, specs: list[GenerationSpec], response_format: str,
                    request_id: str | None = None) -> dict:
    s = state(request)
    began = time.monotonic()
    futures = await asyncio.get_running_loop().run_in_executor(None, _submit, s, specs, _key_limit(request))
    running = (_tenant(request), request_id)
    if request_id:
        with s.running_lock:
            s.running.setdefault(running, []).extend(futures)
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
                kept = [f for f in s.running.pop(running, []) if f not in futures]
                if kept:
                    s.running[running] = kept
    s.metrics.observe_request(time.monotonic() - began, len(results))
    data = [await asyncio.get_running_loop().run_in_executor(None, _item, s, request, r, response_format)
            for r in results]
    return {"created": int(time.time()), "data": data}


DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there


async def _results_while_connected(request: Request, s: ServerState, futures: list) -> list[Result]:
    """The images' results; if the client goes away first, its images leave the queue, or the running batch
    at the next step (nobody will read them, and they would crowd out work somebody waits for)."""
    wrapped = [asyncio.wrap_future(f) for f in futures]
    waiting = asyncio.ensure_future(asyncio.gather(*wrapped))
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            dropped = s.loop.cancel(futures)
            s.metrics.cancelled.labels("disconnect").inc(dropped)
            for future in (waiting, *wrapped):  # what they end with is read here: no "never retrieved" in the log
                future.add_done_callback(_retrieved)
            waiting.cancel()
            raise ApiError(499, "the client disconnected", kind="cancelled")


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _submit(s, specs: list[GenerationSpec], limit: KeyLimit | None = None) -> list:
    """Check the resolved images against the policy, then queue them (all or none); a listed key's images
    count against its ``images`` limit until each finishes, fails or is cancelled."""
    specs = [_resolved(s, spec) for spec in specs]
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


def _resolved(s, spec: GenerationSpec) -> GenerationSpec:
    try:
        resolved = s.engine.resolve(spec)
    except DiffbatchError as exc:
        raise ApiError(400, str(exc), exc.field) from None
    size_from = "image" if spec.is_img2img and spec.width is None else "size"  # an edit's size: its upload's
    _policy(s).check_resolved(resolved, size_from=size_from)
    return resolved


def _queue(s, specs: list[GenerationSpec]) -> list:
    try:
        return s.loop.submit(specs)
    except QueueFull as exc:
        raise ApiError(429, str(exc), kind="rate_limit_error", headers={"Retry-After": "1"}) from None
    except ShuttingDown as exc:
        raise ApiError(503, str(exc), kind="server_error", headers={"Retry-After": "5"}) from None


def _item(s, request: Request, result: Result, response_format: str) -> dict[str, Any]:
    settings = {**result.spec.to_record(), "sampler": result.sampler, "model": result.model}  # an extension
    if response_format == "b64_json":
        return {"b64_json": base64.b64encode(encode_png(result)).decode(), "seed": result.spec.seed,
                "settings": settings}
    file_id = secrets.token_hex(16)
    path = save_png(s.store.layout.url_file(file_id), result)
    s.store.add_file(path, file_id, settings, owner=_tenant(request))
    return {"url": f"{str(request.base_url).rstrip('/')}/files/{file_id}.png", "seed": result.spec.seed,
            "settings": settings}


# Batch jobs ------------------------------------------------------------------------------------------------
@router.post("/v1/batches", openapi_extra=BATCH_BODY)
async def create_batch(request: Request, sweep: Annotated[list[str] | None, Query(description=SWEEP_HELP)] = None,
                       dynamic: Annotated[str | None, Query(description=DYNAMIC_HELP)] = None) -> dict:
    """A batch job: one JSON object per line. ``sweep`` (repeatable, up to 3: FIELD=V1,V2,...) makes every line
    once per cell, each cell on its line's seed; ``dynamic`` (combinatorial or random:N) expands each prompt's
    {a|b} variants. The results lines carry each image's ``sweep`` cell and dynamic ``template``."""
    s = state(request)
    source = _authoring(s, sweep or [], dynamic)
    body = await request.body()
    owner = _tenant(request)
    job_id = await asyncio.get_running_loop().run_in_executor(s.planning, _plan_and_store, s, body, source, owner)
    s.jobs.wake()
    return s.store.job(job_id)


def _plan_and_store(s, body: bytes, source: JobSource, owner: str | None) -> str:
    """On the planning thread: the job planned and written to the store; its id."""
    return s.store.create_job(_batch_records(s, body, source), s.engine.model_hash, owner=owner)


def _authoring(s, sweep: list[str], dynamic: str | None) -> JobSource:
    """How a batch's lines are planned: the sweep's cells and dynamic prompts, within the server's line limit."""
    try:
        plan, expand = parse_sweep(sweep), (None if dynamic is None else parse_dynamic(dynamic))
    except SpecError as exc:
        raise ApiError(400, str(exc).replace("--sweep", "sweep").replace("--dynamic", "dynamic"),
                       exc.field) from None
    return JobSource(base_seed=JOB_BASE_SEED, sweep=plan, dynamic=expand, limit=s.config.max_batch_lines,
                     over_limit="this server's limit on a batch's images", max_prompt_chars=s.config.max_prompt_chars,
                     max_text_chars=s.config.max_job_text_bytes)  # characters <= UTF-8 bytes: checked again after


def _batch_records(s, body: bytes, source: JobSource) -> list[dict[str, Any]]:
    """Validate every line against the policy (errors name it), plan the job (sweep cells, dynamic prompts),
    fix every seed now (a resumed job makes the same images), and keep the job within its cost budget."""
    policy = _policy(s)
    try:
        items = plan_records(_batch_lines(s, body, policy), source)
    except DiffbatchError as exc:
        raise ApiError(400, str(exc).replace("--sweep", "sweep"), exc.field) from None
    records, specs = [], []
    for item in items:
        policy.check_text(item.spec.to_record(), f"{item.where}: ")  # an expanded prompt is checked as a line's
        try:
            spec = s.engine.resolve(item.spec, seed=item.spec.seed)
        except DiffbatchError as exc:
            message = str(exc)
            raise ApiError(400, message if message.startswith(item.where) else f"{item.where}: {message}",
                           exc.field) from None
        policy.check_resolved(spec, f"{item.where}: ")
        specs.append(spec)
        records.append({**spec.to_record(), **item.notes})
    policy.check_job(specs)
    return records


def _batch_lines(s, body: bytes, policy: Policy) -> list[tuple[dict[str, Any], str]]:
    """The batch's JSON objects, each with its line (``line N``), checked before planning."""
    lines = []
    for number, line in enumerate(body.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            record = loads_json(line)
        except RecursionError:
            raise ApiError(400, f"{where}: JSON nested too deeply", "body") from None
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"{where}: malformed JSON ({exc.msg})", "body") from None
        except ValueError as exc:  # an integer too long to read (numbers.py)
            raise ApiError(400, f"{where}: {exc}", "body") from None
        if isinstance(record, dict) and "image" in record:
            raise ApiError(400, f"{where}: 'image' is not accepted in batch lines; use /v1/images/edits", "image")
        if len(lines) >= s.config.max_batch_lines:
            raise ApiError(400, f"{where}: the batch holds more than {s.config.max_batch_lines} lines, this "
                                "server's limit", "body")
        if not isinstance(record, dict):
            raise ApiError(400, f"{where}: expected a JSON object, got {type(record).__name__}", "body")
        policy.check_text(record, f"{where}: ")
        lines.append((record, where))
    if not lines:
        raise ApiError(400, "the batch body holds no JSON lines", "body")
    return lines


@router.get("/v1/batches/{job_id}")
async def get_batch(job_id: str, request: Request) -> dict:
    return _job_or_404(request, job_id)


@router.get("/v1/batches/{job_id}/results")
async def batch_results(job_id: str, request: Request) -> Response:
    s = state(request)
    _job_or_404(request, job_id)
    base = str(request.base_url).rstrip("/")
    lines = [json.dumps({**{k: v for k, v in row.items() if k != "file_id"},
                         "url": f"{base}/files/{row['file_id']}.png"}) for row in s.store.results(job_id)]
    return Response("".join(line + "\n" for line in lines), media_type="application/jsonl")


@router.post("/v1/batches/{job_id}/cancel")
async def cancel_batch(job_id: str, request: Request) -> dict:
    """Cancel a batch job: its pending lines never run, and its images in the engine stop before the next step."""
    s = state(request)
    _job_or_404(request, job_id)
    s.store.cancel(job_id)  # first: the images aborted next are not recorded as failures
    s.jobs.cancel_job(job_id)
    return _job_or_404(request, job_id)  # a DELETE may have taken it meanwhile: then it is gone


@router.delete("/v1/batches/{job_id}")
async def delete_batch(job_id: str, request: Request) -> dict:
    """Delete a batch job and its images (its images in the engine stop before the next step)."""
    s = state(request)
    _job_or_404(request, job_id)
    deleted = await asyncio.get_running_loop().run_in_executor(None, delete_job, s.store, job_id)
    s.jobs.cancel_job(job_id)
    if not deleted:  # another DELETE of the same job took it first: one answer says deleted
        raise ApiError(404, f"no batch {job_id!r}", "batch_id", kind="not_found_error")
    return {"id": job_id, "object": "batch.deleted", "deleted": True}


def _job_or_404(request: Request, job_id: str) -> dict:
    """The job, if it exists and this request's key may see it (another tenant's job is answered as absent)."""
    job = state(request).store.job(job_id, _tenant(request)) if FILE_ID.fullmatch(job_id) else None
    if job is None:
        raise ApiError(404, f"no batch {job_id!r}", "batch_id", kind="not_found_error")
    return job


# Files -----------------------------------------------------------------------------------------------------
@router.get("/files/{name}")
async def files(name: str, request: Request) -> FileResponse:
    stem = name.removesuffix(".png")
    visible = name.endswith(".png") and FILE_ID.fullmatch(stem)
    path = state(request).store.file_path(stem, _tenant(request)) if visible else None
    if path is None or not path.is_file():
        raise ApiError(404, f"no file {name!r}", "name", kind="not_found_error")
    return FileResponse(path, media_type="image/png")


# Helpers ---------------------------------------------------------------------------------------------------
def _read_upload(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise ApiError(400, f"image: {image.width}x{image.height} is over {max_pixels} pixels", "image")
            return as_rgb(image, "image")  # as the CLI reads a file: EXIF orientation, no silent alpha drop
    except InputError as exc:
        raise ApiError(400, str(exc), "image") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise ApiError(400, "image: not a readable image file", "image") from None


def _form_value(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        raise ApiError(400, f"{key}: must be a text field", key)
    convert = FORM_TYPES.get(key, str)
    try:
        return convert(value)
    except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError
        what = "a JSON object of LoRA names and weights" if convert is json.loads else "a number"
        raise ApiError(400, f"{key}: {shown(value)} is not {what}", key) from None


def _parse_size(size: str) -> tuple[int, int]:
    try:
        return parse_size(size)
    except SpecError as exc:
        raise ApiError(400, f"size: {exc}", "size") from None
