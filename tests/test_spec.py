"""GenerationSpec validation and resolution against a model's defaults."""

from __future__ import annotations

import pytest

from diffbatch import GenerationSpec, ModelDefaults, SpecError
from diffbatch.spec import spec_from_record

DEFAULTS = ModelDefaults(height=64, width=64, vae_scale_factor=8)


@pytest.mark.parametrize("field, value, words", [
    ("num_inference_steps", 0, "num_inference_steps=0"),
    ("guidance_scale", -1.0, "guidance_scale=-1.0"),
    ("strength", 0.0, "strength=0.0"),
    ("strength", 1.5, "strength=1.5"),
    ("scheduler", "turbo", "must be one of ddim"),
    ("height", 4, "height=4"),
    ("width", 5000, "width=5000"),
    ("seed", -1, "seed=-1"),
    ("guidance_scale", float("nan"), "guidance_scale=nan"),
])
def test_bad_field_is_refused_naming_the_field(field, value, words):
    with pytest.raises(SpecError, match=words.replace("+", r"\+")):
        GenerationSpec(prompt="x", **{field: value})


def test_spec_error_is_a_value_error():
    with pytest.raises(ValueError):
        GenerationSpec(prompt="x", num_inference_steps=0)


def test_resolve_fills_model_defaults_and_the_given_seed():
    spec = GenerationSpec(prompt="x").resolve(DEFAULTS, seed=5)
    assert (spec.seed, spec.height, spec.width, spec.num_inference_steps, spec.guidance_scale) == (5, 64, 64, 30, 7.5)
    assert spec.strength is None


def test_resolve_keeps_the_specs_own_seed_and_img2img_gets_default_strength_and_image_size():
    spec = GenerationSpec(prompt="x", seed=9, image="a.png").resolve(DEFAULTS, seed=5, image_size=(100, 60))
    assert (spec.seed, spec.strength, spec.width, spec.height) == (9, 0.8, 96, 56)


def test_size_off_the_vae_grid_is_refused_at_resolve():
    with pytest.raises(SpecError, match="multiple of 8"):
        GenerationSpec(prompt="x", height=60).resolve(DEFAULTS, seed=0)


def test_strength_too_small_for_the_step_count_is_refused():
    with pytest.raises(SpecError, match="no denoising step"):
        GenerationSpec(prompt="x", image="a.png", strength=0.1, num_inference_steps=5).resolve(DEFAULTS, 0, (64, 64))


def test_record_with_unknown_field_names_where():
    with pytest.raises(SpecError, match=r"jobs.jsonl:3: unknown field\(s\) colour"):
        spec_from_record({"prompt": "x", "colour": "red"}, where="jobs.jsonl:3")
