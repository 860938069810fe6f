"""Job outputs: ``{k:05d}-{seed}.png`` written atomically with an A1111-style ``parameters`` chunk, and
one ``manifest.jsonl`` line per image, appended only once its PNG is in place. The line records the SHA-256
of the PNG's bytes (``file_sha256``: resume keeps only the file it describes) and the fingerprint of the init
image's content (``image_hash``: a changed init image is a changed job)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from PIL.PngImagePlugin import PngInfo

from ..numerics import DEFAULT as DEFAULT_NUMERICS
from ..numerics import KEY as NUMERICS_KEY
from ..result import Result
from ..spec import EDGES, GenerationSpec, Kind

MANIFEST = "manifest.jsonl"
NOTES = ("template", "sweep")  # what the job's authoring says of an image (io/prompts.py JobItem.notes)
PARAMETERS_KEY = "parameters"  # the text chunk AUTOMATIC1111 (and tools reading its files) use


def png_name(index: int, seed: int) -> str:
    return f"{index:05d}-{seed}.png"


def format_parameters(spec: GenerationSpec, sampler: str, model: str,
                      lora_hashes: tuple[tuple[str, str], ...] = (), model_hash: str = "", image_hash: str = "",
                      numerics: str = "", ti_hashes: tuple[tuple[str, str], ...] = ()) -> str:
    """AUTOMATIC1111's infotext: prompt, ``Negative prompt:`` line when there is one, then the settings: each
    field's own key (spec.EDGES) and, after the key they follow, the settings that are no field's own. LoRAs are
    written as A1111 does: ``<lora:NAME:WEIGHT>`` tags after the prompt and ``Lora hashes``; an init image's
    fingerprint as A1111's ``Init image hash`` (``--from`` refuses a file changed since); the numeric path as
    diffbatch's ``Numerics`` after the model, only off float32 on a CPU (numerics.py), which A1111 readers
    would not know."""
    after = _context(spec, sampler, model, model_hash, image_hash, numerics)
    settings: list[tuple[str, Any]] = []
    for name, key, text in _field_settings(spec):
        settings += [(key, text), *after.get(name, [])]
    for key, hashes in (("Lora hashes", lora_hashes), ("TI hashes", ti_hashes)):
        if hashes:
            settings.append((key, json.dumps(", ".join(f"{name}: {digest}" for name, digest in hashes))))
    tags = "".join(f" <lora:{name}:{_number(weight)}>" for name, weight in spec.loras)
    lines = [spec.prompt + tags]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in settings))
    return "\n".join(lines)


def _field_settings(spec: GenerationSpec) -> Iterator[tuple[str, str, str]]:
    """(field, key, value as written) of each field with a key of its own, in the table's (A1111's) order."""
    for name, edges in EDGES.items():
        if edges.key is not None and edges.key.when(spec):
            write = edges.key.write or FORMATS[edges.kind]
            yield name, edges.key.name, write(getattr(spec, name))


def _context(spec: GenerationSpec, sampler: str, model: str, model_hash: str, image_hash: str,
             numerics: str) -> dict[str, list[tuple[str, str]]]:
    """The settings that are no one field's own, by the field whose key they follow (A1111's order)."""
    model_keys = [*([("Model hash", model_hash)] if model_hash else []), ("Model", _quote(model))]
    if numerics and numerics != str(DEFAULT_NUMERICS):
        model_keys.append((NUMERICS_KEY, numerics))
    return {"num_inference_steps": [("Sampler", _quote(sampler))],
            "seed": [("Size", f"{spec.width}x{spec.height}"), *model_keys],
            "strength": _init_image(spec, image_hash)}


def _init_image(spec: GenerationSpec, image_hash: str) -> list[tuple[str, str]]:
    """diffbatch's own key for an init image file: ``--from`` finds it again (and checks its fingerprint)."""
    if not isinstance(spec.image, str | os.PathLike):
        return []
    return [("Init image", _quote(os.fspath(spec.image))), *([("Init image hash", image_hash)] if image_hash else [])]


def _quote(text: str) -> str:
    """As A1111 does: a value holding ``,`` ``:`` or a newline is JSON-quoted so the line still parses."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(value: float | int | None) -> str:
    """``7`` rather than ``7.0``, ``7.5`` as is."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


FORMATS: dict[Kind, Callable[[Any], str]] = {Kind.TEXT: str, Kind.INT: str, Kind.NUMBER: _number}


