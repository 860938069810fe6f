"""Result: one finished image, as every output path (files, HTTP, Ray) receives it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .spec import GenerationSpec


@dataclass
class Result:
    """One finished image."""

    request_id: int  # the engine's id for this image (``add_request``/``admit`` return it)
    spec: GenerationSpec  # resolved: the seed and every default actually used
    image: Image.Image
    pixels: np.ndarray  # [H, W, 3] float32 in [0, 1], before rounding to uint8
    seconds: float  # this image's share of the engine time spent on the steps it took part in
    sampler: str = ""  # the sampler that made it, as written into PNG metadata ("Euler a", "DPM++ 2M", ...)
    model: str = ""  # the model's name, as written into PNG metadata and manifests
    index: int | None = None  # position in the ``generate`` call's specs; None for ``step``'s results
    lora_hashes: tuple[tuple[str, str], ...] = ()  # (name, short sha256) of each LoRA, for the PNG metadata
    model_hash: str = ""  # the weights' fingerprint, written as A1111's "Model hash"
    numerics: str = ""  # the numeric path it was made on (numerics.py: "bfloat16 cpu"), "" unknown
    ti_hashes: tuple[tuple[str, str], ...] = ()  # (name, short sha256) of each textual-inversion embedding used
