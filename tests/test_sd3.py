"""SD3: every image equals diffusers' StableDiffusion3(Img2Img)Pipeline for that image alone, in any batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

from diffbatch import Engine, GenerationSpec, SpecError
from helpers import a1111_two_encoders, noise_image
from tiny_flow import PipelineOracle, save_tiny_sd3

WIDE = dict(height=16, width=48)  # a second latent shape (the tiny model's native size is 32x32)


def mixed_specs() -> list[GenerationSpec]:
    """Two resolutions; text-to-image and image-to-image; with and without CFG; steps and strengths varying."""
    return [
        GenerationSpec(prompt="a red circle", negative_prompt="blurry", seed=1, num_inference_steps=3,
                       guidance_scale=5.0),
        GenerationSpec(prompt="a blue square", seed=2, num_inference_steps=2, guidance_scale=1.0),
        GenerationSpec(prompt="a wide field", seed=3, num_inference_steps=4, guidance_scale=7.0, **WIDE),
        GenerationSpec(prompt="a cat", negative_prompt="ugly", seed=4, num_inference_steps=4, guidance_scale=4.0,
                       image=noise_image(32, seed=4), strength=0.6),
        GenerationSpec(prompt="a wide cat", seed=5, num_inference_steps=3, guidance_scale=1.0,
                       image=noise_image(32, seed=5).resize((48, 16)), strength=1.0),
        GenerationSpec(prompt="a red circle", seed=6, num_inference_steps=3, guidance_scale=3.0, **WIDE),
    ]


TARGET = GenerationSpec(prompt="a green star", negative_prompt="dark", seed=42, num_inference_steps=3,
                        guidance_scale=6.0)


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def engine(sd3_path) -> Engine:
    return Engine.from_pretrained(sd3_path, device="cpu", dtype="float32", max_batch_size=8)


@pytest.fixture(scope="module")
def oracle(sd3_path) -> PipelineOracle:
    return PipelineOracle(sd3_path, StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline)


@pytest.fixture(scope="module")
def mixed(engine):
    return engine.generate(mixed_specs())


@pytest.mark.parametrize("k", range(len(mixed_specs())))
def test_each_image_of_a_mixed_two_resolution_batch_equals_diffusers(mixed, oracle, k):
    assert np.abs(mixed[k].pixels - oracle(mixed[k].spec)).max() <= 1e-4


def test_one_engine_call_makes_both_resolutions(mixed):
    sizes = {r.image.size for r in mixed}
    assert sizes == {(32, 32), (48, 16)}
    assert [r.spec.prompt for r in mixed] == [s.prompt for s in mixed_specs()]


@pytest.fixture(scope="module")
def alone(engine) -> np.ndarray:
    return np.asarray(engine.generate([TARGET])[0].image)


@pytest.mark.parametrize("position", [0, 2, 5])
def test_image_is_same_alone_and_at_any_position_of_a_mixed_batch(engine, alone, position):
    specs = mixed_specs()[:5]
    specs.insert(position, TARGET)
    assert np.array_equal(np.asarray(engine.generate(specs)[position].image), alone)


def test_image_is_same_with_a_batch_size_limit_of_one(sd3_path, alone):
    engine = Engine.from_pretrained(sd3_path, device="cpu", dtype="float32", max_batch_size=1)
    assert np.array_equal(np.asarray(engine.generate([mixed_specs()[0], TARGET])[1].image), alone)


def test_stable_diffusion_sampler_names_are_refused_at_admission(engine):
    with pytest.raises(SpecError, match="scheduler='euler'.*flow matching"):
        engine.add_request(dataclasses.replace(TARGET, scheduler="euler"))


def test_guidance_rescale_is_refused_at_admission(engine):
    with pytest.raises(SpecError, match="guidance_rescale"):
        engine.add_request(dataclasses.replace(TARGET, guidance_rescale=0.5))


def test_model_defaults_follow_diffusers(engine):
    defaults = engine.defaults
    assert (defaults.height, defaults.num_inference_steps, defaults.guidance_scale) == (32, 28, 7.0)
    assert defaults.vae_scale_factor == 4  # VAE factor 2 x patch size 2
    assert engine.sampler_label(TARGET) == "FlowMatchEulerDiscreteScheduler"


def test_model_without_t5_and_with_dynamic_shift_equals_diffusers(tmp_path):
    path = save_tiny_sd3(tmp_path / "sd3-no-t5", with_t5=False, dynamic_shift=True)
    oracle = PipelineOracle(path, StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline,
                            text_encoder_3=None, tokenizer_3=None)  # diffusers' way to load SD3 without T5
    assert oracle.txt2img.text_encoder_3 is None
    engine = Engine.from_pretrained(path, device="cpu", dtype="float32")
    for result in engine.generate([mixed_specs()[0], mixed_specs()[3], mixed_specs()[2]]):
        assert np.abs(result.pixels - oracle(result.spec)).max() <= 1e-4


def test_a_prompt_past_t5s_window_is_said_once_and_clip_reads_it_in_chunks(engine, caplog):
    """SD3's CLIP encoders read A1111's language in chunks (no cut); its T5 reads the text without the syntax, up
    to max_sequence_length tokens, and a cut there is said in one line, once per prompt."""
    clip_long = "a red circle on a blue ground " * 2  # 60 characters: past the tiny CLIP's 16 tokens, within T5's
    t5_long = "a red circle on a blue ground " * 10  # 300 characters: past T5's 256
    with caplog.at_level("WARNING", logger="diffbatch.prompts"):
        engine.generate([GenerationSpec(prompt=p, seed=1, num_inference_steps=2) for p in (clip_long, t5_long)] * 2)
    said = [r.getMessage() for r in caplog.records if "rest is cut" in r.getMessage()]
    assert len(said) == 1 and "SD3's T5 text encoder reads 256 tokens" in said[0]
    assert engine.resolve(GenerationSpec(prompt="(red:1.3)"), seed=1).emphasis == "original"


def _sd3_embeds(pipe, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111's reading on SD3's CLIP encoders, padded to T5's width; then T5's states of the text without the
    syntax (the pieces apart, blanks made one); the pooled outputs of both CLIP encoders."""
    clip, pooled, parts = a1111_two_encoders(pipe, text)
    with torch.no_grad():
        t5 = pipe._get_t5_prompt_embeds(" ".join(" ".join(t for t, _ in parts).split()), max_sequence_length=256)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


