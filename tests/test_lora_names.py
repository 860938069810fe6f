"""A LoRA is named by its file name in the LoRA folder (``--lora-dir``): a request can neither load a file outside
it nor learn whether one exists (every refusal is the same message, with no path in it). Only a local
``generate`` (``lora_paths``) may also name a LoRA by its file's path."""

from __future__ import annotations

from extras import need

need("peft")  # before the imports that need them: a clear skip without the extra

import json
from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from diffbatch import Engine, GenerationSpec
from diffbatch.cli import main
from diffbatch.errors import SpecError, shown
from diffbatch.resolver import Resolver
from diffbatch.server import ServerConfig
from tiny import save_tiny_sd
from tiny_lora import save_random_lora


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> dict[str, Path]:
    """A model, a LoRA folder holding ``a`` (and ``empty``, not a LoRA), and a LoRA outside it, in
    ``secret/x.safetensors``."""
    root = tmp_path_factory.mktemp("lora-names")
    model = save_tiny_sd(root / "model")
    loras, secret = root / "loras", root / "secret"
    save_random_lora(StableDiffusionPipeline, model, loras / "a.safetensors", seed=1, rank=2, alpha=2.0)
    save_random_lora(StableDiffusionPipeline, model, secret / "x.safetensors", seed=2, rank=2, alpha=2.0)
    (loras / "empty.safetensors").write_bytes(b"")  # a name in the folder, but not a LoRA
    return {"root": root, "model": model, "loras": loras, "secret": secret}


def refusal(resolver: Resolver, name: str) -> SpecError:
    with pytest.raises(SpecError) as refused:
        resolver.lora_path(name)
    assert refused.value.field == "loras"
    return refused.value


def message_without(error: SpecError, name: str) -> str:
    return str(error).replace(shown(name), "NAME")


OUTSIDE = ["../secret/x", "..", "a/../../secret/x", "~/x", "a/b", "a\\b", "..\\secret\\x", "a\0b", "", "a" * 201,
           "loras/a", "./a"]


@pytest.mark.parametrize("name", OUTSIDE, ids=lambda name: repr(name[:12]))
def test_a_name_that_is_not_a_file_name_in_the_folder_is_refused_as_unknown(disk, name):
    resolver = Resolver.for_model(disk["model"], disk["loras"])
    error = refusal(resolver, name)
    assert message_without(error, name) == message_without(refusal(resolver, "missing"), "missing")
    assert str(disk["root"]) not in str(error)


def test_absolute_paths_are_refused_whether_the_file_exists_or_not(disk):
    resolver = Resolver.for_model(disk["model"], disk["loras"])
    for name in (str(disk["secret"] / "x"), str(disk["secret"] / "x.safetensors"), str(disk["loras"] / "a")):
        assert message_without(refusal(resolver, name), name) == message_without(refusal(resolver, "nope"), "nope")


def test_an_existing_file_outside_the_folder_and_a_missing_one_give_the_same_message(disk, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    loras = tmp_path / "loras"
    (loras / "inside").mkdir(parents=True)
    resolver = Resolver.for_model(disk["model"], loras)
    name = "../secret/x"
    missing = str(refusal(resolver, name))
    (secret / "x.safetensors").write_bytes((disk["secret"] / "x.safetensors").read_bytes())
    (loras / "inside" / "y.safetensors").write_bytes(b"")
    assert str(refusal(resolver, name)) == missing
    assert str(refusal(resolver, "inside/y")) == missing.replace(repr(name), repr("inside/y"))
    assert str(tmp_path) not in missing


def test_without_a_lora_folder_every_name_is_refused_alike(disk):
    resolver = Resolver.for_model(disk["model"])
    outside = str(disk["secret"] / "x.safetensors")
    assert message_without(refusal(resolver, "a"), "a") == message_without(refusal(resolver, outside), outside)


def test_a_link_the_operator_put_in_the_folder_is_followed_but_no_name_passes_through_one(disk, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "linked.safetensors").symlink_to(disk["secret"] / "x.safetensors")  # e.g. a Hugging Face snapshot
    (loras / "elsewhere").symlink_to(disk["secret"], target_is_directory=True)
    resolver = Resolver.for_model(disk["model"], loras)
    assert resolver.lora_path("linked") == (disk["secret"] / "x.safetensors").resolve()
    assert message_without(refusal(resolver, "elsewhere/x"), "elsewhere/x") == message_without(
        refusal(resolver, "nope"), "nope")


def test_a_valid_name_still_resolves_in_the_folder(disk):
    resolver = Resolver.for_model(disk["model"], disk["loras"])
    assert resolver.lora_path("a") == (disk["loras"] / "a.safetensors").resolve()
    spec = resolver.resolve(GenerationSpec(prompt="a cat <lora:a:0.5>", loras={"a": 0.5}), seed=1)
    assert spec.loras == (("a", 0.5),)


def test_a_local_run_may_still_name_a_lora_by_its_path(disk):
    resolver = Resolver.for_model(disk["model"], disk["loras"], lora_paths=True)
    outside = disk["secret"] / "x.safetensors"
    assert resolver.lora_path(str(outside)) == outside.resolve()
    assert resolver.lora_path("../secret/x") == outside.resolve()  # as before: the folder's DIR/NAME.safetensors
    assert resolver.lora_path("a") == (disk["loras"] / "a.safetensors").resolve()
    with pytest.raises(SpecError, match="unknown LoRA"):
        resolver.lora_path("a" * 5000)  # too long for the file system: refused, not an OSError


def test_the_cli_generate_accepts_a_lora_path(disk, tmp_path, capsys):
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "a red circle", "loras": {str(disk["secret"] / "x.safetensors"): 0.5}}))
    out = tmp_path / "out"
    code = main(["generate", str(job), "--model", str(disk["model"]), "--lora-dir", str(disk["loras"]), "--out",
                 str(out), "--steps", "2", "--no-gallery"])
    assert code == 0, capsys.readouterr().err


def test_the_server_refuses_paths_in_loras_and_in_tags_with_one_message(disk):
    engine = Engine.from_pretrained(disk["model"], device="cpu", dtype="float32", lora_dir=disk["loras"])
    config = ServerConfig(data_dir=disk["root"] / "data", lora_dir=disk["loras"])
    body = {"prompt": "a red circle", "seed": 1, "num_inference_steps": 2, "size": "32x32"}
    need("fastapi", "httpx")  # the server extra, for this test alone
    from fastapi.testclient import TestClient

    from diffbatch.server import create_app

    with TestClient(create_app(config, engine)) as client:
        answers = {}
        for name in ("../secret/x", "../secret/missing", str(disk["secret"] / "x"), "nope"):
            for fields in ({"loras": {name: 1}}, {"prompt": f"a red circle <lora:{name}:1>"}):
                answer = client.post("/v1/images/generations", json={**body, **fields})
                assert answer.status_code == 400 and answer.json()["error"]["param"] == "loras", answer.text
                answers[name, str(fields)[:8]] = answer.json()["error"]["message"].replace(repr(name), "NAME")
        assert len(set(answers.values())) == 1, answers
        assert str(disk["root"]) not in next(iter(answers.values()))
        broken = client.post("/v1/images/generations", json={**body, "loras": {"empty": 1}})
        assert broken.status_code == 400 and "cannot be loaded" in broken.text
        assert str(disk["root"]) not in broken.json()["error"]["message"]
        good = client.post("/v1/images/generations", json={**body, "loras": {"a": 0.5}})
        assert good.status_code == 200, good.text
