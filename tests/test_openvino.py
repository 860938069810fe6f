"""The OpenVINO backend (``backend="openvino"``): the denoiser, the VAE and the text encoders run as OpenVINO
models converted from the loaded diffusers modules. Images equal diffusers' own pipeline (float32, <= 1e-4), stay
batch-invariant (fixed call shape), and a second engine reuses the disk cache instead of converting again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline, StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

from diffbatch import Engine, GenerationSpec
from diffbatch.adapters.openvino import DENOISER_ROWS, OpenVINOModule, check_openvino
from diffbatch.cli import main
from diffbatch.errors import ModelLoadError
from diffbatch.hardware import native_bfloat16
from helpers import DiffusersOracle, noise_image
from tiny_flow import PipelineOracle, save_tiny_flux, save_tiny_sd3
from tiny_sdxl import SDXLOracle, save_tiny_sdxl

ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install -e '.[openvino]')")
pytestmark = pytest.mark.slow  # each family's conversion: 10-17 s

SPECS = [GenerationSpec(prompt="a red circle", seed=1, num_inference_steps=3),
         GenerationSpec(prompt="a blue star", seed=2, num_inference_steps=2, scheduler="euler_a", guidance_scale=1.0),
         GenerationSpec(prompt="a green square", seed=3, num_inference_steps=3, scheduler="dpm++_2m",
                        negative_prompt="blurry", guidance_rescale=0.5),
         GenerationSpec(prompt="a pink ring", seed=4, num_inference_steps=4, image=noise_image(32, 5), strength=0.6)]


@pytest.fixture(scope="module")
def converted(tiny_sd_path, tmp_path_factory) -> dict:
    """The tiny SD converted once, into a fresh cache, watched: which OpenVINO conversions ran and which torch
    methods ran during them, the images the converting engine made (text-to-image and image-to-image: every
    model). The tests below read this cache instead of converting the same modules again (~8 s each time)."""
    cache = tmp_path_factory.mktemp("openvino-sd")
    converting, torch_calls, convert = [], [], ov.convert_model

    def converting_now(*args, **kwargs):
        converting.append(True)
        try:
            return convert(*args, **kwargs)
        finally:
            converting.pop()

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFBATCH_CACHE", str(cache))
        first = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", backend="openvino")
        pipe = first.adapter.pipe
        patch.setattr(ov, "convert_model", converting_now)
        for module, name in ((pipe.text_encoder, "forward"), (pipe.vae, "decode"), (pipe.vae, "_encode")):
            torch_method = getattr(type(module), name)

            def counting(*args, _method=torch_method, _name=name, **kwargs):
                torch_calls.append((_name, bool(converting)))
                return _method(*args, **kwargs)

            patch.setattr(type(module), name, counting)
        made = [r.pixels for r in first.generate([SPECS[0], SPECS[3]])]  # text-to-image and image-to-image
    folders = {p.parent for p in cache.rglob("*.xml")}  # as the conversion left them, before any test reads them
    return {"cache": cache, "torch_calls": torch_calls, "made": made, "pipe": pipe, "folders": folders,
            "scratch": list(cache.rglob(".tmp-*"))}


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch) -> Path:
    """The cache every test converts into unless it sets its own."""
    folder = tmp_path_factory.getbasetemp() / "openvino-cache"
    monkeypatch.setenv("DIFFBATCH_CACHE", str(folder))
    return folder


@pytest.fixture
def sd_converted(converted, monkeypatch) -> None:
    """This test reads the tiny SD's watched conversions (it converts nothing)."""
    monkeypatch.setenv("DIFFBATCH_CACHE", str(converted["cache"]))


@pytest.fixture(scope="module")
def oracle(tiny_sd_path):
    return DiffusersOracle(tiny_sd_path)


def test_images_equal_diffusers_and_do_not_depend_on_the_batch(tiny_sd_path, oracle, sd_converted):
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", backend="openvino")
    batched = engine.generate(SPECS)
    for spec, result in zip(SPECS, batched, strict=True):
        assert np.abs(result.pixels - oracle(result.spec)).max() <= 1e-4, spec.prompt
    alone = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", backend="openvino", max_batch_size=1)
    for result in batched:  # other neighbours, other padding: the same bits
        assert np.array_equal(alone.generate([result.spec], resolved=True)[0].pixels, result.pixels)


