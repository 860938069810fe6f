"""LoRAs per request in one batch: every image may carry its own LoRAs and weights, still one denoiser call per
step. Each image equals diffusers' pipeline for that image alone (``load_lora_weights`` + ``set_adapters``,
CPU generator, float32, <= 1e-4), and is the same alone and batched. Random LoRAs made with PEFT on the tiny
pipelines, saved by diffusers, one converted to kohya's key names."""

from __future__ import annotations

from extras import need

need("peft")  # before the imports that need them: a clear skip without the extra

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import save_file

from diffbatch import Engine, GenerationSpec
from diffbatch.cli import main
from diffbatch.errors import SpecError
from diffbatch.server import ServerConfig
from tiny import save_tiny_sd
from tiny_lora import save_random_lora, to_kohya
from tiny_sdxl import save_tiny_sdxl

STEPS = 3


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lora-sd")
    model = save_tiny_sd(root / "model")
    loras = root / "loras"
    a = save_random_lora(StableDiffusionPipeline, model, loras / "a.safetensors", seed=1, rank=4, alpha=8.0)
    save_random_lora(StableDiffusionPipeline, model, loras / "b.safetensors", seed=2, rank=2, alpha=2.0)
    to_kohya(a, loras / "a_kohya.safetensors", alpha=8.0)
    return model, loras


def oracle(pipe_class, model: Path, loras: Path, names: list[str], size: int = 32):
    pipe = pipe_class.from_pretrained(model, **({"safety_checker": None, "requires_safety_checker": False}
                                                if pipe_class is StableDiffusionPipeline else {}))
    pipe.set_progress_bar_config(disable=True)
    for name in names:
        pipe.load_lora_weights(str(loras / f"{name}.safetensors"), adapter_name=name)

    def run(spec: GenerationSpec) -> np.ndarray:
        if spec.loras:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in spec.loras], [w for _, w in spec.loras])
        else:
            pipe.disable_lora()
        return pipe(spec.prompt, negative_prompt=spec.negative_prompt or None, num_inference_steps=STEPS,
                    guidance_scale=spec.guidance_scale, height=size, width=size, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(spec.seed)).images[0]
    return run


MIXED = [GenerationSpec(prompt="a red circle", seed=1, num_inference_steps=STEPS),
         GenerationSpec(prompt="a red circle", seed=1, num_inference_steps=STEPS, loras={"a": 0.5}),
         GenerationSpec(prompt="a blue star <lora:a:1.0>", seed=2, num_inference_steps=STEPS, guidance_scale=1.0),
         GenerationSpec(prompt="a red circle", seed=3, num_inference_steps=STEPS, loras={"a": 0.7, "b": 0.3},
                        negative_prompt="blurry"),
         GenerationSpec(prompt="a green square <lora:b>", seed=4, num_inference_steps=STEPS)]


@pytest.mark.parametrize("form", ["fused", "per_adapter"])
def test_a_mixed_batch_equals_diffusers_per_image_and_each_image_alone(sd, form, monkeypatch):
    # fused: each row's LoRAs in one pair of batched GEMMs per rank bucket; per_adapter: rank sums too large
    # for any bucket (no bucket here), each LoRA on its rows
    if form == "per_adapter":
        monkeypatch.setattr("diffbatch.adapters.lora.FUSED_RANKS", ())
    model, loras = sd
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32", lora_dir=loras, max_batch_size=8)
    batched = engine.generate(MIXED)
    assert [r.spec.loras for r in batched] == [(), (("a", 0.5),), (("a", 1.0),), (("a", 0.7), ("b", 0.3)),
                                               (("b", 1.0),)]
    assert batched[2].spec.prompt == "a blue star" and batched[4].spec.prompt == "a green square"
    reference = oracle(StableDiffusionPipeline, model, loras, ["a", "b"])
    for result in batched:
        assert np.abs(result.pixels - reference(result.spec)).max() <= 1e-4, result.spec.loras
    alone = Engine.from_pretrained(model, device="cpu", dtype="float32", lora_dir=loras, max_batch_size=1)
    for result in batched:
        assert np.array_equal(alone.generate([result.spec], resolved=True)[0].pixels, result.pixels)
    assert not np.array_equal(batched[0].pixels, batched[1].pixels)  # the LoRA changes the image


def test_a_kohya_lora_equals_diffusers_loading_the_same_file(sd):
    # kohya's (AUTOMATIC1111's) key names go through diffusers' own conversion; the oracle loads the same file
    model, loras = sd
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32", lora_dir=loras)
    spec = dataclasses.replace(MIXED[1], loras={"a_kohya": 0.5})
    made = engine.generate([spec, MIXED[0]])[0]
    assert np.abs(made.pixels - oracle(StableDiffusionPipeline, model, loras, ["a_kohya"])(made.spec)).max() <= 1e-4
    assert np.abs(made.pixels - engine.generate([MIXED[0]])[0].pixels).max() > 1e-3  # it does something


def test_sdxl_lora_equals_diffusers(tmp_path):
    model = save_tiny_sdxl(tmp_path / "sdxl")
    save_random_lora(StableDiffusionXLPipeline, model, tmp_path / "loras" / "s.safetensors", seed=3)
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32", lora_dir=tmp_path / "loras")
    spec = GenerationSpec(prompt="a red circle", seed=5, num_inference_steps=STEPS, loras={"s": 0.8})
    plain, styled = engine.generate([dataclasses.replace(spec, loras={}), spec])
    reference = oracle(StableDiffusionXLPipeline, model, tmp_path / "loras", ["s"])
    assert np.abs(styled.pixels - reference(styled.spec)).max() <= 1e-4
    assert np.abs(plain.pixels - reference(plain.spec)).max() <= 1e-4


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a cat <lora:a:0.25>", ("a cat", (("a", 0.25),))), ("<lora:a> a cat", ("a cat", (("a", 1.0),))),
    ("a <lora:a:0.5> cat <lora:b:-1>", ("a cat", (("a", 0.5), ("b", -1.0)))), ("a cat", ("a cat", ()))])
