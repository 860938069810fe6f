"""Resuming a job in an output folder that already holds part of it.

An image counts as done when ``manifest.jsonl`` has a complete line for its index whose spec, file name and
model equal the job's, and its PNG is complete (it ends with the IEND chunk). Everything else is made again:
a PNG without a manifest line (the process died between the rename and the append), a manifest line whose
PNG is gone or cut short, a manifest line cut short by a kill (repaired before anything is appended).
A manifest line for an index of the job with a different spec means the job changed: refused, unless
``overwrite``, which drops such lines (and their files) and makes those images again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..spec import GenerationSpec
from .writer import MANIFEST, manifest_record, write_bytes_atomic

PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last 12 bytes of every complete PNG
TEMP_FILE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # write_png_atomic's temporary files
RUN_FIELDS = ("seconds",)  # manifest fields that describe the run, not the image: not compared
# what an unset spec field reads as in a manifest (a line written before the field existed lacks it)
SPEC_DEFAULTS = json.loads(json.dumps({k: v for k, v in GenerationSpec(prompt="").to_record().items()
                                       if k != "prompt"}))


@dataclass
class ResumePlan:
    """What a run in ``out`` must do: which job indices to make, what to repair first."""

    todo: list[int]  # job indices to generate, in order
    done: int  # images already written and checked
    keep: list[str] = field(default_factory=list)  # manifest lines to keep (each without newline)
    rewrite: bool = False  # the manifest must be rewritten as ``keep`` (cut line, stale or duplicate lines)
    remove: list[Path] = field(default_factory=list)  # files to delete (temp files, replaced images)


@dataclass(frozen=True)
class _ManifestLine:
    text: str
    record: dict[str, Any]


def plan_resume(out: Path, specs: Sequence[GenerationSpec], model: str, overwrite: bool = False,
                model_hash: str = "") -> ResumePlan:
    """Compare ``out``'s manifest with the job (resolved specs, index k = position); raise ``InputError``
    naming the first difference when the job changed and ``overwrite`` is off. Reads; writes nothing."""
    lines, damaged = _read_manifest(out / MANIFEST)
    expected = [_normal(manifest_record(k, spec, model, model_hash)) for k, spec in enumerate(specs)]
    latest: dict[int, _ManifestLine] = {}
    for line in lines:
        latest[line.record.get("index", -1)] = line  # a repeated index: the last line wins
    changed = [(k, line) for k, line in latest.items() if not _same(line.record, expected, k)]
    if changed and not overwrite:
        raise InputError(_changed_message(out, changed[0], expected, len(changed)))
    stale = {k for k, _ in changed}
    kept = {k: line for k, line in latest.items() if k not in stale and _png_complete(out, line)}
    plan = ResumePlan(todo=[k for k in range(len(specs)) if k not in kept], done=len(kept),
                      keep=[kept[k].text for k in sorted(kept)])
    plan.rewrite = damaged or len(kept) != len(lines)
    plan.remove = _temp_files(out) + _replaced_files(out, changed, expected)
    return plan


def try_lock(folder: Path) -> int | None:
    """Take an exclusive ``flock`` on the folder itself (no lock file to leave behind): the descriptor that
    holds it (close it to release; the kernel releases it when the process dies, even by ``kill -9``), or
    None when another process holds it. Where there is no flock (Windows): -1, and nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return -1
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def lock_folder(out: Path) -> Iterator[None]:
    """Hold the folder's lock while a run writes: a second run on the same folder is refused instead of
    appending duplicate lines."""
    fd = try_lock(out)
    if fd is None:
        raise InputError(f"--out {out}: another diffbatch run is writing to this folder")
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def apply_resume(out: Path, plan: ResumePlan) -> None:
    """Repair the folder before the run appends: the manifest rewritten atomically, stale files deleted."""
    if plan.rewrite:
        text = "".join(line + "\n" for line in plan.keep)
        write_bytes_atomic(out / MANIFEST, text.encode("utf-8"))
    for path in plan.remove:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def manifest_records(out: Path) -> list[dict[str, Any]]:
    """The folder's manifest records: the latest complete line per index, in index order."""
    latest = {line.record["index"]: line.record for line in _read_manifest(out / MANIFEST)[0]}
    return [latest[k] for k in sorted(latest)]


def _read_manifest(path: Path) -> tuple[list[_ManifestLine], bool]:
    """Complete, parseable lines; ``damaged`` when some line was cut short or unreadable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], False
    lines, damaged = [], not data.endswith(b"\n") and bool(data)
    for chunk in data.split(b"\n")[:-1]:  # what follows the last newline is a line cut short (or nothing)
        line = _parse(chunk)
        if line is None:
            damaged = True
        else:
            lines.append(line)
    return lines, damaged


def _parse(chunk: bytes) -> _ManifestLine | None:
    try:
        text = chunk.decode("utf-8")
        record = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("index"), int):
        return None
    return _ManifestLine(text, record)


def _normal(record: dict[str, Any]) -> dict[str, Any]:
    """As the record reads back from JSON (tuples become lists, and so on)."""
    return json.loads(json.dumps(record, ensure_ascii=False))


def _same(record: dict[str, Any], expected: list[dict[str, Any]], k: int) -> bool:
    if not 0 <= k < len(expected):
        return False  # an image the job no longer has: the job changed
    got = {key: v for key, v in record.items() if key not in RUN_FIELDS}
    # A key the line lacks was written before it existed: a spec field (variation_seed, ...) reads as its
    # default; the weights' fingerprint as unknown, which is not a difference (a different one is).
    missing = {key: expected[k][key] if key == "model_hash" else SPEC_DEFAULTS.get(key)
               for key in expected[k] if key not in got}
    return {**missing, **got} == expected[k]


def _png_complete(out: Path, line: _ManifestLine) -> bool:
    """The file exists and ends with IEND (an atomic rename cannot leave half a PNG, but a copy can)."""
    name = line.record.get("file")
    if not isinstance(name, str) or "/" in name or name.startswith("."):
        return False
    try:
        with open(out / name, "rb") as png:
            png.seek(0, os.SEEK_END)
            if png.tell() < len(PNG_END):
                return False
            png.seek(-len(PNG_END), os.SEEK_END)
            return png.read() == PNG_END
    except OSError:
        return False


def _temp_files(out: Path) -> list[Path]:
    """Temporary files left by a killed run (``.NAME.xxxxxxxx.tmp``)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if TEMP_FILE.match(p.name))


def _replaced_files(out: Path, changed: list[tuple[int, _ManifestLine]], expected: list[dict[str, Any]]) -> list[Path]:
    """Files of replaced images whose name the new job does not reuse (an index's new seed names a new file)."""
    new_names = {record["file"] for record in expected}
    names = {line.record.get("file") for _, line in changed}
    return [out / n for n in sorted(n for n in names if isinstance(n, str) and n not in new_names and "/" not in n)]


def _changed_message(out: Path, first: tuple[int, _ManifestLine], expected: list[dict[str, Any]], count: int) -> str:
    k, line = first
    if not 0 <= k < len(expected):
        what = f"image {k}, which this job (of {len(expected)} images) does not have"
    else:
        diffs = [f"{key} {line.record.get(key)!r} -> {value!r}" for key, value in expected[k].items()
                 if line.record.get(key) != value]
        what = f"image {k} with a different spec ({'; '.join(diffs[:3])})"
    return (f"--out {out}: holds a different job: {MANIFEST} has {what}"
            f"{f' and {count - 1} more changed' if count > 1 else ''}; "
            "give --overwrite to replace those images, or choose another folder")