def manifest_record(index: int, spec: GenerationSpec, model: str, model_hash: str = "",
                    image_hash: str = "", numerics: str = "") -> dict[str, Any]:
    """What a manifest line says about an image (the writer adds the PNG's ``file_sha256`` and the run's
    ``seconds``); resume compares it, the fingerprints of the weights and of the init image's content
    included (a retrained model at the same path, another picture at the init image's path: another job), and
    the numeric path (bfloat16 here, float32 there: another image)."""
    record = {"index": index, "file": png_name(index, spec.seed), **spec.to_record(), "model": model}
    return {**record, **({"model_hash": model_hash} if model_hash else {}),
            **({"image_hash": image_hash} if image_hash else {}), **({"numerics": numerics} if numerics else {})}


def spec_image_hash(spec: GenerationSpec, image_hashes: Mapping[str, str]) -> str:
    """The fingerprint of ``spec``'s init image file in ``image_hashes`` (path -> hash); ``""`` without one."""
    image = spec.image
    return image_hashes.get(os.fspath(image), "") if isinstance(image, str | os.PathLike) else ""


def encode_png(result: Result, image_hash: str = "") -> bytes:
    """The one PNG encoder (CLI, server, batch jobs, Ray): the image with its ``parameters`` text chunk, the
    same bytes wherever it is encoded (``image_hash``: the init image file's fingerprint, where known)."""
    info = PngInfo()
    text = format_parameters(result.spec, result.sampler, result.model, result.lora_hashes, result.model_hash,
                             image_hash, result.numerics, result.ti_hashes)
    info.add_text(PARAMETERS_KEY, text)  # iTXt if needed
    buffer = io.BytesIO()
    result.image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(path: Path, result: Result) -> Path:
    """``encode_png(result)`` written atomically to ``path`` (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, encode_png(result))
    return path


TEMP_GLOB = ".*.tmp"  # write_bytes_atomic's temporary files (".NAME.xxxxxxxx.tmp"), as a glob


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Temporary file in the same folder, fsync, then ``os.replace``: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as file:  # "x": never clobber; mode follows the umask, unlike mkstemp's 0600
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX only; Windows cannot open a folder)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputWriter:
    """Writes finished images into ``out_dir`` (which must exist); safe to call from any thread.
    ``image_hashes`` (init image path -> fingerprint, io/images.py ``image_hashes``) are taken before the
    job runs, as resume compared them: a file changed during the run makes its images a changed job on the
    next run rather than images recorded with content they were not made from."""

    def __init__(self, out_dir: str | os.PathLike, model: str, model_hash: str = "",
                 image_hashes: Mapping[str, str] | None = None, notes: Mapping[int, dict[str, Any]] | None = None,
                 numerics: str = "") -> None:
        self.out_dir = Path(out_dir)
        self.model = model
        self.model_hash = model_hash
        self.numerics = numerics  # the job's numeric path (numerics.py), as resume compared it
        self.image_hashes = dict(image_hashes or {})
        self.notes = notes or {}  # job index -> its NOTES (a dynamic prompt's template, a sweep cell)
        self._lock = threading.Lock()
        self._manifest: IO[str] | None = None

    def write(self, index: int, result: Result) -> Path:
        """PNG first, manifest line after: every manifest line points at a complete file. The PNG names the
        job's model as the manifest does."""
        png = encode_png(dataclasses.replace(result, model=self.model, model_hash=self.model_hash),
                         self.image_hash(result.spec))
        return self.write_encoded(index, result.spec, png, result.seconds, result.numerics)

    def write_encoded(self, index: int, spec: GenerationSpec, png: bytes, seconds: float, numerics: str = "") -> Path:
        """As ``write``, for a PNG encoded elsewhere (a Ray worker) by ``encode_png``; ``numerics``: the path it was
        made on, recorded in its manifest line (else the job's)."""
        path = self.out_dir / png_name(index, spec.seed)
        write_bytes_atomic(path, png)
        numerics = numerics or self.numerics
        record = {**manifest_record(index, spec, self.model, self.model_hash, self.image_hash(spec), numerics),
                  **self.notes.get(index, {})}
        self._append({**record, "file_sha256": hashlib.sha256(png).hexdigest(), "seconds": round(seconds, 4)})
        return path

    def image_hash(self, spec: GenerationSpec) -> str:
        return spec_image_hash(spec, self.image_hashes)

    def _append(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self._manifest is None:
                self._manifest = open(self.out_dir / MANIFEST, "a", encoding="utf-8")
            self._manifest.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._manifest.flush()
            os.fsync(self._manifest.fileno())

    def close(self) -> None:
        with self._lock:
            if self._manifest is not None:
                self._manifest.close()
                self._manifest = None

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
