"""``diffbatch generate`` end to end on a tiny random pipeline: inputs, seeds, files, manifest, bad input."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffbatch.cli import main
from diffbatch.io.writer import MANIFEST
from helpers import in_mount_namespace


def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def parameters(path: Path) -> str:
    with Image.open(path) as png:
        return png.text["parameters"]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB"))


@pytest.fixture
def model(tiny_sd_path: Path) -> list[str]:
    return ["--model", str(tiny_sd_path), "--steps", "2"]


def test_text_file_job_writes_index_seed_pngs_with_parameters_and_a_manifest(
        capsys: pytest.CaptureFixture, tmp_path: Path, model: list[str], tiny_sd_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na red circle\n\na blue square\n")
    out = tmp_path / "out"
    code, err = run(capsys, "generate", prompts, "--out", out, *model, "-n", "2", "--seed", "10",
                    "--negative-prompt", "blurry")
    assert code == 0, err
    names = ["00000-10.png", "00001-11.png", "00002-12.png", "00003-13.png"]
    assert sorted(p.name for p in out.iterdir()) == [*names, "grid.png", "index.html", "manifest.jsonl"]
    records = sorted(manifest(out), key=lambda r: r["index"])
    assert [(r["file"], r["prompt"], r["seed"]) for r in records] == [
        (names[0], "a red circle", 10), (names[1], "a red circle", 11),
        (names[2], "a blue square", 12), (names[3], "a blue square", 13)]
    first = records[0]
    assert {k: first[k] for k in ("negative_prompt", "num_inference_steps", "guidance_scale", "height", "width",
                                  "image", "strength", "scheduler", "model")} == {
        "negative_prompt": "blurry", "num_inference_steps": 2, "guidance_scale": 7.5, "height": 32, "width": 32,
        "image": None, "strength": None, "scheduler": None, "model": tiny_sd_path.name}
    assert first["seconds"] > 0
    assert parameters(out / names[2]) == (
        "a blue square\nNegative prompt: blurry\n"
        f"Steps: 2, Sampler: DDIMScheduler, CFG scale: 7.5, Seed: 12, Size: 32x32, Model hash: {first['model_hash']}, "
        f"Model: {tiny_sd_path.name}")
    assert "4/4" in err and "img/s" in err  # the progress bar


def test_image_of_a_job_is_regenerated_alone_from_its_seed(
        capsys: pytest.CaptureFixture, tmp_path: Path, model: list[str]) -> None:
    assert run(capsys, "generate", "--prompt", "a", "--prompt", "b", "-n", "2", "--size", "16x16",
               "--out", tmp_path / "job", *model)[0] == 0
    assert run(capsys, "generate", "--prompt", "b", "--seed", "3", "--size", "16x16",
               "--out", tmp_path / "alone", *model)[0] == 0
    assert np.array_equal(pixels(tmp_path / "job" / "00003-3.png"), pixels(tmp_path / "alone" / "00000-3.png"))


def test_jsonl_line_fields_override_flags(
        capsys: pytest.CaptureFixture, tmp_path: Path, model: list[str]) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a"}\n'
                    '{"prompt": "b", "seed": 99, "guidance_scale": 1, "scheduler": "euler_a", "height": 24}\n')
    out = tmp_path / "out"
    code, err = run(capsys, "generate", jobs, "--out", out, *model, "--guidance-scale", "3",
                    "--size", "16x16", "--seed", "5")
    assert code == 0, err
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000-5.png", "00001-99.png"]
    assert parameters(out / "00000-5.png").endswith("Sampler: DDIMScheduler, CFG scale: 3, Seed: 5, Size: 16x16, "
                                                    f"Model hash: {manifest(out)[0]['model_hash']}, "
                                                    f"Model: {model[1].rsplit('/', 1)[-1]}")
    assert "Sampler: Euler a, CFG scale: 1, Seed: 99, Size: 16x24," in parameters(out / "00001-99.png")
    with Image.open(out / "00001-99.png") as png:
        assert png.size == (16, 24)


def test_image_folder_pairs_with_prompts_for_img2img(
        capsys: pytest.CaptureFixture, tmp_path: Path, model: list[str]) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.new("RGB", (24, 16), (200, 10, 10)).save(inputs / "b.png")
    Image.new("RGB", (16, 16), (10, 10, 200)).save(inputs / "a.png")
    out = tmp_path / "out"
    code, err = run(capsys, "generate", "--prompt", "one", "--prompt", "two", "--image", inputs,
                    "--strength", "0.5", "--out", out, *model)
    assert code == 0, err
    records = sorted(manifest(out), key=lambda r: r["index"])
    assert [(r["prompt"], Path(r["image"]).name, r["strength"], r["width"]) for r in records] == [
        ("one", "a.png", 0.5, 16), ("two", "b.png", 0.5, 24)]
    assert parameters(out / "00001-1.png").endswith(f", Denoising strength: 0.5, Init image: {inputs / 'b.png'}, "
                                                    f"Init image hash: {records[1]['image_hash']}")
    assert records[1]["image_hash"] == hashlib.sha256((inputs / "b.png").read_bytes()).hexdigest()[:10]


# Each bad input of the issue: its arguments (TMP is the test's folder) and the name its error must give.
BAD_INPUTS: dict[str, tuple[list[str], str]] = {
    "missing prompts file": (["TMP/nope.txt"], "nope.txt"),
    "empty prompts file": (["TMP/empty.txt"], "empty.txt"),
    "malformed jsonl line": (["TMP/bad.jsonl"], "bad.jsonl:2"),
    "unknown field": (["TMP/unknown.jsonl"], "unknown.jsonl:1: unknown field(s) stepz"),
    "size not a multiple of the VAE factor": (["--prompt", "a", "--size", "33x32"], "--size 33x32"),
    "height in a line not a multiple": (["TMP/tall.jsonl"], "tall.jsonl:1: height=33"),
    "size under 8 pixels": (["--prompt", "a", "--size", "4x8"], "--size 4x8"),
    "size over 4096 pixels": (["--prompt", "a", "--size", "8x8192"], "--size 8x8192"),
    "size not WxH": (["--prompt", "a", "--size", "big"], "--size"),
    "steps < 1": (["--prompt", "a", "--steps", "0"], "--steps 0"),
    "strength 0": (["--prompt", "a", "--image", "TMP/red.png", "--strength", "0"], "--strength 0.0"),
    "strength > 1": (["--prompt", "a", "--image", "TMP/red.png", "--strength", "1.5"], "--strength 1.5"),
    "guidance < 0": (["--prompt", "a", "--guidance-scale", "-1"], "--guidance-scale -1.0"),
    "unknown scheduler": (["--prompt", "a", "--scheduler", "nope"], "--scheduler nope"),
    "missing init image": (["--prompt", "a", "--image", "TMP/gone.png"], "gone.png"),
    "missing init image in a line": (["TMP/noimage.jsonl"], "noimage.jsonl:1: init image: 'gone.png'"),
    "unreadable init image": (["--prompt", "a", "--image", "TMP/fake.png"], "fake.png"),
    "model path does not exist": (["--prompt", "a", "--model", "TMP/nomodel"], "nomodel"),
    "model path not a pipeline": (["--prompt", "a", "--model", "TMP/notapipe"], "notapipe"),
    "hub id while offline": (["--prompt", "a", "--model", "nobody/no-such-model"], "nobody/no-such-model"),
    "no prompts at all": ([], "no prompts"),
    "-n 0": (["--prompt", "a", "-n", "0"], "-n 0"),
    "unknown flag": (["--prompt", "a", "--stepz", "3"], "--stepz"),
    "out is a file": (["--prompt", "a", "--out", "TMP/file"], "--out"),
    "out inside a file": (["--prompt", "a", "--out", "TMP/file/out"], "is a file, not a folder"),
    "manifest is a folder": (["--prompt", "a", "--out", "TMP/odd"], "manifest.jsonl is a folder"),
    "prompts file is a folder": (["TMP/odd"], "is a directory"),
    "init image is a folder": (["TMP/dirimage.jsonl"], "dirimage.jsonl:1: init image: 'odd' is a directory"),
    "batch size 0": (["--prompt", "a", "--batch-size", "0"], "--batch-size"),
    "workers without --ray": (["--prompt", "a", "--workers", "2"], "--workers 2 needs --ray"),
    "workers 0": (["--prompt", "a", "--ray", "--workers", "0"], "--workers 0"),
}


def write_bad_inputs(tmp: Path) -> None:
    (tmp / "empty.txt").write_text("# nothing\n\n")
    (tmp / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    (tmp / "unknown.jsonl").write_text('{"prompt": "a", "stepz": 3}\n')
    (tmp / "tall.jsonl").write_text('{"prompt": "a", "height": 33}\n')
    (tmp / "noimage.jsonl").write_text('{"prompt": "a", "image": "gone.png"}\n')
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp / "red.png")
    (tmp / "fake.png").write_text("not a png")
    (tmp / "file").write_text("")
    (tmp / "notapipe").mkdir()
    (tmp / "odd" / MANIFEST).mkdir(parents=True)  # an output folder whose manifest is a folder
    (tmp / "dirimage.jsonl").write_text('{"prompt": "a", "image": "odd"}\n')


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_naming_it_exit_2_and_no_output(
        case: str, capsys: pytest.CaptureFixture, tmp_path: Path, tiny_sd_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # a jsonl line's relative image path is relative to the working folder
    write_bad_inputs(tmp_path)
    args, name = BAD_INPUTS[case]
    out = tmp_path / "out"
    before = sorted(tmp_path.rglob("*"))
    code, err = run(capsys, "generate", "--model", tiny_sd_path, "--steps", "2", "--out", out,
                    *(a.replace("TMP", str(tmp_path)) for a in args))  # a case's own --model/--out wins
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("diffbatch: error: "), err
    assert name in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even the output folder


@pytest.mark.slow  # the installed script: a fresh interpreter importing torch
def test_installed_entry_point_reads_prompts_from_stdin(tmp_path: Path, tiny_sd_path: Path) -> None:
    exe = shutil.which("diffbatch", path=str(Path(sys.executable).parent))
    assert exe is not None, "run `pip install -e .` to install the diffbatch entry point"
    out = tmp_path / "out"
    done = subprocess.run([exe, "generate", "-", "--out", str(out), "--model", str(tiny_sd_path),
                           "--steps", "2", "--size", "16x16", "--seed", "7"],
                          input="first\n# skipped\nsecond\n", capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000-7.png", "00001-8.png"]
    assert [r["prompt"] for r in sorted(manifest(out), key=lambda r: r["index"])] == ["first", "second"]


def test_a_read_only_output_folder_is_one_line_exit_2_before_the_model_loads(tmp_path: Path) -> None:
    """On a real read-only file system (a read-only bind mount in a private mount namespace): root, who
    writes through any permission bits, cannot write there either."""
    folder = tmp_path / "ro"
    folder.mkdir()
    python = f"HF_HUB_OFFLINE=1 '{sys.executable}' -m diffbatch"
    script = (f"mount --bind '{folder}' '{folder}' && mount -o remount,bind,ro '{folder}' || exit 99\n"
              f"{python} generate --prompt a --out '{folder}/out' --model '{tmp_path}/none' 2> '{tmp_path}/err'\n"
              f"echo $? > '{tmp_path}/rc'\n")
    in_mount_namespace(script, tmp_path / "rc", "mount a read-only folder", timeout=120)
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2" and err.count("\n") == 1, err
    assert f"--out {folder}/out: cannot write there (in {folder})" in err  # before the missing model is noticed


def test_a_folder_that_stops_taking_files_mid_run_is_one_line_exit_1_and_resumable(
        capsys: pytest.CaptureFixture, tmp_path: Path, model: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from diffbatch.io import writer

    real, calls = writer.write_bytes_atomic, []

    def refused_on_the_second_image(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real(path, data)

    monkeypatch.setattr(writer, "write_bytes_atomic", refused_on_the_second_image)
    args = ["generate", "--prompt", "a", "--prompt", "b", "--size", "16x16", "--out", tmp_path / "out", *model]
    code, err = run(capsys, *args)
    assert code == 1 and err.strip().splitlines()[-1].startswith("diffbatch: error: ") and "Traceback" not in err
    assert "00001-1.png: Permission denied" in err
    monkeypatch.setattr(writer, "write_bytes_atomic", real)
    code, err = run(capsys, *args)
    assert code == 0 and "skipped 1 images already written, 1 to make" in err
