"""Reading a job: prompts from a text file, a JSON-lines file, stdin or ``--prompt`` flags, as specs.

Seed convention (DESIGN.md): image k of the job (0-based, in order) gets ``base_seed + k`` unless its
line sets ``seed``, so any image can be regenerated alone.
"""

from __future__ import annotations

import codecs
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..errors import InputError, SpecError
from ..spec import GenerationSpec, spec_from_record
from .images import list_images

JSONL_SUFFIXES = (".jsonl", ".ndjson")
STDIN = "-"
# Text a prompts file may be in: UTF-8 (with or without a byte-order mark), or UTF-16/32 with one (what
# Windows editors and PowerShell write). UTF-32's marks come first: UTF-32-LE's begins with UTF-16-LE's.
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


@dataclass(frozen=True)
class JobSource:
    """Where a job's prompts come from, and what applies to every image unless a line says otherwise."""

    prompts_file: str | None = None  # a text or .jsonl file, or "-" for stdin
    prompts: tuple[str, ...] = ()  # --prompt flags (instead of a file)
    image: str | None = None  # --image: one init image for all prompts, or a folder paired with prompts
    images_per_prompt: int = 1  # -n
    base_seed: int = 0  # --seed: image k gets base_seed + k
    defaults: dict[str, Any] = field(default_factory=dict)  # spec fields from flags; a jsonl line overrides


@dataclass(frozen=True)
class JobItem:
    """One image of the job: its position, its spec (seed assigned) and the input it came from."""

    index: int
    spec: GenerationSpec
    where: str  # e.g. "prompts.jsonl:3" or "--prompt #1": named in any later error about this image


@dataclass(frozen=True)
class _PromptLine:
    fields: dict[str, Any]  # spec fields the input line sets
    where: str


def read_job(source: JobSource, stdin: TextIO | None = None) -> list[JobItem]:
    """Every image of the job, in order; raises ``InputError``/``SpecError`` naming the input at fault."""
    if source.images_per_prompt < 1:
        raise SpecError(f"-n {source.images_per_prompt} is invalid: must be an integer >= 1")
    lines = _read_lines(source, sys.stdin if stdin is None else stdin)
    if source.image is not None:
        lines = _pair_images(lines, list_images(source.image), source.image)
    return _expand(lines, source)


def _read_lines(source: JobSource, stdin: TextIO) -> list[_PromptLine]:
    if source.prompts_file is not None and source.prompts:
        raise InputError("give a PROMPTS file or --prompt, not both")
    if source.prompts:
        return [_PromptLine({"prompt": p}, f"--prompt #{i}") for i, p in enumerate(source.prompts, 1)]
    if source.prompts_file is None:
        raise InputError("no prompts: give a PROMPTS file (text or .jsonl), - for stdin, or --prompt TEXT")
    name, text = _read_text(source.prompts_file, stdin)
    lines = _parse_jsonl(name, text) if _is_jsonl(source.prompts_file, text) else _parse_text(name, text)
    if not lines:
        raise InputError(f"{name}: no prompts in it (empty, or only blank and # lines)")
    return lines


