"""Resuming a job in an output folder that already holds part of it.

An image counts as done when ``manifest.jsonl`` has a complete line for its index whose spec, file name,
model and fingerprints (the weights' ``model_hash``, the init image content's ``image_hash``) equal the
job's, and its PNG is the file the line describes: the SHA-256 of its bytes is the line's ``file_sha256``.
Everything else is made again: a PNG without a manifest line (the process died between the rename and the
append), a manifest line whose PNG is gone, cut short, damaged or replaced by another file (``damaged``:
the caller says so), a manifest line cut short by a kill (repaired before anything is appended).
A manifest line for an index of the job with a different spec means the job changed, and so does an image
file (named as diffbatch names them) that no image of the job has: refused, unless ``overwrite``, which
drops such lines and files and makes those images again, leaving the files a fresh run leaves.

Lines written before a key existed: a missing spec field reads as its default; a missing fingerprint as
unknown, which is no difference; a missing ``file_sha256`` means the PNG is kept when it decodes (every
chunk's CRC) and its parameters name the line's prompt and seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InputError
from ..prompt_language import NONE, has_syntax
from ..spec import GenerationSpec
from .images import image_hashes as init_image_hashes
from .writer import MANIFEST, NOTES, PARAMETERS_KEY, manifest_record, spec_image_hash, write_bytes_atomic

TEMP_FILE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # write_png_atomic's temporary files
IMAGE_FILE = re.compile(r"^[0-9]{5,}-[0-9]+\.png$")  # writer.png_name's names
# Manifest fields about the run and the file written, and the authoring's notes (a template, a sweep cell: the
# spec is what the image is): not compared
RUN_FIELDS = ("seconds", "file_sha256", *NOTES)
# missing from a line written before they existed, or from the job (a caller that does not say): unknown
FINGERPRINTS = ("model_hash", "image_hash", "numerics")
SHOWN = 5  # file names a message lists before "and N more"
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
    damaged: list[str] = field(default_factory=list)  # images whose file is not the one their line describes


@dataclass(frozen=True)
class _ManifestLine:
    text: str
    record: dict[str, Any]


class _Png(Enum):
    """What a line's PNG is."""

    SAME = "the file the line describes"
    MISSING = "gone"
    DAMAGED = "another file, or damaged"


def plan_resume(out: Path, specs: Sequence[GenerationSpec], model: str, overwrite: bool = False,
                model_hash: str = "", image_hashes: Mapping[str, str] | None = None, numerics: str = "") -> ResumePlan:
    """Compare ``out``'s manifest and images with the job (resolved specs, index k = position; ``image_hashes``
    from io/images.py ``image_hashes``, read here when not given); raise ``InputError`` naming the first
    difference when the job changed and ``overwrite`` is off. Reads; writes nothing."""
    hashes = init_image_hashes(s.image for s in specs) if image_hashes is None else image_hashes
    expected = _normal([manifest_record(k, spec, model, model_hash, spec_image_hash(spec, hashes), numerics)
                        for k, spec in enumerate(specs)])
    lines, cut = _read_manifest(out / MANIFEST)
    latest: dict[int, _ManifestLine] = {}
    for line in lines:
        latest[line.record.get("index", -1)] = line  # a repeated index: the last line wins
    changed = [(k, line) for k, line in latest.items() if not _same(line.record, expected, k)]
    listing = _listing(out)
    foreign = _foreign_images(listing, expected)
    if changed and not overwrite:
        raise InputError(_changed_message(out, changed[0], expected, len(changed)))
    if foreign and not overwrite:
        raise InputError(_foreign_message(out, foreign))
    _refuse_folders(out, listing, expected)
    stale = {k for k, _ in changed}
    checked = {k: _check_png(out, line) for k, line in latest.items() if k not in stale}
    kept = {k: latest[k] for k, png in checked.items() if png is _Png.SAME}
    plan = ResumePlan(todo=[k for k in range(len(specs)) if k not in kept], done=len(kept),
                      keep=[kept[k].text for k in sorted(kept)],
                      damaged=sorted(latest[k].record["file"] for k, png in checked.items() if png is _Png.DAMAGED))
    plan.rewrite = cut or len(kept) != len(lines)
    replaced = _replaced_files(out, changed, expected) + [out / name for name in foreign]
    plan.remove = _temp_files(out, listing) + sorted(set(replaced))
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
    except (FileNotFoundError, NotADirectoryError):  # no folder yet, or no manifest in it
        return [], False
    except OSError as exc:  # a folder of that name, no permission
        what = "is a folder" if path.is_dir() else f"cannot be read: {exc.strerror}"
        raise InputError(f"--out {path.parent}: {path.name} {what}; move it away or choose another folder") from None
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


