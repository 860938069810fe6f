"""SDXL base and refiner: each image equals diffusers' own SDXL pipeline call for that one image, in any batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from diffbatch import Engine, GenerationSpec, SpecError
from diffbatch.adapters.hub import has_fp16_variant
from diffbatch.adapters.sdxl import StableDiffusionXLAdapter
from diffbatch.engine import Result
from diffbatch.errors import ModelLoadError
from diffbatch.hardware import native_bfloat16
from helpers import a1111_two_encoders
from tiny_sdxl import SDXLOracle, noise_picture, save_tiny_sdxl, tiny_sdxl_components

TOLERANCE = 1e-4  # max abs difference on [0, 1] pixels, float32


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "base")


@pytest.fixture(scope="module")
def refiner_path(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "refiner", refiner=True)


@pytest.fixture(scope="module")
def base_oracle(base_path) -> SDXLOracle:
    return SDXLOracle(base_path)


@pytest.fixture(scope="module")
def engine(base_path) -> Engine:
    return Engine.from_pretrained(base_path, device="cpu", dtype="float32", max_batch_size=16)


def mixed_specs() -> list[GenerationSpec]:
    """Text-to-image and image-to-image at two resolutions (32x32 native, 48x32), with and without CFG,
    several samplers, negative prompts empty and not, guidance_rescale."""
    txt = [dict(guidance_scale=5.0),
           dict(guidance_scale=1.0, scheduler="euler_a"),
           dict(guidance_scale=6.0, negative_prompt="blurry", scheduler="dpm++_2m", width=48),
           dict(guidance_scale=7.0, guidance_rescale=0.7, scheduler="ddim", width=48),
           dict(guidance_scale=4.0, guidance_rescale=0.5, scheduler="heun")]
    img = [dict(guidance_scale=5.0, strength=0.6, image=noise_picture(32, 32, seed=1)),
           dict(guidance_scale=1.0, strength=0.9, scheduler="euler_a", image=noise_picture(48, 32, seed=2)),
           dict(guidance_scale=6.5, strength=1.0, negative_prompt="dark", scheduler="dpm++_2m_karras",
                image=noise_picture(48, 32, seed=3))]
    return [GenerationSpec(prompt=f"a red circle {i}", seed=10 + i, num_inference_steps=2 + i % 3, **kw)
            for i, kw in enumerate(txt + img)]


@pytest.fixture(scope="module")
def mixed(engine):
    """The mixed specs in ONE generate call; the latent shape of every denoiser call is recorded."""
    shapes: list[tuple[int, ...]] = []
    denoise = engine.adapter.denoise

    def spy(sample: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        shapes.append(tuple(sample.shape))
        return denoise(sample, timesteps, cond)

    engine.adapter.denoise = spy
    try:
        return engine.generate(mixed_specs()), shapes
    finally:
        del engine.adapter.denoise


@pytest.mark.parametrize("k", range(len(mixed_specs())))
def test_each_image_of_a_mixed_sdxl_batch_equals_diffusers_single_image_call(mixed, base_oracle, k):
    results, _ = mixed
    assert np.abs(results[k].pixels - base_oracle(results[k].spec)).max() <= TOLERANCE


def test_one_generate_call_runs_two_resolutions_each_batched_per_latent_shape(mixed):
    results, shapes = mixed
    assert {r.image.size for r in results} == {(32, 32), (48, 32)}
    assert {s[2:] for s in shapes} == {(16, 16), (16, 24)}  # latent sizes: VAE factor 2
    assert max(s[0] for s in shapes) >= 6  # several requests (CFG rows included) share one denoiser call


def test_sdxl_defaults_are_native_size_and_diffusers_guidance(engine):
    defaults = engine.defaults
    assert (defaults.height, defaults.width, defaults.guidance_scale, defaults.vae_scale_factor) == (32, 32, 5.0, 2)
    [result] = engine.generate([GenerationSpec(prompt="default", seed=1, num_inference_steps=2)])
    assert (result.spec.height, result.spec.width, result.spec.guidance_scale) == (32, 32, 5.0)


# Batch invariance -------------------------------------------------------------------------------------------
TARGET = GenerationSpec(prompt="a blue star", negative_prompt="ugly", seed=42, num_inference_steps=3,
                        guidance_scale=6.0, scheduler="euler_a")


def others(n: int) -> list[GenerationSpec]:
    sizes = [(32, 32), (48, 32), (32, 16)]
    return [GenerationSpec(prompt=f"other {i}", seed=i, num_inference_steps=2 + i % 3, guidance_scale=float(i % 3 * 3),
                           width=None if i % 2 else sizes[i % 3][0], height=None if i % 2 else sizes[i % 3][1],
                           scheduler=("ddim", "dpm++_2m", None)[i % 3], strength=0.75 if i % 2 else None,
                           image=noise_picture(*sizes[i % 3], seed=i) if i % 2 else None)
            for i in range(n)]


@pytest.fixture(scope="module")
def alone(engine) -> Result:
    return engine.generate([TARGET])[0]


def assert_same_image(result: Result, alone: Result) -> None:
    """Identical PNG; float pixels equal up to float32 reassociation in batched kernels."""
    assert np.array_equal(np.asarray(result.image), np.asarray(alone.image))
    assert np.abs(result.pixels - alone.pixels).max() <= 1e-5


@pytest.mark.parametrize("position", [0, 2, 5])
def test_sdxl_image_is_same_alone_and_at_any_position_among_other_sizes(engine, alone, position):
    specs = others(5)
    specs.insert(position, TARGET)
    assert_same_image(engine.generate(specs)[position], alone)


def test_sdxl_image_is_same_when_joining_an_engine_mid_flight(engine, alone):
    for spec in others(4):
        engine.add_request(spec)
    engine.step()
    target_id = engine.add_request(TARGET)
    found = {}
    while engine.has_unfinished():
        found.update({r.request_id: r for r in engine.step()})
    assert_same_image(found[target_id], alone)


# Refiner ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def refiner(refiner_path) -> Engine:
    return Engine.from_pretrained(refiner_path, device="cpu", dtype="float32")


def test_refiner_loads_as_img2img_pipeline_without_first_text_encoder(refiner):
    adapter = refiner.adapter
    assert isinstance(adapter, StableDiffusionXLAdapter) and adapter.is_refiner
    assert type(adapter.pipe).__name__ == "StableDiffusionXLImg2ImgPipeline" and adapter.pipe.text_encoder is None
    assert refiner.defaults.strength == 0.3  # a refiner polishes an image


def test_refiner_img2img_with_aesthetic_score_equals_diffusers(refiner, refiner_path):
    specs = [GenerationSpec(prompt="refine", seed=5, num_inference_steps=4, image=noise_picture(32, 32, seed=5)),
             GenerationSpec(prompt="refine more", negative_prompt="noisy", seed=6, num_inference_steps=3,
                            guidance_scale=7.0, strength=0.8, image=noise_picture(48, 32, seed=6)),
             GenerationSpec(prompt="no cfg", seed=7, num_inference_steps=3, guidance_scale=1.0, strength=0.7,
                            image=noise_picture(32, 32, seed=7), scheduler="dpm++_2m")]
    results = refiner.generate(specs)
    assert results[0].spec.strength == 0.3
    oracle = SDXLOracle(refiner_path)
    for result in results:
        assert np.abs(result.pixels - oracle(result.spec)).max() <= TOLERANCE


def test_refiner_refuses_text_to_image_at_admission(refiner):
    with pytest.raises(SpecError, match="refiner.*image-to-image"):
        refiner.add_request(GenerationSpec(prompt="from nothing", seed=1))
    with pytest.raises(SpecError, match="refiner"):
        refiner.generate([GenerationSpec(prompt="ok", seed=1, image=noise_picture(32, 32)),
                          GenerationSpec(prompt="from nothing", seed=2)])
    assert not refiner.has_unfinished()  # nothing of the refused call was admitted


def test_vae_with_latent_mean_and_std_equals_diffusers(tmp_path):
    path = save_tiny_sdxl(tmp_path / "sdxl-stats", latent_stats=True)
    engine = Engine.from_pretrained(path, device="cpu", dtype="float32")
    specs = [GenerationSpec(prompt="stats", seed=1, num_inference_steps=2),
             GenerationSpec(prompt="stats img", seed=2, num_inference_steps=3, image=noise_picture(32, 32, seed=2))]
    oracle = SDXLOracle(path)
    for result in engine.generate(specs):
        assert np.abs(result.pixels - oracle(result.spec)).max() <= TOLERANCE


# Precision and loading -------------------------------------------------------------------------------------
def test_float16_decodes_with_the_vae_upcast_as_diffusers_does(base_path):
    engine = Engine.from_pretrained(base_path, device="cpu", dtype="float16")
    assert engine.adapter.pipe.unet.dtype == engine.adapter.dtype == torch.float16
    assert engine.adapter.pipe.vae.dtype == torch.float32  # force_upcast: diffusers decodes in float32
    oracle = SDXLOracle(base_path, dtype=torch.float16)
    for seed in (1, 2):
        [result] = engine.generate([GenerationSpec(prompt="half", seed=seed, num_inference_steps=2)])
        # A float16 decode would be ~1e-3 away; the float16 UNet rows are computed as diffusers computes them.
        assert np.abs(result.pixels - oracle(result.spec)).max() <= 1e-4


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_text_and_image_to_image_equal_diffusers_up_to_rounding(base_path, dtype):
    if dtype == "bfloat16" and not native_bfloat16():  # the rule the loader applies: emulated bf16 is refused
        with pytest.raises(ModelLoadError, match="bfloat16' is refused on this CPU"):
            Engine.from_pretrained(base_path, device="cpu", dtype=dtype)
        return
    engine = Engine.from_pretrained(base_path, device="cpu", dtype=dtype)
    oracle = SDXLOracle(base_path, dtype=getattr(torch, dtype))
    specs = [GenerationSpec(prompt="half", seed=1, num_inference_steps=2),
             GenerationSpec(prompt="half img", seed=2, num_inference_steps=3, strength=0.7,
                            image=noise_picture(32, 32, seed=2))]
    for result in engine.generate(specs):
        # Half-precision kernels round differently with memory layout and batch (diffusers' img2img latents
        # are channels-last); on this model that alone moves pixels by up to ~0.03 in bfloat16.
        assert np.abs(result.pixels - oracle(result.spec)).max() <= 5e-2
    # diffusers encodes in float32 (force_upcast) but decodes a bfloat16 VAE in bfloat16: the VAE stays as loaded.
    assert engine.adapter.pipe.vae.dtype == (torch.float32 if dtype == "float16" else torch.bfloat16)


def test_fp16_variant_weights_are_loaded_for_float16_only(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = save_tiny_sdxl(tmp_path / "sdxl", seed=0)
    assert not has_fp16_variant(str(folder))
    variant = StableDiffusionXLPipeline(**tiny_sdxl_components(tmp_path / "tok", seed=1), add_watermarker=False)
    variant.to(torch.float16).save_pretrained(folder, variant="fp16", safe_serialization=True)
    assert has_fp16_variant(str(folder))
    weight = "conv_in.weight"
    half = Engine.from_pretrained(folder, device="cpu", dtype="float16").adapter.pipe.unet.state_dict()[weight]
    full = Engine.from_pretrained(folder, device="cpu", dtype="float32").adapter.pipe.unet.state_dict()[weight]
    assert torch.equal(half, variant.unet.state_dict()[weight])
    assert not torch.allclose(full.half(), half)


def test_empty_negative_prompt_is_zeros_and_other_negatives_are_encoded(engine):
    empty, other = engine.adapter.encode_prompts(["", "blurry"], negative=True)
    [positive_empty] = engine.adapter.encode_prompts([""])
    assert all(not v.any() for v in empty.values())
    assert all(v.any() for v in other.values()) and all(v.any() for v in positive_empty.values())


def _sdxl_embeds(pipe, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111's reading on SDXL: both encoders' chunks joined; the pooled output the second encoder's."""
    embeds, pooled, _ = a1111_two_encoders(pipe, text)
    return embeds, pooled[-1]