@pytest.mark.parametrize(("prompt", "negative"), [("(red:1.4) [dot]", "((green))"),
                                                  ("a red dot on tan, (big:0.8)", "a tan dot on red, small")])
def test_the_prompt_language_on_sd3s_clip_encoders_is_diffusers_given_its_embeddings(engine, oracle, prompt,
                                                                                     negative):
    result = engine.generate([GenerationSpec(prompt=prompt, negative_prompt=negative, seed=4, num_inference_steps=2,
                                             guidance_scale=5.0)])[0]
    pipe = StableDiffusion3Pipeline(**oracle.txt2img.components)
    embeds, pooled = _sd3_embeds(pipe, prompt)
    negative_embeds, negative_pooled = _sd3_embeds(pipe, negative)
    reference = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative_embeds,
                     negative_pooled_prompt_embeds=negative_pooled, num_inference_steps=2, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(4), output_type="np").images[0]
    assert np.abs(result.pixels - reference).max() <= 1e-4
    specs = [GenerationSpec(prompt=p, seed=i, num_inference_steps=2) for i, p in enumerate(
        ["red dot", "red (dot:1.0)", prompt, "a red circle on a blue ground " * 2])]
    batched = engine.generate(specs)
    for spec, one in zip(specs, batched, strict=True):
        assert np.array_equal(one.pixels, engine.generate([spec])[0].pixels), spec.prompt
