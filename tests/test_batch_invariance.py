"""Batch invariance: an image does not change with batch size, position, or the other requests."""

from __future__ import annotations

import numpy as np
import pytest

from diffbatch import Engine, GenerationSpec
from helpers import noise_image

TARGET = GenerationSpec(prompt="a blue star", negative_prompt="ugly", seed=42, num_inference_steps=4,
                        guidance_scale=6.0, scheduler="euler_a")


def others(n: int) -> list[GenerationSpec]:
    return [GenerationSpec(prompt=f"other {i}", seed=i, num_inference_steps=4 + i % 3, guidance_scale=float(i % 3 * 3),
                           scheduler=("ddim", "dpm++_2m", "heun", None)[i % 4],
                           image=noise_image(seed=i) if i % 2 else None, strength=0.75 if i % 2 else None)
            for i in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_sd_path) -> Engine:
    return Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=8)


@pytest.fixture(scope="module")
def alone(engine) -> np.ndarray:
    return np.asarray(engine.generate([TARGET])[0].image)


@pytest.mark.parametrize("position", range(8))
def test_image_is_same_alone_and_at_every_position_of_a_batch_of_8(engine, alone, position):
    specs = others(7)
    specs.insert(position, TARGET)
    results = engine.generate(specs)
    assert np.array_equal(np.asarray(results[position].image), alone)


def test_image_is_same_when_joining_an_engine_mid_flight(engine, alone):
    for spec in others(5):
        engine.add_request(spec)
    engine.step()
    engine.step()  # the others are now at different steps
    target_id = engine.add_request(TARGET)
    found = {}
    while engine.has_unfinished():
        found.update({r.index: r for r in engine.step()})
    assert np.array_equal(np.asarray(found[target_id].image), alone)


def test_image_is_same_with_a_batch_size_limit_of_one(tiny_sd_path, alone):
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=1)
    assert np.array_equal(np.asarray(engine.generate([*others(2), TARGET])[2].image), alone)


def test_same_seed_same_image_and_other_seed_other_image(engine, alone):
    import dataclasses

    again = engine.generate([TARGET])[0]
    other = engine.generate([dataclasses.replace(TARGET, seed=43)])[0]
    assert np.array_equal(np.asarray(again.image), alone)
    assert not np.array_equal(np.asarray(other.image), alone)