def _read_text(path: str, stdin: TextIO) -> tuple[str, str]:
    if path == STDIN:
        buffer = getattr(stdin, "buffer", None)  # a real stdin: its bytes, decoded as a file's are
        return "<stdin>", decode_text(buffer.read(), "<stdin>") if buffer else stdin.read().removeprefix("\ufeff")
    file = Path(path)
    if not file.exists():
        raise InputError(f"{path}: prompts file does not exist")
    if file.is_dir():
        raise InputError(f"{path}: prompts file is a directory")
    try:
        return path, decode_text(file.read_bytes(), path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read prompts file: {exc.strerror}") from None


def decode_text(data: bytes, name: str) -> str:
    """The text of a prompts file, its byte-order mark dropped; any other encoding refused in one line (a
    wrong guess would change the prompts silently)."""
    for mark, codec in BYTE_ORDER_MARKS:
        if data.startswith(mark):
            try:
                return data.decode(codec).removeprefix("\ufeff")
            except UnicodeDecodeError as exc:
                raise InputError(f"{name}: starts with a {codec.upper().removesuffix('-SIG')} byte-order mark but "
                                 f"is not {codec.removesuffix('-sig').upper()} text (byte {exc.start})") from None
    if b"\x00" in data:
        raise InputError(f"{name}: holds NUL bytes (byte {data.index(0)}): UTF-16 or UTF-32 text without a "
                         "byte-order mark, or not a text file; save it as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name}: not UTF-8 text (byte {exc.start}; another encoding, such as Latin-1 or "
                         "Windows-1252?); save it as UTF-8") from None


def _is_jsonl(path: str, text: str) -> bool:
    """Files by suffix; stdin is JSON lines when its first non-blank line starts with ``{``."""
    if path != STDIN:
        return Path(path).suffix.lower() in JSONL_SUFFIXES
    return next((s for s in (r.strip() for r in text.split("\n")) if s), "").startswith("{")


def _numbered(text: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that hold something."""
    stripped = ((n, raw.strip()) for n, raw in enumerate(text.split("\n"), 1))
    return [(n, s) for n, s in stripped if s]


def _parse_text(name: str, text: str) -> list[_PromptLine]:
    return [_PromptLine({"prompt": s}, f"{name}:{n}") for n, s in _numbered(text) if not s.startswith("#")]


def _parse_jsonl(name: str, text: str) -> list[_PromptLine]:
    lines = []
    for n, s in _numbered(text):
        where = f"{name}:{n}"
        try:
            record = json.loads(s)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: malformed JSON line: {exc.msg} (column {exc.colno})") from None
        except RecursionError:  # json's own limit: "[" * 100000 is not a traceback
            raise InputError(f"{where}: malformed JSON line: nested too deeply") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object with a 'prompt', got {type(record).__name__}")
        lines.append(_PromptLine(record, where))
    return lines


def _pair_images(lines: list[_PromptLine], images: list[Path], source: str) -> list[_PromptLine]:
    """One image for all prompts, one prompt for all images, or one image per prompt in sorted order."""
    if len(images) == 1:
        return [_PromptLine({"image": str(images[0]), **line.fields}, line.where) for line in lines]
    if len(lines) == 1:
        return [_PromptLine({"image": str(image), **lines[0].fields}, lines[0].where) for image in images]
    if len(lines) != len(images):
        raise InputError(f"--image {source}: {len(images)} images but {len(lines)} prompts; "
                         "give one prompt for all images, or one prompt per image")
    pairs = zip(lines, images, strict=True)
    return [_PromptLine({"image": str(image), **line.fields}, line.where) for line, image in pairs]


def _expand(lines: list[_PromptLine], source: JobSource) -> list[JobItem]:
    """``images_per_prompt`` images per line; a line's own seed S gives its copies S, S+1, ..."""
    items: list[JobItem] = []
    for line in lines:
        fields = _merge(source.defaults, line.fields)
        for copy in range(source.images_per_prompt):
            k = len(items)
            seed = _seed(fields.get("seed"), source.base_seed + k, copy)
            spec = spec_from_record({**fields, "seed": seed}, line.where)
            items.append(JobItem(k, spec, line.where))
    return items


def _merge(defaults: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Flags under the line's fields; a --strength flag only touches images that have an init image."""
    merged = {**defaults, **fields}
    if merged.get("image") is None and "strength" not in fields:
        merged.pop("strength", None)
    return merged


def _seed(own: Any, job_seed: int, copy: int) -> Any:
    if own is None:
        return job_seed
    if isinstance(own, int) and not isinstance(own, bool):
        return own + copy
    return own  # not an integer: left for the spec to reject with the line's name