def test_a1111_tags_leave_the_prompt_for_loras(sd, prompt, expected):
    model, loras = sd
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32", lora_dir=loras)
    resolved = engine.resolve(GenerationSpec(prompt=prompt), seed=0)
    assert (resolved.prompt, resolved.loras) == expected


@pytest.mark.parametrize(("fields", "field", "message"), [
    ({"prompt": "a <lora:a:heavy>"}, "prompt", "not a number"),
    ({"prompt": "a <lora:a:0.5"}, "prompt", "malformed"),
    ({"loras": {"nope": 1.0}}, "loras", "unknown LoRA 'nope'"),
    ({"loras": {"junk": 1.0}}, "loras", "cannot be loaded into this model"),
    ({"loras": {"xl": 1.0}}, "loras", "cannot be loaded into this model"),
])
def test_bad_loras_are_refused_naming_the_field(sd, tmp_path, fields, field, message):
    model, loras = sd
    folder = tmp_path / "loras"
    folder.mkdir()
    for path in loras.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    save_file({"some.weight": torch.ones(2)}, folder / "junk.safetensors")  # a safetensors file, not a LoRA
    xl = save_tiny_sdxl(tmp_path / "sdxl")  # a LoRA for another architecture: shapes do not fit
    save_random_lora(StableDiffusionXLPipeline, xl, folder / "xl.safetensors", seed=4)
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32", lora_dir=folder)
    with pytest.raises(SpecError, match=message) as refused:
        engine.generate([GenerationSpec(**{"prompt": "x", "num_inference_steps": 2, **fields})])
    assert refused.value.field == field
    assert engine.generate([MIXED[1]])[0].spec.loras == (("a", 0.5),)  # the engine keeps working


def test_weights_must_be_finite_numbers():
    for weight in (float("nan"), float("inf"), "1"):
        with pytest.raises(SpecError, match="loras"):
            GenerationSpec(prompt="x", loras={"a": weight})


def test_cli_job_with_loras_writes_tags_hashes_and_manifest(sd, tmp_path, capsys):
    model, loras = sd
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "a red circle", "loras": {"a": 0.5}}) + "\n"
                   + json.dumps({"prompt": "a star <lora:b:0.75>"}) + "\n")
    out = tmp_path / "out"
    assert main(["generate", str(job), "--model", str(model), "--lora-dir", str(loras), "--out", str(out),
                 "--steps", "2", "--no-gallery"]) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["loras"] for r in sorted(records, key=lambda r: r["index"])] == [[["a", 0.5]], [["b", 0.75]]]
    text = Image.open(out / "00001-1.png").text["parameters"]
    assert text.startswith("a star <lora:b:0.75>\n") and 'Lora hashes: "b: ' in text
    again = tmp_path / "again"  # --from reads the tags back: the same file
    assert main(["generate", "--from", str(out / "00001-1.png"), "--model", str(model), "--lora-dir", str(loras),
                 "--out", str(again), "--no-gallery"]) == 0
    assert (again / "00000-1.png").read_bytes() == (out / "00001-1.png").read_bytes()
    bad = tmp_path / "bad"
    assert main(["generate", "--prompt", "x <lora:nope:1>", "--model", str(model), "--lora-dir", str(loras),
                 "--out", str(bad)]) == 2
    assert "unknown LoRA 'nope'" in capsys.readouterr().err and not bad.exists()


def test_api_loras_field_and_a_bad_lora_leave_the_server_serving(sd, tmp_path):
    model, loras = sd
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32", lora_dir=loras)
    folder = tmp_path / "loras"
    config = ServerConfig(data_dir=tmp_path / "data", lora_dir=loras)
    need("fastapi", "httpx")  # the server extra, for this test alone
    from fastapi.testclient import TestClient

    from diffbatch.server import create_app

    with TestClient(create_app(config, engine)) as client:
        body = {"prompt": "a red circle", "seed": 1, "num_inference_steps": STEPS, "loras": {"a": 0.5}}
        good = client.post("/v1/images/generations", json=body)
        assert good.status_code == 200, good.text
        assert good.json()["data"][0]["settings"]["loras"] == [["a", 0.5]]
        unknown = client.post("/v1/images/generations", json={**body, "loras": {"nope": 1}})
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "loras"
        assert client.post("/v1/images/generations", json=body).status_code == 200
    assert not folder.exists()


def test_more_loras_in_flight_than_the_cache_holds_are_loaded_again_when_their_turn_comes(sd):
    model, loras = sd
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32", lora_dir=loras, max_batch_size=1)
    engine.loras.capacity = 1  # "a" is evicted by "b" at admission, then needed again by the first request
    made = engine.generate([MIXED[1], dataclasses.replace(MIXED[4], prompt="a green square", loras={"b": 1.0})])
    reference = oracle(StableDiffusionPipeline, model, loras, ["a", "b"])
    for result in made:
        assert np.abs(result.pixels - reference(result.spec)).max() <= 1e-4
