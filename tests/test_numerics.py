"""The numeric path (dtype, device class, backend) is part of a job: recorded in the manifest and, off float32 on a
CPU, in the PNG's ``Numerics`` key; a resume on another path is refused by name; ``--from`` makes the image on the
path its PNG records unless flags say otherwise, and says so when this machine cannot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffbatch.cli import main
from diffbatch.hardware import native_bfloat16
from diffbatch.io.infotext import parse_infotext, png_parameters
from diffbatch.numerics import DEFAULT, NumericPath, parse_numerics

native = pytest.mark.skipif(not native_bfloat16(), reason="this CPU has no AVX512_BF16 or AMX: bfloat16 is refused")


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def generate(capsys, out: Path, model: Path, *extra) -> tuple[int, str]:
    return run(capsys, "generate", "--prompt", "a red circle", "--out", out, "--model", model, "--steps", "2",
               "-n", "2", "--no-gallery", *extra)


@pytest.mark.parametrize("text", ["float32 cpu", "bfloat16 cpu", "float16 cuda", "float32 cpu openvino"])
def test_a_numeric_path_reads_back_as_written(text):
    assert str(parse_numerics(text)) == text


@pytest.mark.parametrize(("text", "says"), [("float64 cpu", "dtype 'float64'"), ("float32 tpu", "device 'tpu'"),
                                            ("bfloat16", "must be 'DTYPE DEVICE'"), ("float32 cpu onnx", "backend")])
def test_a_bad_numeric_path_is_refused_saying_what_is_allowed(text, says):
    with pytest.raises(ValueError, match=says):
        parse_numerics(text)


def test_float32_on_a_cpu_is_in_the_manifest_but_not_in_the_png(capsys, tmp_path, tiny_sd_path):
    code, err = generate(capsys, tmp_path / "out", tiny_sd_path, "--dtype", "float32")
    assert code == 0, err
    assert {line["numerics"] for line in manifest(tmp_path / "out")} == {"float32 cpu"}
    assert "Numerics" not in png_parameters(tmp_path / "out" / "00000-0.png")  # A1111 readers see their own keys
    assert parse_infotext(png_parameters(tmp_path / "out" / "00000-0.png")).numerics == DEFAULT


def test_a_resume_on_another_numeric_path_is_refused_by_name_and_overwrite_makes_it_again(capsys, tmp_path,
                                                                                           tiny_sd_path):
    out = tmp_path / "out"
    assert generate(capsys, out, tiny_sd_path, "--dtype", "float32")[0] == 0
    lines = manifest(out)
    (out / "manifest.jsonl").write_text("".join(json.dumps({**line, "numerics": "bfloat16 cpu"}) + "\n"
                                                for line in lines[:1]))  # image 0 made on another machine's path
    before = (out / "manifest.jsonl").read_bytes()
    code, err = generate(capsys, out, tiny_sd_path, "--dtype", "float32")
    assert code == 2 and "made on bfloat16 cpu, and this run makes float32 cpu" in err and err.count("\n") == 1
    assert (out / "manifest.jsonl").read_bytes() == before  # nothing written
    code, err = generate(capsys, out, tiny_sd_path, "--dtype", "float32", "--overwrite")
    assert code == 0, err
    assert [line["numerics"] for line in manifest(out)] == ["float32 cpu", "float32 cpu"]


@native
def test_a_bfloat16_png_says_so_and_from_makes_it_again_on_bfloat16(capsys, tmp_path, tiny_sd_path):
    first = tmp_path / "first"
    assert generate(capsys, first, tiny_sd_path, "--dtype", "bfloat16")[0] == 0
    png = first / "00001-1.png"
    assert "Numerics: bfloat16 cpu" in png_parameters(png)
    assert manifest(first)[1]["numerics"] == "bfloat16 cpu"
    again = tmp_path / "again"
    code, err = run(capsys, "generate", "--from", png, "--out", again, "--model", tiny_sd_path, "--no-gallery")
    assert code == 0, err
    assert (again / "00000-1.png").read_bytes() == png.read_bytes()
    assert manifest(again)[0]["numerics"] == "bfloat16 cpu"
    chosen = tmp_path / "chosen"  # a flag is the user's choice: float32, said in the new PNG's manifest line
    code, err = run(capsys, "generate", "--from", png, "--out", chosen, "--model", tiny_sd_path, "--no-gallery",
                    "--dtype", "float32")
    assert code == 0, err
    assert manifest(chosen)[0]["numerics"] == "float32 cpu"


def test_from_a_png_made_on_a_device_this_machine_lacks_says_so_and_runs_here(capsys, tmp_path, tiny_sd_path,
                                                                              monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    first = tmp_path / "first"
    assert generate(capsys, first, tiny_sd_path, "--dtype", "float32")[0] == 0
    made = png_parameters(first / "00000-0.png")
    cuda = tmp_path / "cuda.png"
    _rewrite_parameters(first / "00000-0.png", cuda, made.replace("Model:", "Numerics: float16 cuda, Model:"))
    code, err = run(capsys, "generate", "--from", cuda, "--out", tmp_path / "again", "--model", tiny_sd_path,
                    "--no-gallery")
    assert code == 0, err
    assert "made on float16 cuda, but this machine has no CUDA device" in err
    assert manifest(tmp_path / "again")[0]["numerics"].endswith(" cpu")


def test_a_png_with_a_bad_numeric_path_is_a_one_line_error(capsys, tmp_path, tiny_sd_path):
    first = tmp_path / "first"
    assert generate(capsys, first, tiny_sd_path, "--dtype", "float32")[0] == 0
    bad = tmp_path / "bad.png"
    _rewrite_parameters(first / "00000-0.png", bad, png_parameters(first / "00000-0.png") + ", Numerics: float64 gpu")
    code, err = run(capsys, "generate", "--from", bad, "--out", tmp_path / "again", "--model", tiny_sd_path)
    assert code == 2 and "Numerics 'float64 gpu'" in err and err.count("\n") == 1
    assert not (tmp_path / "again").exists()


def _rewrite_parameters(source: Path, target: Path, parameters: str) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    with Image.open(source) as image:
        image.save(target, pnginfo=info)


def test_an_a1111_png_records_no_numeric_path_and_a_diffbatch_png_without_the_key_was_float32_on_a_cpu():
    settings = "Steps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Model: m"
    assert parse_infotext(f"x\n{settings}, Version: v1.10.1").numerics is None  # --from keeps the defaults
    assert parse_infotext(f"x\n{settings}").numerics == DEFAULT
    assert parse_infotext(f"x\n{settings}, Numerics: bfloat16 cpu").numerics == NumericPath("bfloat16", "cpu")


def test_the_numeric_path_default_is_float32_on_a_cpu_with_torch():
    assert DEFAULT == NumericPath("float32", "cpu", "torch") and DEFAULT.is_default


def test_library_warnings_a_user_cannot_act_on_stay_off_stderr(recwarn):
    import warnings

    from torch.jit import TracerWarning

    from diffbatch.quiet import quiet_loading

    with warnings.catch_warnings():
        quiet_loading()
        warnings.warn("Converting a tensor to a Python boolean might cause the trace to be incorrect", TracerWarning,
                      stacklevel=1)
        warnings.warn_explicit("Already found a peft_config attribute", UserWarning, "peft/tuners/tuners_utils.py",
                               1, module="peft.tuners.tuners_utils")
    assert not [w for w in recwarn if issubclass(w.category, TracerWarning) or "peft_config" in str(w.message)]
