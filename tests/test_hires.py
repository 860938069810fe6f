"""Hires fix (hires.py): a request's image equals diffusers' text-to-image, the upscale, then diffusers'
image-to-image with the request's seed; hires and plain requests in one batch are each their image alone."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from diffbatch import Engine, GenerationSpec, SpecError
from diffbatch.cli import main
from diffbatch.io.infotext import parse_infotext, png_parameters
from diffbatch.io.writer import format_parameters
from helpers import DiffusersOracle

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_sd_path) -> Engine:
    return Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def oracle(tiny_sd_path) -> DiffusersOracle:
    return DiffusersOracle(tiny_sd_path)


def reference(oracle: DiffusersOracle, spec: GenerationSpec) -> np.ndarray:
    """diffusers' two calls: text-to-image (latents for a latent upscaler, else its picture), the upscale as A1111
    does it, image-to-image on the result with a generator seeded with the seed again."""
    def components(sampler: str | None) -> dict:
        return {**oracle.pipe.components, "scheduler": oracle.scheduler(sampler, spec.schedule)}

    common = dict(prompt=spec.prompt, negative_prompt=spec.negative_prompt or None, guidance_scale=spec.guidance_scale)
    latent = spec.hires_upscaler.startswith("latent")
    first = StableDiffusionPipeline(**components(spec.scheduler), requires_safety_checker=False)(
        **common, height=spec.height, width=spec.width, num_inference_steps=spec.num_inference_steps,
        generator=torch.Generator().manual_seed(spec.seed), output_type="latent" if latent else "pil").images
    height, width = int(spec.height * spec.hires_scale) // 2 * 2, int(spec.width * spec.hires_scale) // 2 * 2
    if latent:
        mode, antialias = {"latent": ("bilinear", False), "latent_bicubic_antialiased": ("bicubic", True),
                           "latent_nearest_exact": ("nearest-exact", False)}[spec.hires_upscaler]
        image = torch.nn.functional.interpolate(first, size=(height // 2, width // 2), mode=mode, antialias=antialias)
    else:
        image = first[0].resize((width, height), Image.Resampling.LANCZOS)
    # A1111's hires steps: exactly N run, the last N of a schedule of int(N / strength) steps; in diffusers'
    # img2img terms, that schedule and a strength whose int(schedule * strength) is N
    n = spec.hires_steps or spec.num_inference_steps
    schedule = int(n / min(spec.strength, 0.999))
    strength = min(1.0, (n + 0.5) / schedule)
    assert int(schedule * strength) == n
    second = StableDiffusionImg2ImgPipeline(**components(spec.hires_scheduler or spec.scheduler),
                                            requires_safety_checker=False)
    if spec.hires_prompt is not None:  # A1111's Hires prompt and Hires negative prompt
        common.update(prompt=spec.hires_prompt, negative_prompt=spec.hires_negative_prompt or None)
    return second(**common, image=image, strength=strength, num_inference_steps=schedule,
                  generator=torch.Generator().manual_seed(spec.seed), output_type="np").images[0]


HIRES = [
    GenerationSpec(prompt="a red ring", seed=1, num_inference_steps=3, hires_scale=1.5),
    GenerationSpec(prompt="a blue dot", negative_prompt="green", seed=2, num_inference_steps=3, hires_scale=2,
                   hires_steps=4, strength=0.5, hires_upscaler="latent_bicubic_antialiased", scheduler="euler_a"),
    GenerationSpec(prompt="a tan square", seed=3, num_inference_steps=2, hires_scale=1.5, hires_steps=3,
                   hires_upscaler="lanczos", scheduler="dpm++_2m", schedule="karras", guidance_scale=1.0),
    GenerationSpec(prompt="stripes", seed=4, num_inference_steps=3, hires_scale=1.25, strength=0.9,
                   hires_upscaler="latent_nearest_exact", height=48, width=32),
    GenerationSpec(prompt="a red ring", negative_prompt="blue", seed=7, num_inference_steps=3, hires_scale=1.5,
                   hires_scheduler="ddim", hires_prompt="a red ring, sharp", hires_negative_prompt="blur"),
]
PLAIN = [GenerationSpec(prompt="plain", seed=5, num_inference_steps=4, height=48, width=48),
         GenerationSpec(prompt="small", seed=6, num_inference_steps=3)]


@pytest.fixture(scope="module")
def batched(engine) -> list:
    """Hires and plain requests in one batch: the second passes join the plain 48x48 request's calls."""
    return engine.generate(HIRES + PLAIN)


