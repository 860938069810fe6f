"""The equivalence contract: every image equals diffusers' own single-image call with a CPU generator."""

from __future__ import annotations

import numpy as np
import pytest

from diffbatch import Engine, GenerationSpec, SpecError
from diffbatch.samplers import SAMPLERS
from helpers import DiffusersOracle, noise_image

SAMPLER_NAMES = [*SAMPLERS, None]  # None: the model's own scheduler


def mixed_specs() -> list[GenerationSpec]:
    """For every sampler: text-to-image and image-to-image, with and without CFG, all parameters varying."""
    specs = []
    for i, name in enumerate(SAMPLER_NAMES):
        specs.append(GenerationSpec(prompt=f"a red circle {i}", seed=i, num_inference_steps=4 + i % 3,
                                    guidance_scale=(1.0, 5.0, 7.5)[i % 3], scheduler=name))
        specs.append(GenerationSpec(prompt=f"a cat {i}", negative_prompt="blurry", seed=100 + i,
                                    num_inference_steps=4 + i % 2, guidance_scale=(7.5, 1.0)[i % 2], scheduler=name,
                                    image=noise_image(seed=i), strength=(0.5, 0.9, 1.0)[i % 3]))
    return specs


@pytest.fixture(scope="module")
def oracle(tiny_sd_path) -> DiffusersOracle:
    return DiffusersOracle(tiny_sd_path)


@pytest.fixture(scope="module")
def mixed_results(tiny_sd_path):
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=32)
    specs = mixed_specs()
    return specs, engine.generate(specs)


@pytest.mark.parametrize("k", range(2 * len(SAMPLER_NAMES)))
def test_each_image_of_a_mixed_batch_equals_diffusers_single_image_call(mixed_results, oracle, k):
    specs, results = mixed_results
    reference = oracle(results[k].spec)
    assert results[k].spec.prompt == specs[k].prompt  # results come back in input order
    assert np.abs(results[k].pixels - reference).max() <= 1e-4


def test_mixed_batch_really_mixes_parameters_in_one_call(mixed_results):
    specs, results = mixed_results
    used = {(r.spec.scheduler, r.spec.num_inference_steps, r.spec.guidance_scale, r.spec.is_img2img) for r in results}
    assert len(used) > 10


def test_guidance_rescale_equals_diffusers(tiny_sd_path, oracle):
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")
    specs = [GenerationSpec(prompt="glow", seed=3, num_inference_steps=4, guidance_scale=7.0, guidance_rescale=0.7),
             GenerationSpec(prompt="dim", seed=4, num_inference_steps=5, guidance_scale=4.0)]
    results = engine.generate(specs)
    assert results[1].spec.guidance_rescale == 0.0
    for result in results:
        assert np.abs(result.pixels - oracle(result.spec)).max() <= 1e-4


def test_non_square_size_equals_diffusers(tiny_sd_path, oracle):
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")
    spec = GenerationSpec(prompt="wide", seed=7, num_inference_steps=3, guidance_scale=3.0, height=16, width=40)
    [result] = engine.generate([spec])
    assert result.image.size == (40, 16)
    assert np.abs(result.pixels - oracle(result.spec)).max() <= 1e-4


SCHEDULED = [("euler", "karras"), ("dpm++_2m_sde", "exponential"), ("dpm2", "beta"), ("dpm2_a", "karras"),
             ("ddim", "sgm_uniform"), ("lms", "karras"), (None, "sgm_uniform"), ("heun", "exponential")]


def test_a1111_schedules_and_ddim_eta_in_one_batch_equal_diffusers(tiny_sd_path, oracle):
    """Each (sampler, Schedule type) as diffusers' scheduler option gives it, and DDIM's eta, beside each other."""
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")
    specs = [GenerationSpec(prompt=f"ring {i}", seed=20 + i, num_inference_steps=4, guidance_scale=4.0,
                            scheduler=name, schedule=schedule) for i, (name, schedule) in enumerate(SCHEDULED)]
    specs.append(GenerationSpec(prompt="eta", seed=3, num_inference_steps=4, scheduler="ddim", eta=0.7))
    results = engine.generate(specs)
    for result in results:
        assert np.abs(result.pixels - oracle(result.spec)).max() <= 1e-4, (result.spec.scheduler, result.spec.schedule)
    stochastic = engine.generate([GenerationSpec(prompt="eta", seed=3, num_inference_steps=4, scheduler="ddim")])[0]
    assert not np.array_equal(stochastic.pixels, results[-1].pixels)  # eta 0.7 draws noise: another image


@pytest.mark.parametrize(("fields", "says"), [
    ({"scheduler": "euler_a", "schedule": "karras"}, "sampler euler_a has no such schedule"),
    ({"scheduler": "ddim", "schedule": "exponential"}, "sampler ddim has no such schedule"),
    ({"scheduler": "euler", "eta": 0.5}, "sampler euler takes no eta"),
])
def test_a_schedule_or_eta_the_sampler_does_not_take_is_refused_by_name(tiny_sd_path, fields, says):
    from diffbatch.resolver import Resolver

    with pytest.raises(SpecError, match=says) as caught:
        Resolver.for_model(tiny_sd_path).resolve(GenerationSpec(prompt="x", **fields))
    assert caught.value.field in ("schedule", "eta")


def test_a_schedule_beside_a_sampler_with_its_own_is_refused_naming_schedule(tiny_sd_path):
    from diffbatch.resolver import Resolver

    with pytest.raises(SpecError, match="has its own schedule") as caught:
        Resolver.for_model(tiny_sd_path).resolve(GenerationSpec(prompt="x", scheduler="dpm++_2m_karras",
                                                                schedule="exponential"))
    assert caught.value.field == "schedule"
