"""Textual-inversion embeddings per request (adapters/embeddings.py): a prompt naming one is diffusers' image
with the embedding loaded by ``load_textual_inversion``; a prompt naming none is the image made without the
folder; in one batch, each is its image alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from diffbatch import Engine, GenerationSpec, SpecError
from diffbatch.io.infotext import parse_infotext
from diffbatch.io.writer import format_parameters

HIDDEN = 16  # the tiny SD's text encoder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three formats: A1111's .pt (string_to_param) and .safetensors (emb_params), and diffusers' learned_embeds;
    and a file that is no embedding."""
    folder = tmp_path_factory.mktemp("embeddings")
    generator = torch.Generator().manual_seed(0)
    torch.save({"string_to_param": {"*": torch.randn(2, HIDDEN, generator=generator)}, "name": "glow"},
               folder / "glow.pt")
    save_file({"emb_params": torch.randn(3, HIDDEN, generator=generator)}, str(folder / "haze.safetensors"))
    save_file({"<fog>": torch.randn(HIDDEN, generator=generator)}, str(folder / "fog.safetensors"))
    (folder / "broken.pt").write_bytes(b"not a tensor file")
    save_file({"emb_params": torch.randn(2, 32, generator=generator)}, str(folder / "wide.safetensors"))
    return folder


@pytest.fixture(scope="module")
def engine(tiny_sd_path, folder) -> Engine:
    return Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", embeddings_dir=folder)


def spec(prompt: str, **fields) -> GenerationSpec:
    return GenerationSpec(prompt=prompt, seed=fields.pop("seed", 3), num_inference_steps=3, **fields)


@pytest.mark.parametrize("name", ["glow", "haze", "fog"])
def test_a_prompt_naming_an_embedding_is_diffusers_with_it_loaded(engine, tiny_sd_path, folder, name):
    prompt = f"a dot, {name}"
    result = engine.generate([spec(prompt, negative_prompt="dark")])[0]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    path = next(p for p in folder.iterdir() if p.stem == name)
    pipe.load_textual_inversion(str(path), token=name)  # diffusers' own: the name's tokens become the vectors
    reference = pipe(prompt, negative_prompt="dark", num_inference_steps=3,
                     generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    assert np.abs(result.pixels - reference).max() <= 1e-4
    assert result.ti_hashes[0][0] == name
    plain = engine.generate([spec("a dot, xyz", negative_prompt="dark")])[0]
    assert not np.array_equal(plain.pixels, result.pixels)


def test_rows_without_an_embedding_are_unchanged_and_a_batch_is_each_image_alone(engine, tiny_sd_path):
    specs = [spec("a dot, glow"), spec("a dot"), spec("(haze:1.2) dot", negative_prompt="fog", seed=4),
             spec("a dot, unknownname")]
    batched = engine.generate(specs)
    for s, result in zip(specs, batched, strict=True):
        assert np.array_equal(result.pixels, engine.generate([s])[0].pixels), s.prompt
    without = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")
    for k in (1, 3):  # no embedding named (a name with no file stays text, as in A1111)
        assert np.array_equal(batched[k].pixels, without.generate([specs[k]])[0].pixels)


def test_ti_hashes_are_written_as_a1111_writes_them(engine):
    result = engine.generate([spec("a dot, glow")])[0]
    text = format_parameters(result.spec, result.sampler, result.model, ti_hashes=result.ti_hashes)
    assert f'TI hashes: "glow: {result.ti_hashes[0][1]}"' in text
    assert not parse_infotext(text).refused


@pytest.mark.parametrize(("prompt", "says"), [("a dot, broken", "not a textual-inversion embedding"),
                                              ("a dot, wide", "an embedding for another model")])
def test_a_file_that_is_no_embedding_for_this_model_is_refused_naming_it_not_its_path(engine, folder, prompt, says):
    with pytest.raises(SpecError) as caught:
        engine.resolve(spec(prompt), seed=1)
    assert caught.value.field == "prompt" and str(folder) not in str(caught.value)
    assert says in str(caught.value) or says in (caught.value.reason or "")


def test_whether_an_embedding_applies_does_not_depend_on_earlier_requests(tiny_sd_path, folder):
    """Every embedding is loaded when the engine starts: CLIP splits "glow-x" so that "glow" stands alone, and
    it is the embedding on a fresh engine as after a request that named "glow"."""
    fresh = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", embeddings_dir=folder)
    first = fresh.generate([spec("a glow-x")])[0]
    used = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", embeddings_dir=folder)
    used.generate([spec("a glow")])
    assert np.array_equal(first.pixels, used.generate([spec("a glow-x")])[0].pixels)
    assert [name for name, _ in first.ti_hashes] == ["glow"]  # the embeddings it was made with


def test_an_sdxl_embedding_gives_each_encoder_its_vectors_by_width(tmp_path):
    from diffbatch.adapters.embeddings import EmbeddingBank

    save_file({"clip_l": torch.ones(2, 16), "clip_g": torch.zeros(2, 32)}, str(tmp_path / "xl.safetensors"))
    assert [v.shape[-1] for v in EmbeddingBank(tmp_path, (16, 32)).loaded()[0].vectors] == [16, 32]  # SDXL
    assert EmbeddingBank(tmp_path, (32,)).loaded()[0].vectors[0].shape[-1] == 32  # its refiner: CLIP-G only


def test_a_folder_that_cannot_be_read_is_refused_at_start(tiny_sd_path, tmp_path):
    from diffbatch.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="--embeddings-dir .*missing: cannot read it as a folder"):
        Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", embeddings_dir=tmp_path / "missing")


def test_an_embedding_in_the_hires_prompt_is_in_the_ti_hashes(engine):
    result = engine.generate([spec("a dot", hires_scale=1.5, hires_steps=2, hires_prompt="a dot, glow")])[0]
    assert [name for name, _ in result.ti_hashes] == ["glow"]