@pytest.mark.parametrize("k", range(len(HIRES)))
def test_a_hires_image_is_diffusers_txt2img_then_the_upscale_then_img2img(batched, oracle, k):
    result = batched[k]
    assert result.spec.hires_scale == HIRES[k].hires_scale  # the request as asked, not its second pass
    expected = reference(oracle, result.spec)
    assert result.image.size == (expected.shape[1], expected.shape[0])
    assert np.abs(result.pixels - expected).max() <= TOLERANCE


def test_hires_and_plain_requests_in_one_batch_are_each_their_image_alone(engine, batched):
    for spec, result in zip(HIRES + PLAIN, batched, strict=True):
        assert np.array_equal(result.pixels, engine.generate([spec])[0].pixels), spec.prompt


def test_the_defaults_and_the_png_keys_are_a1111s(engine, batched):
    spec = batched[0].spec
    assert (spec.strength, spec.hires_upscaler, spec.hires_steps) == (0.7, "latent", None)
    text = format_parameters(batched[1].spec, "Euler a", "tiny")
    assert "Denoising strength: 0.5" in text and "Hires upscale: 2" in text and "Hires steps: 4" in text
    assert "Hires upscaler: Latent (bicubic antialiased)" in text
    own = format_parameters(batched[4].spec, "Euler a", "tiny")
    assert 'Hires sampler: DDIM' in own and 'Hires prompt: "a red ring, sharp"' in own
    assert parse_infotext(own).fields["hires_prompt"] == "a red ring, sharp"
    read = parse_infotext(text).fields
    assert (read["hires_scale"], read["hires_steps"], read["hires_upscaler"], read["strength"]) == (
        2.0, 4, "latent_bicubic_antialiased", 0.5)


@pytest.mark.parametrize(("steps", "strength", "schedule"), [(20, 0.7, 28), (1, 0.3, 3), (10, 1.0, 10), (7, 0.55, 12)])
def test_the_second_pass_runs_exactly_the_hires_steps_as_a1111(steps, strength, schedule):
    from diffbatch.hires import second_pass_steps

    spec = GenerationSpec(prompt="x", num_inference_steps=30, hires_scale=2, hires_steps=steps, strength=strength)
    total, given = second_pass_steps(spec)
    assert total == schedule and int(total * given) == steps  # diffusers runs int(total * strength) of them


def test_from_a_hires_png_makes_it_again_byte_for_byte(capsys, tmp_path, tiny_sd_path):
    first, again = tmp_path / "first", tmp_path / "again"
    argv = ["generate", "--prompt", "a red ring", "--out", first, "--model", tiny_sd_path, "--steps", "2",
            "--hires-scale", "1.5", "--hires-steps", "2", "--no-gallery"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    made = next(first.glob("0*.png"))
    assert Image.open(made).size == (48, 48) and "Hires upscale: 1.5" in png_parameters(made)
    code = main([str(a) for a in ["generate", "--from", made, "--out", again, "--model", tiny_sd_path]])
    assert code == 0, capsys.readouterr().err
    assert next(again.glob("0*.png")).read_bytes() == made.read_bytes()


@pytest.mark.parametrize(("fields", "field", "says"), [
    ({"hires_scale": 2, "image": Image.new("RGB", (32, 32))}, "hires_scale", "for text-to-image"),
    ({"hires_scale": 8, "height": 1024, "width": 1024}, "hires_scale", "makes 8192x8192"),
    ({"hires_scale": 2, "scheduler": "ddim", "hires_steps": 5000}, "hires_steps", "at most 999"),
    ({"hires_scale": 2, "scheduler": "pndm", "hires_steps": 1, "strength": 1.0}, "hires_steps",
     "cannot run hires_steps=1"),  # PNDM needs more steps than one: its second pass checked at admission
    ({"hires_steps": 3}, "hires_steps", "needs hires_scale"),
    ({"hires_scale": 9}, "hires_scale", "must be in (0, 8]"),
    ({"hires_scale": 2, "hires_upscaler": "4x-UltraSharp"}, "hires_upscaler", "must be one of latent"),
])
def test_bad_hires_requests_are_refused_by_name(engine, fields, field, says):
    with pytest.raises(SpecError, match=re.escape(says)) as caught:
        engine.resolve(GenerationSpec(prompt="x", **fields), seed=1)
    assert caught.value.field == field


@pytest.mark.parametrize("strength", [0.01, 5e-324])
def test_a_strength_that_makes_the_schedule_longer_than_training_is_refused_naming_strength(engine, strength):
    """A1111's hires schedule is int(steps / strength) steps: past the model's 1000 training steps, samplers repeat
    timesteps (NaN images) or overflow; refused, naming what to give."""
    with pytest.raises(SpecError, match="give a strength of at least 0.02") as caught:
        engine.resolve(GenerationSpec(prompt="x", num_inference_steps=20, hires_scale=1.5, strength=strength), seed=1)
    assert caught.value.field == "strength"
