"""Shared pieces of the server tests: a configured app over the tiny model, PNG decoding."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from diffbatch import Engine, GenerationSpec


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def b64_pixels(item: dict) -> np.ndarray:
    return png_pixels(base64.b64decode(item["b64_json"]))


def offline(engine: Engine, **fields) -> np.ndarray:
    """The same spec run offline through a fresh call: the server must give these exact pixels."""
    return np.asarray(engine.generate([GenerationSpec(**fields)])[0].image)
