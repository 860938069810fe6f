"""Flux: every image equals diffusers' Flux(Img2Img)Pipeline for that image alone, in any batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from diffusers import FluxImg2ImgPipeline, FluxPipeline

from diffbatch import Engine, GenerationSpec, SpecError
from helpers import noise_image
from tiny_flow import PipelineOracle, save_tiny_flux

WIDE = dict(height=16, width=48)  # a second latent shape: another token count, so another timestep shift


def mixed_specs() -> list[GenerationSpec]:
    """Two resolutions; text-to-image and image-to-image; guidance, steps and strengths varying."""
    return [
        GenerationSpec(prompt="a red circle", seed=1, num_inference_steps=3, guidance_scale=3.5, height=32, width=32),
        GenerationSpec(prompt="a blue square", seed=2, num_inference_steps=2, guidance_scale=1.0, height=32,
                       width=32),
        GenerationSpec(prompt="a wide field", seed=3, num_inference_steps=4, guidance_scale=7.0, **WIDE),
        GenerationSpec(prompt="a cat", seed=4, num_inference_steps=4, guidance_scale=2.5,
                       image=noise_image(32, seed=4), strength=0.6),
        GenerationSpec(prompt="a wide cat", seed=5, num_inference_steps=3, guidance_scale=5.0,
                       image=noise_image(32, seed=5).resize((48, 16)), strength=1.0),
        GenerationSpec(prompt="a red circle", seed=6, num_inference_steps=3, guidance_scale=3.5, **WIDE),
    ]


TARGET = GenerationSpec(prompt="a green star", seed=42, num_inference_steps=3, guidance_scale=4.0, height=32,
                        width=32)


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="module")
def engine(flux_path) -> Engine:
    return Engine.from_pretrained(flux_path, device="cpu", dtype="float32", max_batch_size=8)


@pytest.fixture(scope="module")
def oracle(flux_path) -> PipelineOracle:
    return PipelineOracle(flux_path, FluxPipeline, FluxImg2ImgPipeline)


@pytest.fixture(scope="module")
def mixed(engine):
    return engine.generate(mixed_specs())


@pytest.mark.parametrize("k", range(len(mixed_specs())))
def test_each_image_of_a_mixed_two_resolution_batch_equals_diffusers(mixed, oracle, k):
    assert np.abs(mixed[k].pixels - oracle(mixed[k].spec)).max() <= 1e-4


def test_one_engine_call_makes_both_resolutions(mixed):
    assert {r.image.size for r in mixed} == {(32, 32), (48, 16)}
    assert [r.spec.prompt for r in mixed] == [s.prompt for s in mixed_specs()]


def test_guidance_distilled_model_runs_one_row_per_image_each_with_its_own_guidance(flux_path, monkeypatch):
    engine = Engine.from_pretrained(flux_path, device="cpu", dtype="float32", max_batch_size=8)
    calls = []
    denoise = engine.adapter.denoise

    def spy(sample, timesteps, cond):
        calls.append((sample.shape[0], cond["guidance"].tolist()))
        return denoise(sample, timesteps, cond)

    monkeypatch.setattr(engine.adapter, "denoise", spy)
    specs = [dataclasses.replace(TARGET, guidance_scale=g, seed=i) for i, g in enumerate((1.0, 3.5, 7.0))]
    engine.generate(specs)
    assert calls[0] == (3, [1.0, 3.5, 7.0])  # no CFG rows, even at guidance 7


@pytest.fixture(scope="module")
def alone(engine) -> np.ndarray:
    return np.asarray(engine.generate([TARGET])[0].image)


@pytest.mark.parametrize("position", [0, 2, 5])
def test_image_is_same_alone_and_at_any_position_of_a_mixed_batch(engine, alone, position):
    specs = mixed_specs()[:5]
    specs.insert(position, TARGET)
    assert np.array_equal(np.asarray(engine.generate(specs)[position].image), alone)


def test_image_is_same_with_a_batch_size_limit_of_one(flux_path, alone):
    engine = Engine.from_pretrained(flux_path, device="cpu", dtype="float32", max_batch_size=1)
    assert np.array_equal(np.asarray(engine.generate([mixed_specs()[0], TARGET])[1].image), alone)


def test_negative_prompt_is_refused_at_admission(engine):
    with pytest.raises(SpecError, match="negative_prompt.*true_cfg_scale"):
        engine.add_request(dataclasses.replace(TARGET, negative_prompt="blurry"))


def test_stable_diffusion_sampler_names_are_refused_at_admission(engine):
    with pytest.raises(SpecError, match="scheduler='dpm\\+\\+_2m'.*flow matching"):
        engine.add_request(dataclasses.replace(TARGET, scheduler="dpm++_2m"))


def test_sizes_must_fit_the_packed_latent_grid(engine):
    assert engine.defaults.vae_scale_factor == 4  # VAE factor 2 x 2x2 latent patches
    with pytest.raises(SpecError, match="multiple of 4"):
        engine.add_request(dataclasses.replace(TARGET, height=30))


def test_model_without_guidance_embedding_equals_diffusers(tmp_path):
    path = save_tiny_flux(tmp_path / "flux-schnell-like", guidance_embeds=False)
    oracle = PipelineOracle(path, FluxPipeline, FluxImg2ImgPipeline)
    engine = Engine.from_pretrained(path, device="cpu", dtype="float32")
    for result in engine.generate([mixed_specs()[0], mixed_specs()[4], mixed_specs()[2]]):
        assert np.abs(result.pixels - oracle(result.spec)).max() <= 1e-4
