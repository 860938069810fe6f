"""``diffbatch generate --from IMAGE``: every setting read back from a PNG's parameters (diffbatch's and
AUTOMATIC1111's format); alone it regenerates the same file byte for byte, flags override, --vary-seed
makes the neighbouring seeds; bad PNGs are one-line errors with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL.PngImagePlugin import PngInfo

from diffbatch.cli import main
from diffbatch.io.infotext import parse_infotext, png_parameters
from helpers import noise_image

A1111 = ("a castle on a hill\nwith a moat\nNegative prompt: ugly, blurry\nSteps: 3, Sampler: DPM++ 2M, Schedule "
         'type: Karras, CFG scale: 5.5, Seed: 1234, Size: 32x16, Model hash: 6ce0161689, Model: "v1-5, pruned", '
         "Clip skip: 2, Version: v1.10.1")


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def png_with(path: Path, parameters: str | None) -> Path:
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    noise_image(16, 2).save(path, pnginfo=info)
    return path


def only_png(out: Path) -> Path:
    (found,) = [p for p in out.glob("*.png") if p.name != "grid.png"]
    return found


@pytest.mark.parametrize("extra", [["--scheduler", "euler_a", "--negative-prompt", "blurry, dark"],
                                   [],  # the model's own sampler, written as its class name
                                   ["--variation-seed", "8", "--variation-strength", "0.4", "--guidance-scale", "3"],
                                   ["--cache", "auto", "--steps", "5"]])  # the PNG says what auto ran
def test_text_to_image_png_regenerates_byte_for_byte(capsys, tmp_path, tiny_sd_path, extra):
    first = tmp_path / "first"
    code, err = run(capsys, "generate", "--prompt", 'a "red": circle, big', "--out", first, "--model", tiny_sd_path,
                    "--steps", "3", "-n", "3", "--seed", "40", "--no-gallery", *extra)
    assert code == 0, err
    again = tmp_path / "again"
    code, err = run(capsys, "generate", "--from", first / "00002-42.png", "--out", again, "--model", tiny_sd_path)
    assert code == 0, err
    assert only_png(again).name == "00000-42.png"
    assert only_png(again).read_bytes() == (first / "00002-42.png").read_bytes()
    if "--cache" in extra:  # auto as it ran (the embedded family's setting), so --from needs no model to know
        assert "Cache: deepcache:" in png_parameters(first / "00002-42.png")


def test_image_to_image_png_finds_its_init_image_and_regenerates(capsys, tmp_path, tiny_sd_path):
    init = tmp_path / "init.png"
    noise_image(32, 4).save(init)
    first = tmp_path / "first"
    assert run(capsys, "generate", "--prompt", "a pink ring", "--image", init, "--strength", "0.6", "--out", first,
               "--model", tiny_sd_path, "--steps", "4", "--no-gallery")[0] == 0
    again = tmp_path / "again"
    code, err = run(capsys, "generate", "--from", first / "00000-0.png", "--out", again, "--model", tiny_sd_path)
    assert code == 0, err
    assert only_png(again).read_bytes() == (first / "00000-0.png").read_bytes()


def test_refine_keeps_the_seed_and_equals_the_direct_run(capsys, tmp_path, tiny_sd_path):
    first = tmp_path / "first"
    assert run(capsys, "generate", "--prompt", "a red circle", "--out", first, "--model", tiny_sd_path, "--steps", "3",
               "-n", "4", "--seed", "20", "--no-gallery")[0] == 0
    refined, direct = tmp_path / "refined", tmp_path / "direct"
    assert run(capsys, "generate", "--from", first / "00002-22.png", "--prompt", "a red circle, highly detailed",
               "--out", refined, "--model", tiny_sd_path)[0] == 0
    assert run(capsys, "generate", "--prompt", "a red circle, highly detailed", "--seed", "22", "--steps", "3",
               "--out", direct, "--model", tiny_sd_path)[0] == 0
    assert only_png(refined).name == "00000-22.png"
    assert only_png(refined).read_bytes() == only_png(direct).read_bytes()


def test_vary_seed_makes_the_next_seeds(capsys, tmp_path, tiny_sd_path):
    first = tmp_path / "first"
    assert run(capsys, "generate", "--prompt", "a star", "--out", first, "--model", tiny_sd_path, "--steps", "2",
               "--seed", "5", "--no-gallery")[0] == 0
    out = tmp_path / "varied"
    assert run(capsys, "generate", "--from", first / "00000-5.png", "-n", "3", "--vary-seed", "--out", out,
               "--model", tiny_sd_path, "--no-gallery")[0] == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000-6.png", "00001-7.png", "00002-8.png"]


def test_a1111_png_gives_the_settings_it_names(capsys, tmp_path, tiny_sd_path):
    found = parse_infotext(A1111)
    assert found.fields == {"prompt": "a castle on a hill\nwith a moat", "negative_prompt": "ugly, blurry",
                            "num_inference_steps": 3, "scheduler": "dpm++_2m", "schedule": "karras",
                            "guidance_scale": 5.5,
                            "seed": 1234, "width": 32, "height": 16, "clip_skip": 2}
    assert found.model == "v1-5, pruned"
    out, direct = tmp_path / "from", tmp_path / "direct"
    code, err = run(capsys, "generate", "--from", png_with(tmp_path / "a1111.png", A1111), "--out", out,
                    "--model", tiny_sd_path, "--no-gallery")
    assert code == 0, err
    job = direct / "job.jsonl"
    direct.mkdir()
    job.write_text(json.dumps({k: v for k, v in found.fields.items()}) + "\n")
    assert run(capsys, "generate", job, "--out", direct, "--model", tiny_sd_path, "--no-gallery")[0] == 0
    assert only_png(out).read_bytes() == (direct / "00000-1234.png").read_bytes()


@pytest.mark.parametrize(("parameters", "message"), [
    (None, "no 'parameters' text"),
    ("just a prompt", "no settings line"),
    ("x\nSteps: 3, Sampler: Foo Bar, Seed: 1", "not honoured: Sampler: Foo Bar (diffbatch has no such sampler"),
    ("x\nSteps: three, Seed: 1", "Steps: 'three' is not a number"),
    ("x\nSteps: 3, Sampler: PNDMScheduler, Seed: 1", "made with sampler PNDMScheduler, but this model's own"),
])
def test_bad_pngs_are_one_line_errors_and_nothing_is_written(capsys, tmp_path, tiny_sd_path, parameters, message):
    out = tmp_path / "out"
    code, err = run(capsys, "generate", "--from", png_with(tmp_path / "bad.png", parameters), "--out", out,
                    "--model", tiny_sd_path)
    assert code == 2 and message in err and err.count("\n") == 1 and not out.exists()


def test_a_file_that_is_not_an_image_is_refused(capsys, tmp_path, tiny_sd_path):
    text = tmp_path / "notes.png"
    text.write_text("not a png")
    code, err = run(capsys, "generate", "--from", text, "--out", tmp_path / "out", "--model", tiny_sd_path)
    assert code == 2 and "cannot read it as an image" in err
