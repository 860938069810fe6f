"""A request field is declared once (spec.EDGES, issue 21): every GenerationSpec field reaches the spec through
every edge (the generations JSON body, the edits form, batch lines, the ``generate`` flags) or the table says
how that edge sets it instead, and a field with an AUTOMATIC1111 key comes back from the PNG it is written to.
A new field without an example below fails here, so it cannot be forgotten at an edge. Then the ``cache``
field at each edge: a bad value is refused naming it, a good one reaches the spec."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from diffbatch import Engine
from diffbatch.cli import main
from diffbatch.errors import SpecError
from diffbatch.io.gallery import parameters_line
from diffbatch.io.infotext import parse_infotext
from diffbatch.io.writer import format_parameters
from diffbatch.server import ServerConfig
from diffbatch.spec import BODY, EDGES, EDITS, FIELDS, GenerationSpec, ModelDefaults
from extras import need

# A valid value of every field but ``image`` (which each edge takes its own way: an upload, a path, a line).
EXAMPLES = {"prompt": "a red circle", "negative_prompt": "blue", "seed": 7, "num_inference_steps": 3,
            "guidance_scale": 5.5, "height": 32, "width": 48, "strength": 0.5, "scheduler": "ddim",
            "guidance_rescale": 0.25, "variation_seed": 11, "variation_strength": 0.125, "loras": {"tiny": 0.75},
            "cache": "deepcache:3", "emphasis": "no_norm", "clip_skip": 2, "schedule": "sgm_uniform", "eta": 0.5,
            "hires_scale": 1.5, "hires_steps": 4, "hires_upscaler": "lanczos", "hires_scheduler": "euler",
            "hires_prompt": "a red circle, sharp", "hires_negative_prompt": "blur"}
SIZE = {"size": "48x32"}  # width and height at the API (spec.EDGES: http)
BAD_CACHES = ["deepcache:1", "deepcache:11", "deepcache:x", "bogus", "fbcache", ""]


class Capture:
    """An engine (and its resolver) that keeps each spec it is asked to resolve and refuses it: what an edge made
    of its input, without a model."""

    def __init__(self) -> None:
        self.specs: list[GenerationSpec] = []
        self.resolver, self.defaults = self, ModelDefaults()

    def sampler_label(self, spec: GenerationSpec) -> str:
        return "Euler a"

    def resolve(self, spec: GenerationSpec, seed: int | None = None) -> GenerationSpec:
        self.specs.append(spec)
        raise SpecError("captured", field="captured")


def record(spec: GenerationSpec, names: Iterator[str] | tuple[str, ...]) -> dict:
    return {name: value for name, value in spec.to_record().items() if name in names}


def expected(names: Iterator[str] | tuple[str, ...]) -> dict:
    return record(GenerationSpec(**EXAMPLES), tuple(names))


def http_names(*ways: str) -> tuple[str, ...]:
    return tuple(name for name, edges in EDGES.items() if edges.http in ways)


@pytest.fixture(scope="module")
def engine(tiny_sd_path) -> Engine:
    return Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")


@pytest.fixture
def client(engine, tmp_path) -> Iterator:
    need("fastapi", "httpx")  # the server extra, for the tests that use it
    from fastapi.testclient import TestClient

    from diffbatch.server import create_app

    with TestClient(create_app(ServerConfig(data_dir=tmp_path / "data"), engine)) as client:
        yield client


@pytest.fixture
def captured(engine, monkeypatch) -> Capture:
    capture = Capture()
    monkeypatch.setattr(engine, "resolve", capture.resolve)
    return capture


def png_upload() -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), "red").save(buffer, format="PNG")
    return {"image": ("init.png", buffer.getvalue(), "image/png")}


def png_with_parameters(text: str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def form(fields: dict) -> dict[str, str]:
    return {name: json.dumps(value) if isinstance(value, dict) else str(value) for name, value in fields.items()}


# The table ------------------------------------------------------------------------------------------------
def test_every_field_has_an_example_and_says_how_each_edge_takes_it():
    assert set(EDGES) == set(FIELDS) and set(EXAMPLES) == set(FIELDS) - {"image"}
    for name, edges in EDGES.items():
        assert edges.http, name  # BODY, EDITS, or how the API sets it instead
        assert edges.flag is not None or edges.no_flag, f"{name}: a flag, or why there is none"
        assert edges.key is not None or edges.no_key, f"{name}: an AUTOMATIC1111 key, or how the PNG holds it"


# The edges ------------------------------------------------------------------------------------------------
def test_the_generations_body_takes_every_body_field_to_the_spec(client, captured):
    body = {name: EXAMPLES[name] for name in ("prompt", *http_names(BODY))}
    assert client.post("/v1/images/generations", json={**body, **SIZE}).status_code == 400  # refused by Capture
    names = ("prompt", "height", "width", *http_names(BODY))
    assert record(captured.specs[0], names) == expected(names)
    from diffbatch.server.schemas import ImageGenerationRequest  # the server extra (the client fixture)

    assert set(http_names(EDITS)).isdisjoint(ImageGenerationRequest.model_fields)


def test_the_edits_form_takes_every_form_field_to_the_spec(client, captured):
    fields = {name: EXAMPLES[name] for name in ("prompt", *http_names(BODY, EDITS))}
    response = client.post("/v1/images/edits", data=form({**fields, **SIZE}), files=png_upload())
    assert response.status_code == 400 and response.json()["error"]["param"] == "captured"
    names = ("prompt", "height", "width", *http_names(BODY, EDITS))
    assert record(captured.specs[0], names) == expected(names)
    from diffbatch.server.schemas import EDIT_FIELDS  # the server extra (the client fixture)

    assert set(http_names(BODY, EDITS)) <= set(EDIT_FIELDS)


def test_a_batch_line_takes_every_field_but_image_to_the_spec(client, captured):
    assert client.post("/v1/batches", content=json.dumps(EXAMPLES)).status_code == 400
    assert record(captured.specs[0], tuple(EXAMPLES)) == expected(EXAMPLES)


def test_the_generate_flags_take_every_flag_field_to_the_spec(monkeypatch, tmp_path, capsys):
    capture = Capture()
    monkeypatch.setattr("diffbatch.cli.load_engine", lambda args: capture)
    flags = [arg for name, edges in EDGES.items() if edges.flag is not None
             for arg in (edges.flag, str(EXAMPLES[name]))]
    init = tmp_path / "init.png"
    Image.new("RGB", (48, 32), "red").save(init)  # --strength applies to images with an init image only
    argv = ["generate", "--prompt", EXAMPLES["prompt"], "--seed", "7", "--size", "48x32", "--image", str(init), *flags]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2 and "captured" in capsys.readouterr().err
    names = ("prompt", "seed", "height", "width", *(name for name, edges in EDGES.items() if edges.flag))
    assert record(capture.specs[0], names) == expected(names)


def test_every_field_with_a_key_comes_back_from_the_png_parameters():
    spec = GenerationSpec(**EXAMPLES, image="init.png")
    found = parse_infotext(format_parameters(spec, "DDIM", "tiny")).fields
    keyed = [name for name, edges in EDGES.items() if edges.key is not None]
    assert {name: found[name] for name in keyed} == {name: getattr(spec, name) for name in keyed}


# cache at each edge -------------------------------------------------------------------------------------
def test_cache_is_written_only_when_on_so_older_pngs_are_unchanged():
    spec = GenerationSpec(**{**EXAMPLES, "cache": "off"})
    assert "Cache" not in format_parameters(spec, "DDIM", "tiny")
    text = format_parameters(GenerationSpec(**EXAMPLES), "DDIM", "tiny")
    assert "Variation seed strength: 0.125, Cache: deepcache:3" in text.splitlines()[-1]


@pytest.mark.parametrize("value", BAD_CACHES)
def test_a_bad_cache_is_400_naming_it_at_every_http_edge(client, value):
    responses = [client.post("/v1/images/generations", json={"prompt": "x", "cache": value}),
                 client.post("/v1/images/edits", data={"prompt": "x", "cache": value}, files=png_upload()),
                 client.post("/v1/batches", content=json.dumps({"prompt": "x", "cache": value}))]
    for response in responses:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "cache" and "deepcache:VALUE (2-10)" in error["message"], error


@pytest.mark.parametrize("value", BAD_CACHES)
def test_a_bad_cache_is_exit_2_naming_it_on_the_command_line(tmp_path, capsys, value):
    out = tmp_path / "out"
    assert main(["generate", "--prompt", "x", "--cache", value, "--out", str(out)]) == 2
    assert "--cache" in (err := capsys.readouterr().err) and "is invalid: must be off, auto" in err
    lines = tmp_path / "prompts.jsonl"
    lines.write_text(json.dumps({"prompt": "x", "cache": value}) + "\n")
    assert main(["generate", str(lines), "--out", str(out)]) == 2
    assert "prompts.jsonl:1" in (err := capsys.readouterr().err) and "cache=" in err
    assert not out.exists()


def test_a_png_with_a_bad_cache_is_refused_by_from(tmp_path, capsys):
    png = tmp_path / "made.png"
    text = format_parameters(GenerationSpec(**EXAMPLES), "DDIM", "tiny").replace("deepcache:3", "deepcache:99")
    png.write_bytes(png_with_parameters(text))
    assert main(["generate", "--from", str(png), "--out", str(tmp_path / "out")]) == 2
    assert "not honoured: Cache: deepcache:99 (must be off, auto" in capsys.readouterr().err  # as the PNG names it


def test_from_a_png_made_with_a_cache_asks_for_the_same_cache(monkeypatch, tmp_path, capsys):
    capture = Capture()
    monkeypatch.setattr("diffbatch.cli.load_engine", lambda args: capture)
    png = tmp_path / "made.png"
    png.write_bytes(png_with_parameters(format_parameters(GenerationSpec(**EXAMPLES), "DDIM", "tiny")))
    assert main(["generate", "--from", str(png), "--out", str(tmp_path / "out")]) == 2
    assert capture.specs[0].cache == "deepcache:3" and "captured" in capsys.readouterr().err


def test_the_parameters_endpoint_returns_the_cache_a_png_was_made_with(client):
    png = png_with_parameters(format_parameters(GenerationSpec(**EXAMPLES), "DDIM", "tiny"))
    response = client.post("/v1/images/parameters", files={"image": ("made.png", png, "image/png")})
    assert response.status_code == 200 and response.json()["fields"]["cache"] == "deepcache:3"


def test_cli_help_explains_every_cache_method(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--cache" in help_text and "deepcache:VALUE" in help_text and "fbcache:VALUE" in help_text



def test_the_gallery_caption_names_a_cache_only_when_on():
    record = GenerationSpec(**EXAMPLES).to_record()
    assert parameters_line(record).endswith(" · cache deepcache:3")
    assert "cache" not in parameters_line({**record, "cache": "off"}) and "cache" not in parameters_line(
        {k: v for k, v in record.items() if k != "cache"})