def _normal(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """As the records read back from JSON (tuples become lists, and so on); one call for all of them."""
    return json.loads(json.dumps(records, ensure_ascii=False))


def _same(record: dict[str, Any], expected: list[dict[str, Any]], k: int) -> bool:
    if not 0 <= k < len(expected):
        return False  # an image the job no longer has: the job changed
    got = {key: v for key, v in record.items()
           if key not in RUN_FIELDS and not (key in FINGERPRINTS and key not in expected[k])}
    # A key the line lacks was written before it existed: a spec field (variation_seed, ...) reads as its
    # default; a fingerprint as unknown, which is not a difference (a different one is).
    missing = {key: expected[k][key] if key in FINGERPRINTS else _unwritten(key, expected[k])
               for key in expected[k] if key not in got}
    return {**missing, **got} == expected[k]


def _unwritten(key: str, expected: dict[str, Any]) -> Any:
    """What a spec field a line lacks was when it was written. Before ``emphasis`` and ``clip_skip`` existed,
    prompts were read literally with no clip skip: the same image as A1111's reading, unless a prompt has its
    syntax (a prompt longer than the encoder's window was cut then, which a line does not show: its image is
    kept)."""
    if key == "emphasis":
        literal = has_syntax(expected.get("prompt", "")) or has_syntax(expected.get("negative_prompt", ""))
        return NONE if literal else expected[key]
    if key == "clip_skip":
        return 1
    return SPEC_DEFAULTS.get(key)


def _check_png(out: Path, line: _ManifestLine) -> _Png:
    """Whether the line's PNG is the file it describes: the SHA-256 of its bytes (a copy of another image,
    a flipped byte, a file cut short all differ), or for a line without one the older check."""
    name, digest = line.record.get("file"), line.record.get("file_sha256")
    if not isinstance(name, str) or "/" in name or name.startswith("."):
        return _Png.MISSING
    try:
        if not isinstance(digest, str):
            return _legacy_check(out / name, line.record)
        with open(out / name, "rb", buffering=0) as png:  # one read of the whole file
            same = hashlib.sha256(png.read()).hexdigest() == digest
    except FileNotFoundError:
        return _Png.MISSING
    except OSError:
        return _Png.DAMAGED
    return _Png.SAME if same else _Png.DAMAGED


def _legacy_check(path: Path, record: dict[str, Any]) -> _Png:
    """A line written before ``file_sha256``: every chunk's CRC holds and the parameters name the line's
    prompt and seed (as format_parameters writes them: the prompt first, the seed in the last line)."""
    with open(path, "rb") as file:  # FileNotFoundError: the caller's MISSING
        try:
            with Image.open(file) as png:
                text = png.info.get(PARAMETERS_KEY)
                png.verify()
        except Exception:  # noqa: BLE001 - Pillow raises assorted errors (SyntaxError, struct.error) on damage
            return _Png.DAMAGED
    ok = (isinstance(text, str) and text.startswith(str(record.get("prompt")))
          and f" Seed: {record.get('seed')}," in text.rsplit("\n", 1)[-1])
    return _Png.SAME if ok else _Png.DAMAGED


def _listing(out: Path) -> dict[str, bool]:
    """The folder's entries: name -> is a folder (empty when there is no folder yet)."""
    try:
        with os.scandir(out) as entries:
            return {entry.name: entry.is_dir() for entry in entries}
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as exc:
        raise InputError(f"--out {out}: cannot list the folder: {exc.strerror}") from None


def _foreign_images(listing: dict[str, bool], expected: list[dict[str, Any]]) -> list[str]:
    """Image files (named as diffbatch names them) that no image of the job has: another job's, or a killed
    run's file that never got its manifest line. A fresh run would not leave them."""
    names = {record["file"] for record in expected}
    return sorted(n for n, is_dir in listing.items() if not is_dir and IMAGE_FILE.match(n) and n not in names)


def _refuse_folders(out: Path, listing: dict[str, bool], expected: list[dict[str, Any]]) -> None:
    """A folder where the job writes a file cannot be replaced by a rename: say so before any work."""
    blocked = [r["file"] for r in expected if listing.get(r["file"])]
    if blocked:
        raise InputError(f"--out {out}: {shown_names(blocked)} {'is a folder' if len(blocked) == 1 else 'are folders'} "
                         "where this job writes its images; move them away or choose another folder")


def _temp_files(out: Path, listing: dict[str, bool]) -> list[Path]:
    """Temporary files left by a killed run (``.NAME.xxxxxxxx.tmp``)."""
    return sorted(out / name for name, is_dir in listing.items() if not is_dir and TEMP_FILE.match(name))


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
        diffs = {key: f"{key} {line.record.get(key)!r} -> {value!r}" for key, value in expected[k].items()
                 if line.record.get(key) != value and (key in line.record or key not in FINGERPRINTS)}
        if list(diffs) == ["numerics"]:
            return (f"--out {out}: its images were made on {line.record['numerics']}, and this run makes "
                    f"{expected[k]['numerics']} (another dtype, device or backend: other pixels); give --dtype, "
                    "--device and --backend to continue it as it was made, --overwrite to make its images again, "
                    "or choose another folder")
        what = f"image {k} with a different spec ({'; '.join(list(diffs.values())[:3])})"
    return (f"--out {out}: holds a different job: {MANIFEST} has {what}"
            f"{f' and {count - 1} more changed' if count > 1 else ''}; "
            "give --overwrite to replace those images, or choose another folder")


def _foreign_message(out: Path, foreign: list[str]) -> str:
    return (f"--out {out}: holds a different job: {shown_names(foreign)}, which no image of this job has and "
            f"{MANIFEST} does not describe (another job's, or a run killed before their lines); "
            "give --overwrite to delete them, or choose another folder")


def shown_names(names: list[str]) -> str:
    """The first few of ``names`` (a message's list of files), then how many more."""
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more
