"""Loading models: clear errors for what cannot be loaded."""

from __future__ import annotations

import json

import pytest

from diffbatch import Engine, ModelLoadError


def test_missing_model_path_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine.from_pretrained(str(tmp_path / "nope"), device="cpu")


def test_folder_that_is_not_a_pipeline_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline"):
        Engine.from_pretrained(tmp_path, device="cpu")


def test_unsupported_family_is_refused_naming_it(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDMPipeline"}))
    with pytest.raises(ModelLoadError, match="AudioLDMPipeline"):
        Engine.from_pretrained(tmp_path, device="cpu")


def test_hub_id_while_offline_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        Engine.from_pretrained("nobody/no-such-model", device="cpu")


def test_bad_dtype_is_refused(tiny_sd_path):
    with pytest.raises(ModelLoadError, match="dtype"):
        Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float8")


@pytest.mark.parametrize("device", ["gpu0", "cuda:99"])
def test_bad_or_missing_device_is_refused_naming_it(tiny_sd_path, device):
    with pytest.raises(ModelLoadError, match=f"device '{device}'"):
        Engine.from_pretrained(str(tiny_sd_path), device=device)


def test_cuda_without_cuda_is_refused_before_loading(tiny_sd_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="not available here: no CUDA"):
        Engine.from_pretrained(str(tiny_sd_path), device="cuda")


def test_model_loads_from_a_folder_with_its_defaults(tiny_sd_path):
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")
    assert (engine.defaults.height, engine.defaults.width, engine.defaults.vae_scale_factor) == (32, 32, 2)
    assert engine.model_name == tiny_sd_path.name


@pytest.mark.parametrize(("device", "native", "expected"), [
    ("cpu", True, "bfloat16"), ("cpu", False, "float32"), ("cuda", False, "float16"), ("cuda", True, "float16")])
def test_auto_dtype_is_the_fastest_exact_one_of_the_device(monkeypatch, device, native, expected):
    import torch

    from diffbatch.adapters import loading

    monkeypatch.setattr(loading, "native_bfloat16", lambda: native)
    for asked in ("auto", None):
        assert loading.resolve_dtype(asked, torch.device(device)) == getattr(torch, expected)
        big = loading.resolve_dtype(asked, torch.device(device), loading.BF16_MIN_DENOISER_BYTES)
        assert big == getattr(torch, expected)
        small = loading.resolve_dtype(asked, torch.device(device), 5_000_000)  # too small to gain from bfloat16
        assert small == (torch.float16 if device == "cuda" else torch.float32)


def test_bfloat16_on_a_cpu_that_would_emulate_it_is_refused_naming_the_cpu(monkeypatch, tiny_sd_path, tmp_path,
                                                                           capsys):
    from diffbatch.adapters import loading
    from diffbatch.cli import main
    from diffbatch.hardware import cpu_name

    monkeypatch.setattr(loading, "native_bfloat16", lambda: False)
    with pytest.raises(ModelLoadError, match="no AVX512_BF16 or AMX") as refused:
        Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="bfloat16")
    assert cpu_name() in str(refused.value) and refused.value.field == "dtype"
    out = tmp_path / "out"
    assert main(["generate", "--prompt", "x", "--model", str(tiny_sd_path), "--out", str(out),
                 "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dtype 'bfloat16' is refused" in err and not out.exists()
