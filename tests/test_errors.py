"""Errors carry structure: the field at fault, its value and what is allowed, so the CLI and the server name
the flag or ``param`` without reading the message."""

import pytest

from diffbatch import GenerationSpec, SpecError
from diffbatch.io.images import init_image_size
from diffbatch.spec import parse_size, spec_from_record


@pytest.mark.parametrize("kwargs, field", [
    ({"num_inference_steps": 0}, "num_inference_steps"), ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"height": 5}, "height"), ({"scheduler": "warp"}, "scheduler"), ({"strength": 2.0}, "strength"),
])
def test_a_spec_error_names_its_field_value_and_what_is_allowed(kwargs, field):
    with pytest.raises(SpecError) as caught:
        GenerationSpec(prompt="x", **kwargs)
    error = caught.value
    assert (error.field, error.value) == (field, kwargs[field]) and error.reason
    assert str(error) == f"{field}={kwargs[field]!r} is invalid: {error.reason}"


def test_a_record_error_keeps_the_field_under_its_location():
    with pytest.raises(SpecError) as caught:
        spec_from_record({"prompt": "x", "num_inference_steps": "many"}, "job.jsonl:3")
    assert caught.value.field == "num_inference_steps" and str(caught.value).startswith("job.jsonl:3: ")
    with pytest.raises(SpecError) as caught:
        spec_from_record({"prompt": "x", "colour": "red"}, "job.jsonl:4")
    assert caught.value.field == "colour"


def test_size_and_image_errors_name_their_inputs(tmp_path):
    with pytest.raises(SpecError) as caught:
        parse_size("big")
    assert caught.value.field == "size"
    assert parse_size(" 512 X 768 ") == (512, 768)
    with pytest.raises(ValueError) as image_error:
        init_image_size(tmp_path / "missing.png")
    assert image_error.value.field == "image"
