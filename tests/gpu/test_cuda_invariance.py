"""CUDA only: batch invariance on the device (fixed call shapes, adapters/invariance.py); skipped without a GPU.

An image made alone on CUDA equals the same image made in a batch, at any position, with any batch limit and
joining mid-flight, in float16 (the CUDA default) and float32. The embedded model has the channel widths
where kernels choose by problem size."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from diffbatch import Engine, GenerationSpec
from diffbatch.adapters import load_adapter
from diffbatch.adapters.invariance import CUDA_DENOISER_ROWS
from helpers import noise_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def mixed_specs(rng: random.Random, n: int) -> list[GenerationSpec]:
    specs = []
    for k in range(n):
        spec = GenerationSpec(prompt=rng.choice(("a red circle", "a blue star", "a green square")),
                              seed=rng.randrange(2**31), num_inference_steps=rng.randint(2, 4),
                              guidance_scale=rng.choice((1.0, 5.0)), scheduler=rng.choice((None, "dpm++_2m", "ddim")))
        if k % 3 == 2:
            spec = dataclasses.replace(spec, image=noise_image(size=64, seed=k), strength=0.75)
        specs.append(spec)
    return specs


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_images_on_cuda_are_the_same_alone_and_in_any_batch(dtype):
    adapter = load_adapter(None, "cuda", dtype)
    alone_engine = Engine(adapter, max_batch_size=1)
    for trial in range(4):
        rng = random.Random(trial)
        specs = mixed_specs(rng, rng.randint(3, 12))  # up to 24 rows: more than one fixed-size call
        engine = Engine(adapter, max_batch_size=rng.randint(2, 12))
        for spec, result in zip(specs, engine.generate(specs), strict=True):
            alone = alone_engine.generate([result.spec])[0]
            assert np.array_equal(np.asarray(result.image), np.asarray(alone.image)), (dtype, trial, spec)


def test_cuda_calls_have_one_shape_whatever_the_batch():
    adapter = load_adapter(None, "cuda", "float16")
    seen: list[int] = []
    denoise = adapter.denoise
    adapter.denoise = lambda sample, *rest: seen.append(sample.shape[0]) or denoise(sample, *rest)
    Engine(adapter, max_batch_size=3).generate(mixed_specs(random.Random(0), 5))
    assert set(seen) == {CUDA_DENOISER_ROWS}
