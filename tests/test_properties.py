"""Property tests (Hypothesis): spec validation and the prompts-file parser meet arbitrary input with either a
result or diffbatch's own error naming the input, never another exception."""

from __future__ import annotations

import io

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e .[test])")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from diffbatch.errors import DiffbatchError  # noqa: E402
from diffbatch.io.prompts import JobSource, read_job  # noqa: E402
from diffbatch.spec import FIELDS, GenerationSpec, spec_from_record  # noqa: E402

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                               max_size=3), max_leaves=8)
RECORDS = st.dictionaries(st.sampled_from([*FIELDS, "unknown", ""]), JSON, max_size=6)


@settings(max_examples=300, deadline=None)
@given(RECORDS)
def test_any_json_record_is_a_spec_or_a_spec_error_naming_the_line(record):
    try:
        spec = spec_from_record(record, "job.jsonl:7")
    except DiffbatchError as exc:
        assert str(exc).startswith("job.jsonl:7: ")
        return
    assert isinstance(spec, GenerationSpec) and spec_from_record(spec.to_record()) == spec
    assert spec.image is None or isinstance(spec.image, str)  # a JSON image field is a path, or refused


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_on_stdin_is_a_job_or_an_input_error(text):
    try:
        items = read_job(JobSource(prompts_file="-"), stdin=io.StringIO(text))
    except DiffbatchError:
        return
    assert items and all(isinstance(item.spec, GenerationSpec) for item in items)
