"""Init images for image-to-image: open a path (or take a PIL image) as RGB, with errors naming the input."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from ..errors import InputError

T = TypeVar("T")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_init_image(value: Any, where: str = "init image") -> Image.Image:
    """An RGB PIL image from a PIL image or a path; ``InputError`` naming ``where`` and the path otherwise."""
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    return _open(value, where, lambda image: image.convert("RGB"))


def init_image_size(value: Any, where: str = "init image") -> tuple[int, int]:
    """(width, height) of an init image, reading only the file's header; errors as ``load_init_image``."""
    if isinstance(value, Image.Image):
        return value.size
    return _open(value, where, lambda image: image.size)


def _open(value: Any, where: str, read: Callable[[Image.Image], T]) -> T:
    if not isinstance(value, str | os.PathLike):
        raise InputError(f"{where}: must be a PIL image or a file path, got {type(value).__name__}", "image")
    path = Path(value)
    if not path.is_file():
        reason = "is a directory" if path.is_dir() else "does not exist"
        raise InputError(f"{where}: {str(path)!r} {reason}", "image")
    try:
        with Image.open(path) as image:
            return read(image)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise InputError(f"{where}: cannot read {str(path)!r} as an image: {_first_line(exc)}", "image") from None


def list_images(path: str | os.PathLike, where: str = "--image") -> list[Path]:
    """One file, or a folder's image files in sorted name order (the order they pair with prompts)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{where} {str(path)!r}: no such file or directory")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise InputError(f"{where} {str(path)!r}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
