"""bfloat16 on a CPU, the default dtype where the CPU computes it natively (AVX512_BF16, AMX): every image is the same
alone and at any batch size, position and torch thread count (adapters/invariance.py). Intel's AMX kernels were seen
to move rows with their batch, so on an AMX CPU every stage runs one fixed row count at the thread count the model
was loaded with; AVX512_BF16 CPUs without AMX keep the kernels measured invariant there. The tests that load
bfloat16 run on any CPU with AVX512_BF16 or AMX (elsewhere bfloat16 is refused as emulated), each design on it: the
one this CPU runs, and the AMX design forced (``amx``), checking the images and the shape and thread count of every
model call.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diffbatch import Engine, GenerationSpec
from diffbatch.adapters import invariance, load_adapter
from diffbatch.adapters.invariance import (
    CPU_BF16_DENOISER_ROWS,
    CPU_BF16_TEXT_ROWS,
    CPU_BF16_VAE_IMAGES,
    CPU_SHAPES,
    call_shapes,
    cpu_bf16_shapes,
)
from diffbatch.hardware import native_bfloat16
from helpers import noise_image

pytestmark = pytest.mark.slow  # ~20 s: 4 designs x 8 batch sizes and thread counts
native = pytest.mark.skipif(not native_bfloat16(), reason="this CPU has no AVX512_BF16 or AMX: bfloat16 is refused")
SAMPLERS = ("euler_a", "dpm++_2m", "ddim", None)


def test_bfloat16_on_an_amx_cpu_runs_every_stage_at_one_row_count_and_one_thread_count(monkeypatch):
    monkeypatch.setattr(invariance, "amx", lambda: True)
    shapes = call_shapes(torch.device("cpu"), True, torch.bfloat16)
    assert (shapes.text.fixed, shapes.denoiser.fixed, shapes.vae.fixed) == (
        CPU_BF16_TEXT_ROWS, CPU_BF16_DENOISER_ROWS, CPU_BF16_VAE_IMAGES)
    assert {shapes.text.threads, shapes.denoiser.threads, shapes.vae.threads} == {torch.get_num_threads()}
    assert call_shapes(torch.device("cpu"), True, torch.float32) == CPU_SHAPES  # float32 keeps its kernels
    monkeypatch.setattr(invariance, "amx", lambda: False)  # AVX512_BF16 alone: the kernels measured invariant
    assert call_shapes(torch.device("cpu"), True, torch.bfloat16) == CPU_SHAPES


@pytest.fixture(scope="module", params=[("tiny", "this CPU's"), ("shapes", "this CPU's"), ("tiny", "amx"),
                                        ("shapes", "amx")], ids="-".join)
def bf16_adapter(request, tiny_sd_path):
    if not native_bfloat16():
        pytest.skip("this CPU has no AVX512_BF16 or AMX: bfloat16 is refused")
    model, design = request.param
    adapter = load_adapter(str(tiny_sd_path) if model == "tiny" else None, "cpu", "bfloat16")
    if design == "amx":
        adapter.call_shapes = cpu_bf16_shapes(torch.get_num_threads())
    return adapter


def mixed_specs(adapter, n: int = 8) -> list[GenerationSpec]:
    size = adapter.defaults.height
    specs = []
    for k in range(n):
        spec = GenerationSpec(prompt=f"a {('red', 'blue', 'green')[k % 3]} circle {k}", seed=100 + k,
                              num_inference_steps=2 + k % 3, guidance_scale=(1.0, 5.0, 7.5)[k % 3],
                              scheduler=SAMPLERS[k % len(SAMPLERS)], height=size, width=size)
        if k % 4 == 3:
            spec = dataclasses.replace(spec, image=noise_image(size=size, seed=k), strength=0.75)
        specs.append(spec)
    return specs


@native
@pytest.mark.parametrize(("batch", "threads"), [(1, 1), (2, 2), (3, 3), (4, 4), (5, 1), (6, 2), (7, 3), (8, 4)])
def test_bfloat16_images_are_the_same_at_every_batch_size_and_thread_count(bf16_adapter, batch, threads):
    specs = mixed_specs(bf16_adapter)
    alone = _alone_images(bf16_adapter)
    torch.set_num_threads(threads)  # the conftest fixture restores the default
    made = Engine(bf16_adapter, max_batch_size=batch, vae_batch_size=batch).generate(specs)
    for k, result in enumerate(made):
        assert np.array_equal(result.pixels, alone[k]), f"image {k} differs at batch {batch}, {threads} threads"


_ALONE: dict[int, list[np.ndarray]] = {}


def _alone_images(adapter) -> list[np.ndarray]:
    """Each of ``mixed_specs`` made alone, at the default thread count (once per adapter)."""
    if id(adapter) not in _ALONE:
        engine = Engine(adapter, max_batch_size=1)
        _ALONE[id(adapter)] = [engine.generate([spec])[0].pixels for spec in mixed_specs(adapter)]
    return _ALONE[id(adapter)]


@native
def test_every_bfloat16_model_call_runs_its_stage_shape_at_the_load_time_thread_count(bf16_adapter, monkeypatch):
    if bf16_adapter.call_shapes == CPU_SHAPES:
        pytest.skip("this CPU's bfloat16 kernels are invariant at any shape (no AMX): no fixed shape to check")
    loaded_threads = bf16_adapter.call_shapes.denoiser.threads
    seen: dict[str, set[tuple[int, int]]] = {"encode_prompts": set(), "denoise": set(), "decode": set(),
                                             "encode_images": set()}
    for name, calls in seen.items():
        method = getattr(bf16_adapter, name)

        def spy(x, *rest, method=method, calls=calls, **kwargs):
            calls.add((len(x), torch.get_num_threads()))
            return method(x, *rest, **kwargs)

        monkeypatch.setattr(bf16_adapter, name, spy)
    torch.set_num_threads(1 if loaded_threads != 1 else 3)
    Engine(bf16_adapter, max_batch_size=5).generate(mixed_specs(bf16_adapter, 5))
    assert torch.get_num_threads() != loaded_threads  # the caller's count is restored after each call
    assert seen == {"encode_prompts": {(CPU_BF16_TEXT_ROWS, loaded_threads)},
                    "denoise": {(CPU_BF16_DENOISER_ROWS, loaded_threads)},
                    "decode": {(CPU_BF16_VAE_IMAGES, loaded_threads)},
                    "encode_images": {(CPU_BF16_VAE_IMAGES, loaded_threads)}}
