"""CUDA only: SDXL-architecture tiny components in float16, as SDXL users run them (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffbatch import Engine, GenerationSpec
from tiny_sdxl import SDXLOracle, noise_picture, save_tiny_sdxl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOLERANCE = 1e-2  # float16 kernels differ with batch size; the images must still be diffusers' images


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl-cuda") / "base")


@pytest.fixture(scope="module")
def refiner_path(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl-cuda") / "refiner", refiner=True)


def specs() -> list[GenerationSpec]:
    return [GenerationSpec(prompt="a red circle", seed=1, num_inference_steps=4, guidance_scale=5.0),
            GenerationSpec(prompt="a blue square", negative_prompt="blurry", seed=2, num_inference_steps=3,
                           guidance_scale=7.0, width=48, scheduler="dpm++_2m"),
            GenerationSpec(prompt="no guidance", seed=3, num_inference_steps=3, guidance_scale=1.0,
                           scheduler="euler_a"),
            GenerationSpec(prompt="img2img", seed=4, num_inference_steps=4, strength=0.6,
                           image=noise_picture(32, 32, seed=4)),
            GenerationSpec(prompt="img2img wide", seed=5, num_inference_steps=3, guidance_scale=4.0, strength=0.9,
                           image=noise_picture(48, 32, seed=5))]


def test_default_dtype_on_cuda_is_float16_with_the_vae_upcast(base_path):
    adapter = Engine.from_pretrained(base_path, device="cuda").adapter
    assert adapter.pipe.unet.dtype == adapter.dtype == torch.float16
    assert adapter.pipe.vae.dtype == torch.float32  # force_upcast: SDXL's float16 VAE overflows
    assert adapter.pipe.unet.device.type == "cuda"


def test_float16_batch_on_cuda_equals_diffusers_float16(base_path):
    engine = Engine.from_pretrained(base_path, device="cuda", dtype="float16", max_batch_size=8)
    results = engine.generate(specs())
    oracle = SDXLOracle(base_path, dtype=torch.float16, device="cuda")
    for result in results:
        assert np.isfinite(result.pixels).all()
        assert np.abs(result.pixels - oracle(result.spec)).max() <= TOLERANCE


def test_float16_refiner_on_cuda_equals_diffusers_float16(refiner_path):
    engine = Engine.from_pretrained(refiner_path, device="cuda", dtype="float16")
    oracle = SDXLOracle(refiner_path, dtype=torch.float16, device="cuda")
    for result in engine.generate([s for s in specs() if s.is_img2img]):
        assert np.abs(result.pixels - oracle(result.spec)).max() <= TOLERANCE