def test_the_prompt_language_on_both_encoders_is_diffusers_given_its_embeddings(engine, base_oracle):
    prompt, negative = "(red:1.3) [dot]", "((blue))"  # one window each (the tiny tokenizer's 14 characters)
    result = engine.generate([GenerationSpec(prompt=prompt, negative_prompt=negative, seed=4, num_inference_steps=3,
                                             guidance_scale=5.0)])[0]
    pipe = StableDiffusionXLPipeline(**base_oracle.pipe.components, add_watermarker=False)
    embeds, pooled = _sdxl_embeds(pipe, prompt)
    negative_embeds, negative_pooled = _sdxl_embeds(pipe, negative)
    reference = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative_embeds,
                     negative_pooled_prompt_embeds=negative_pooled, num_inference_steps=3, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(4), output_type="np").images[0]
    assert np.abs(result.pixels - reference).max() <= TOLERANCE


def test_weighted_long_and_clip_skipped_prompts_in_a_batch_are_their_images_alone(engine):
    long = "a red circle on a blue ground, top left, " * 2  # six windows
    specs = [GenerationSpec(prompt=p, seed=i, num_inference_steps=2, **extra) for i, (p, extra) in enumerate([
        ("red dot", {}), ("red (dot:1.0)", {}), ("red (dot:1.3)", {}), (long, {"negative_prompt": "dark"}),
        ("red dot", {"clip_skip": 2}), ("red BREAK dot", {"emphasis": "no_norm", "guidance_scale": 1.0})])]
    batched = engine.generate(specs)
    for spec, result in zip(specs, batched, strict=True):
        assert np.array_equal(result.pixels, engine.generate([spec])[0].pixels), spec.prompt
    one = engine.generate([GenerationSpec(prompt="red dot", seed=1, num_inference_steps=2)])[0]
    assert np.array_equal(one.pixels, batched[1].pixels)  # (dot:1.0) is dot, to the bit
    assert not np.array_equal(batched[1].pixels, batched[2].pixels)


@pytest.mark.parametrize(("fields", "field"), [({"prompt": "(a:1.2.3)"}, "prompt"), ({"clip_skip": 12}, "clip_skip"),
                                               ({"prompt": "x BREAK " * 32}, "prompt")])
def test_the_prompt_language_and_clip_skip_are_checked_at_admission_on_sdxl(engine, fields, field):
    with pytest.raises(SpecError) as caught:
        engine.resolve(GenerationSpec(**{"prompt": "x", **fields}), seed=1)
    assert caught.value.field == field
    assert engine.generate([GenerationSpec(prompt="fine", seed=1, num_inference_steps=2)])[0].image is not None
