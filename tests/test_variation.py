"""Variation seeds (AUTOMATIC1111's subseed): the starting noise is A1111's slerp of the seed's noise and
the variation seed's, at ``variation_strength``. Strength 0 is exactly the seed's image; strength 1 is the
variation seed's own noise; anything between is a new image that is still batch-invariant."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diffbatch import Engine, GenerationSpec
from diffbatch.adapters.base import slerp
from diffbatch.errors import SpecError
from diffbatch.io.writer import format_parameters
from helpers import noise_image

BASE = GenerationSpec(prompt="a red circle", seed=3, num_inference_steps=3)


@pytest.fixture(scope="module")
def engine(tiny_sd_path):
    return Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=8)


def pixels(engine, spec):
    return engine.generate([spec])[0].pixels


def test_strength_zero_is_exactly_the_seeds_image_for_text_and_image_to_image(engine):
    init = dataclasses.replace(BASE, image=noise_image(32, 1), strength=0.7)
    for spec in (BASE, init):
        varied = dataclasses.replace(spec, variation_seed=11, variation_strength=0.0)
        assert np.array_equal(pixels(engine, varied), pixels(engine, spec))


def test_strength_one_is_the_variation_seeds_noise(engine):
    # the tiny model samples with DDIM (no noise after the start): the image is the variation seed's own
    varied = dataclasses.replace(BASE, variation_seed=11, variation_strength=1.0)
    assert np.array_equal(pixels(engine, varied), pixels(engine, dataclasses.replace(BASE, seed=11)))


def test_a_partial_variation_is_new_and_batch_invariant(engine):
    varied = [dataclasses.replace(BASE, variation_seed=11, variation_strength=s) for s in (0.1, 0.5)]
    alone = [pixels(engine, v) for v in varied]
    batch = engine.generate([BASE, *varied, dataclasses.replace(BASE, seed=11)])
    assert all(np.array_equal(a, r.pixels) for a, r in zip(alone, batch[1:3], strict=True))
    plain, other = batch[0].pixels, batch[3].pixels
    assert not np.array_equal(alone[0], plain) and not np.array_equal(alone[1], other)
    # a small strength stays closer to the seed's image than a large one
    assert np.abs(alone[0] - plain).mean() < np.abs(alone[1] - plain).mean()


def test_slerp_keeps_the_noise_scale_between_two_independent_noises():
    low, high = (torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    mixed = slerp(0.5, low, high)  # a linear mix would shrink the std to ~0.71
    assert abs(float(mixed.std()) - 1.0) < 0.1 and torch.equal(slerp(0.0, low, high), low)


@pytest.mark.parametrize(("fields", "field"), [({"variation_seed": 4}, "variation_strength"),
                                               ({"variation_strength": 0.3}, "variation_seed")])
def test_one_without_the_other_is_refused_naming_the_missing_field(engine, fields, field):
    with pytest.raises(SpecError) as refused:
        engine.resolve(dataclasses.replace(BASE, **fields))
    assert refused.value.field == field


@pytest.mark.parametrize(("field", "value"), [("variation_strength", 1.5), ("variation_strength", -0.1),
                                              ("variation_seed", -1), ("variation_seed", "7")])
def test_out_of_range_values_are_refused(field, value):
    with pytest.raises(SpecError, match=field):
        GenerationSpec(prompt="x", **{field: value})


def test_png_parameters_carry_the_variation_with_a1111s_names():
    spec = dataclasses.replace(BASE, guidance_scale=7.5, height=32, width=32, variation_seed=11,
                               variation_strength=0.25)
    text = format_parameters(spec, "DDIM", "tiny")
    assert text.endswith("Variation seed: 11, Variation seed strength: 0.25")
