"""Init images for image-to-image: read as diffusers' ``load_image`` reads them (the EXIF orientation applied,
then converted to RGB), or refused in one line where that conversion would change what the picture shows
(samples deeper than 8 bits, transparent pixels). Errors name the input.

A file's fingerprint (``image_hash``: the first 10 hex digits of the SHA-256 of its bytes, as A1111 writes
its model and LoRA hashes) makes the content of an init image part of a job: resume compares it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, ImageOps

from ..errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Modes whose samples convert("RGB") clips to 8 bits (16-bit PNGs open as I;16, 32-bit TIFFs as I or F):
# diffusers would see a white or black picture.
DEEP_MODES = {"I": "32-bit integer", "F": "32-bit float", "I;16": "16-bit", "I;16L": "16-bit",
              "I;16B": "16-bit", "I;16N": "16-bit"}
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# Where a PNG can hold an orientation: Pillow decodes a whole PNG to look for a late eXIf chunk; a file
# whose bytes name none of these has none (a chance match in compressed data only costs that decode).
PNG_EXIF_KEYS = (b"eXIf", b"Raw profile type exif", b"XML:com.adobe.xmp")
HASH_DIGITS = 10


@dataclass(frozen=True)
class InitImageFile:
    """What a job needs to know of an init image file before it runs."""

    size: tuple[int, int]  # (width, height) as diffusers sees it: after the EXIF orientation
    sha256: str  # of the file's bytes

    @property
    def image_hash(self) -> str:
        return self.sha256[:HASH_DIGITS]


def load_init_image(value: Any, where: str = "init image") -> Image.Image:
    """An RGB PIL image from a path, as diffusers' ``load_image`` makes it (``InputError`` naming ``where`` and
    the path when it cannot be read, or not faithfully), or from a PIL image (the caller's own decoding: as
    diffusers' pipelines take one, converted to RGB only)."""
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    path = _path(value, where)
    try:
        with Image.open(path) as image:
            return as_rgb(image, f"{where}: {str(path)!r}")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        if isinstance(exc, InputError):
            raise
        raise _unreadable(where, path, exc) from None


def as_rgb(image: Image.Image, where: str) -> Image.Image:
    """An opened image as diffusers' ``load_image`` makes it, or ``InputError`` where that would not be faithful
    (also the server's uploads: one decoder for every init image)."""
    _check_faithful(image, where)
    return ImageOps.exif_transpose(image).convert("RGB")  # diffusers' load_image, step for step


def init_image_size(value: Any, where: str = "init image") -> tuple[int, int]:
    """(width, height) of an init image as diffusers sees it; refuses what ``load_init_image`` refuses."""
    if isinstance(value, Image.Image):
        return value.size
    return inspect_init_image(value, where).size


def image_hash(value: Any, where: str = "init image") -> str:
    """The fingerprint of an init image file (``""`` for an image in memory, which has no file)."""
    return "" if isinstance(value, Image.Image) else inspect_init_image(value, where).image_hash


def image_hashes(values: Iterable[Any]) -> dict[str, str]:
    """Each init image file's fingerprint, by path as a spec records it, each file read once."""
    paths = {os.fspath(v) for v in values if isinstance(v, str | os.PathLike)}
    return {p: image_hash(p) for p in sorted(paths)}


def inspect_init_image(value: Any, where: str = "init image") -> InitImageFile:
    """Size and hash of an init image file, read once per version of the file (its size, time, inode)."""
    path = _path(value, where)
    try:
        stat = path.stat()
        return _inspect(str(path), (stat.st_size, stat.st_mtime_ns, stat.st_ino), where)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, InputError):
            raise
        raise _unreadable(where, path, exc) from None


@functools.lru_cache(maxsize=65536)
def _inspect(path: str, version: tuple[int, int, int], where: str) -> InitImageFile:
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        _check_faithful(image, f"{where}: {path!r}")
        orientation = 1 if image.format == "PNG" and not any(k in data for k in PNG_EXIF_KEYS) else None
        size = _oriented_size(image, orientation or _orientation(image))
    return InitImageFile(size, hashlib.sha256(data).hexdigest())


def _check_faithful(image: Image.Image, where: str) -> None:
    """Refuse what ``convert("RGB")`` would change beyond recognition."""
    if image.mode in DEEP_MODES:
        raise InputError(f"{where}: {DEEP_MODES[image.mode]} samples (mode {image.mode}) would be clipped to 8 bits "
                         "(a white or black picture); save it as 8-bit RGB", "image")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            raise InputError(f"{where}: has transparent pixels (mode {image.mode}); the alpha would be dropped and "
                             "the colours under it used; flatten it onto a background first", "image")


def _orientation(image: Image.Image) -> int:
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return orientation if isinstance(orientation, int) else 1


def _oriented_size(image: Image.Image, orientation: int) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if orientation in TRANSPOSED else (width, height)


def _path(value: Any, where: str) -> Path:
    if not isinstance(value, str | os.PathLike):
        raise InputError(f"{where}: must be a PIL image or a file path, got {type(value).__name__}", "image")
    path = Path(value)
    if not path.is_file():
        reason = "is a directory" if path.is_dir() else "does not exist"
        raise InputError(f"{where}: {str(path)!r} {reason}", "image")
    return path


def _unreadable(where: str, path: Path, exc: Exception) -> InputError:
    return InputError(f"{where}: cannot read {str(path)!r} as an image: {_first_line(exc)}", "image")


def list_images(path: str | os.PathLike, where: str = "--image") -> list[Path]:
    """One file, or a folder's image files in sorted name order (the order they pair with prompts)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{where} {str(path)!r}: no such file or directory")
    try:
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        raise InputError(f"{where} {str(path)!r}: cannot list the folder: {exc.strerror}") from None
    if not found:
        raise InputError(f"{where} {str(path)!r}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
