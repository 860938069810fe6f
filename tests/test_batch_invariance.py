"""Batch invariance as users run it: an image made alone equals the same image made at any position of any
batch, with any batch limit, joining mid-flight, and at any thread count — uint8 pixels and float pixels alike.

The tests run at torch's default thread count (2 on CI) and use the embedded shapes model: its channel widths
(64-128) reach the kernels whose results moved with the thread count (1x1 convolutions from 128 channels up),
where the tiny test pipelines (8-16 channels) do not.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from diffbatch import Engine, GenerationSpec
from diffbatch.adapters import load_adapter
from diffbatch.adapters.invariance import CUDA_DENOISER_ROWS, FIXED_SHAPES, run_in_calls
from diffbatch.adapters.loading import resolve_dtype
from helpers import noise_image

SAMPLERS = (None, "euler_a", "dpm++_2m", "ddim", "heun", "euler", "dpm++_2m_karras")
PROMPTS = ("a red circle", "a blue star on a white background", "a small green square at the top", "a pink triangle")


pytestmark = pytest.mark.slow  # ~45 s of trials: the full run (make test) has them, -m "not slow" not

# float32, and what dtype="auto" (the default) picks on this CPU: bfloat16 where it is native
DTYPES = sorted({"float32", str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")})


@pytest.fixture(scope="module", params=DTYPES)
def adapter(request):
    return load_adapter(None, "cpu", request.param)


@pytest.fixture(scope="module")
def alone(adapter):
    """Each spec made alone, at the default thread count; cached by value, so a spec that comes back (the same
    trial at another thread count, the same image at another position) is made alone once."""
    engine = Engine(adapter, max_batch_size=1)
    made: dict[tuple, np.ndarray] = {}

    def make(spec: GenerationSpec) -> np.ndarray:
        image = spec.image  # a PIL image is unhashable: its pixels stand for it
        key = (repr(dataclasses.replace(spec, image=None)), None if image is None else (image.size, image.tobytes()))
        if key not in made:
            made[key] = engine.generate([spec])[0].pixels
        return made[key]

    return make


def random_spec(rng: random.Random, k: int) -> GenerationSpec:
    steps = rng.randint(2, 4)
    spec = GenerationSpec(prompt=rng.choice(PROMPTS), negative_prompt=rng.choice(("", "blurry")),
                          seed=rng.randrange(2**31), num_inference_steps=steps,
                          guidance_scale=rng.choice((1.0, 4.0, 7.5)), scheduler=rng.choice(SAMPLERS),
                          height=rng.choice((64, 32)), width=64)
    if rng.random() < 0.4:  # image-to-image: the init image's VAE encode is batched too
        strength = rng.choice((0.5, 0.75, 1.0))
        image = noise_image(size=64, seed=k)
        spec = dataclasses.replace(spec, image=image, strength=strength, height=None, width=None)
    return spec


# The specs the random batches draw from: every sampler, guidance 1 (no CFG) to 7.5, two sizes, image-to-image at
# three strengths. Trials draw their batches from one pool so that each spec is made alone once (the reference
# run is half a trial's time), while the batches, their limits and their join points stay random.
POOL = [random_spec(random.Random(1000 + k), k) for k in range(32)]


def run_trial(adapter, seed: int) -> tuple[list[GenerationSpec], list[np.ndarray]]:
    """2-7 random specs of the pool through an engine with a random batch limit; some join after a few steps."""
    rng = random.Random(seed)
    specs = rng.sample(POOL, rng.randint(2, 7))
    engine = Engine(adapter, max_batch_size=rng.randint(1, 8), vae_batch_size=rng.randint(1, 4))
    resolved = [engine.resolve(s) for s in specs]
    split = rng.randint(1, len(specs))
    ids = [engine.admit(s) for s in resolved[:split]]
    finished = {}
    for _ in range(rng.randint(0, 3)):
        finished.update({r.request_id: r for r in engine.step()})
    ids += [engine.admit(s) for s in resolved[split:]]  # join mid-flight
    while engine.has_unfinished():
        finished.update({r.request_id: r for r in engine.step()})
    return resolved, [finished[i].pixels for i in ids]


def assert_same_as_alone(alone, specs, pixels) -> None:
    for k, (spec, got) in enumerate(zip(specs, pixels, strict=True)):
        want = alone(spec)
        assert np.array_equal(got, want), f"image {k} ({spec.scheduler}, guidance {spec.guidance_scale}, " \
            f"img2img={spec.is_img2img}) differs from its alone run by {np.abs(got - want).max()}"


@pytest.mark.parametrize("trial", range(24))
def test_every_image_of_a_random_batch_equals_its_alone_run_at_the_default_thread_count(adapter, alone, trial):
    assert_same_as_alone(alone, *run_trial(adapter, trial))


@pytest.mark.parametrize("threads", [1, 3])
def test_images_do_not_change_with_the_thread_count(adapter, alone, threads):
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        made = [run_trial(adapter, 100 + trial) for trial in range(4)]
    finally:
        torch.set_num_threads(default)
    for specs, pixels in made:
        assert_same_as_alone(alone, specs, pixels)  # alone runs are made at the default count


@pytest.mark.parametrize("position", range(8))
def test_image_is_same_alone_and_at_every_position_of_a_batch_of_8(adapter, alone, position):
    specs = random.Random(position).sample(POOL, 8)
    specs[position] = GenerationSpec(prompt="a blue star", negative_prompt="blurry", seed=42, num_inference_steps=4,
                                     guidance_scale=6.0, scheduler="euler_a", height=64, width=64)
    engine = Engine(adapter, max_batch_size=8)
    result = engine.generate(specs)[position]
    assert np.array_equal(result.pixels, alone(result.spec))


def test_one_prompt_encodes_the_same_alone_and_in_a_batch_of_64(adapter):
    texts = [f"a {c} shape number {i}" for i, c in enumerate(["red", "blue", "green", "pink"] * 16)]

    def encode(some: list[str]) -> list:  # as the runner calls the text encoder: in the stage's call shape
        return run_in_calls(adapter.call_shapes.text, len(some), lambda real, size: adapter.encode_prompts(
            pad_rows_of(some[real], size)))

    with torch.inference_mode():
        batch = encode(texts)
        for i in (0, 17, 63):
            alone = encode([texts[i]])[0]
            assert all(torch.equal(alone[key], batch[i][key]) for key in alone)


def pad_rows_of(items: list, size: int) -> list:
    return items + items[-1:] * (size - len(items))


def test_same_seed_same_image_and_other_seed_other_image(adapter, alone):
    spec = GenerationSpec(prompt="a blue star", seed=7, num_inference_steps=3, height=64, width=64)
    engine = Engine(adapter, max_batch_size=8)
    again = engine.generate([spec, dataclasses.replace(spec, seed=8)])
    assert np.array_equal(again[0].pixels, alone(again[0].spec))
    assert not np.array_equal(again[1].pixels, again[0].pixels)


def test_fixed_call_shapes_run_one_size_per_stage_and_keep_images_the_same():
    """The CUDA design, exercised on the CPU with stock kernels: every denoiser call has the same row count
    (chunked and padded), every VAE call one image, and an image does not change with its batch."""
    adapter = load_adapter(None, "cpu", "float32", invariant=False)
    adapter.call_shapes = FIXED_SHAPES
    sizes: dict[str, set[int]] = {"denoise": set(), "decode": set(), "encode_images": set()}
    for name in sizes:
        method = getattr(adapter, name)
        setattr(adapter, name, lambda x, *rest, method=method, name=name: sizes[name].add(x.shape[0])
                or method(x, *rest))
    alone_engine = Engine(adapter, max_batch_size=1)
    rng = random.Random(7)
    specs = [random_spec(rng, 70 + k) for k in range(11)]  # up to 22 rows: two denoiser calls
    for spec, result in zip(specs, Engine(adapter, max_batch_size=11).generate(specs), strict=True):
        assert np.array_equal(result.pixels, alone_engine.generate([result.spec])[0].pixels), spec
    assert sizes == {"denoise": {CUDA_DENOISER_ROWS}, "decode": {1}, "encode_images": {1}}