def test_every_denoiser_call_has_the_fixed_row_count(tiny_sd_path, sd_converted, monkeypatch):
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", backend="openvino")
    rows = []
    denoiser = engine.adapter.denoiser
    original = denoiser.__call__

    def counting(*args, **kwargs):
        rows.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.adapter, "denoiser", counting)
    engine.generate(SPECS[:3])  # 5 rows on the first step (two with CFG, one without), fewer later
    assert rows and set(rows) == {DENOISER_ROWS}


def test_every_model_runs_on_openvino_and_a_second_engine_loads_the_cached_conversions(tiny_sd_path, converted,
                                                                                        sd_converted, monkeypatch):
    torch_calls = converted["torch_calls"]
    # torch ran each of them, and only while OpenVINO traced it
    assert {name for name, _ in torch_calls} == {"forward", "decode", "_encode"} and all(t for _, t in torch_calls)
    assert isinstance(converted["pipe"].text_encoder.forward, OpenVINOModule)
    # UNet, text encoder, VAE decoder and encoder
    assert len(converted["folders"]) == 4 and not converted["scratch"]

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(ov, "convert_model", no_conversion)
    second = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", backend="openvino")
    made = second.generate([SPECS[0], SPECS[3]])
    assert all(np.array_equal(r.pixels, m) for r, m in zip(made, converted["made"], strict=True))


def test_sdxl_nested_conditioning_converts_and_matches_diffusers(tmp_path):
    folder = save_tiny_sdxl(tmp_path / "sdxl")
    engine = Engine.from_pretrained(folder, device="cpu", dtype="float32", backend="openvino")
    spec = GenerationSpec(prompt="a red circle", seed=5, num_inference_steps=3)
    result = engine.generate([spec])[0]
    assert np.abs(result.pixels - SDXLOracle(folder)(result.spec)).max() <= 1e-4


def test_flux_unbatched_ids_and_guidance_convert_and_match_diffusers(tmp_path):
    folder = save_tiny_flux(tmp_path / "flux")
    engine = Engine.from_pretrained(folder, device="cpu", dtype="float32", backend="openvino")
    spec = GenerationSpec(prompt="a red circle", seed=5, num_inference_steps=3, height=32, width=32)
    result = engine.generate([spec])[0]
    assert np.abs(result.pixels - PipelineOracle(folder, FluxPipeline, FluxImg2ImgPipeline)(result.spec)).max() <= 1e-4


@pytest.mark.skipif(not native_bfloat16(), reason="this CPU has no native bfloat16 (AMX or AVX512_BF16)")
def test_bfloat16_converts_every_model_from_a_float32_copy(tiny_sd_path, converted, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFBATCH_CACHE", str(tmp_path / "cache"))  # bfloat16 converts here, from a float32 copy
    specs = [SPECS[0], SPECS[3]]  # every model: text encoder, UNet, VAE decoder and encoder
    fast = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="bfloat16", backend="openvino")
    for low, high in zip(fast.generate(specs), converted["made"], strict=True):  # float32 OpenVINO's images
        assert np.abs(low.pixels - high).mean() < 0.05  # bfloat16 rounding, not another image
    assert isinstance(fast.adapter.pipe.vae.decode, OpenVINOModule)  # the copy left the installed models


def test_sd3_three_text_encoders_convert_and_match_diffusers(tmp_path):
    folder = save_tiny_sd3(tmp_path / "sd3")  # two CLIPs (hidden states, pooled) and a T5
    engine = Engine.from_pretrained(folder, device="cpu", dtype="float32", backend="openvino")
    spec = GenerationSpec(prompt="a red circle", seed=5, num_inference_steps=3, height=32, width=32,
                          negative_prompt="blurry")
    result = engine.generate([spec])[0]
    oracle = PipelineOracle(folder, StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline)
    assert np.abs(result.pixels - oracle(result.spec)).max() <= 1e-4


def test_bad_backend_settings_are_refused_before_loading(tiny_sd_path, tmp_path, capsys, monkeypatch):
    with pytest.raises(ModelLoadError, match="backend 'tensorrt' is invalid: must be one of torch, openvino"):
        Engine.from_pretrained(tiny_sd_path, device="cpu", backend="tensorrt")
    with pytest.raises(ModelLoadError, match="CPU only"):
        check_openvino(torch.device("cuda"), torch.float16)
    with pytest.raises(ModelLoadError, match="float32 or bfloat16, not float16"):
        Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float16", backend="openvino")
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)  # as if the extra were not installed
    out = tmp_path / "out"
    assert main(["generate", "--prompt", "x", "--model", str(tiny_sd_path), "--out", str(out),
                 "--backend", "openvino"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'diffbatch[openvino]'" in err and err.count("\n") == 1 and not out.exists()
