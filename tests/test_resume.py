"""Resumable jobs: a run killed at any moment and run again gives the uninterrupted run's files, byte for byte."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
from PIL import Image

from diffbatch.cli import main
from diffbatch.io.resume import lock_folder, plan_resume
from diffbatch.io.writer import MANIFEST
from diffbatch.spec import GenerationSpec
from forked import cli_in_fork, joined, start_cli, start_function

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
N_IMAGES = 8  # 4 prompts x 2


def job_args(tiny_sd_path: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", str(prompts), "--out", str(out), "--model", str(tiny_sd_path), "--steps", "12",
            "--size", "16x16", "-n", "2", "--seed", "100", "--batch-size", "1", *extra]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("job") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tiny_sd_path: Path, prompts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, with the default batch size (the runs it is compared with use one image per call:
    batch invariance makes the files the same)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(job_args(tiny_sd_path, prompts, out, "--batch-size", "auto")) == 0
    return out


def records(out: Path) -> list[dict]:
    lines = (out / MANIFEST).read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def assert_same_files(out: Path, reference: Path) -> None:
    """Same names, same bytes (images and gallery); the same manifest records, one per image."""
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.iterdir():
        if path.name != MANIFEST:
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    got = records(out)
    assert len(got) == N_IMAGES and len({r["index"] for r in got}) == N_IMAGES  # no duplicate line
    assert sorted(got, key=lambda r: r["index"]) == records(reference)


def kill_after(argv: list[str], out: Path, lines: int, sig: int = signal.SIGKILL, stderr: Path | None = None) -> int:
    """Start the CLI in a process of its own (forked, torch already imported: tests/forked.py), send it ``sig``
    once the manifest has ``lines`` lines (0: once the folder exists); its exit code (-N: killed by signal N)."""
    proc = start_cli(argv, stderr=stderr)
    manifest = out / MANIFEST
    deadline = time.monotonic() + 120
    while proc.exitcode is None and time.monotonic() < deadline:
        written = manifest.read_bytes().count(b"\n") if manifest.exists() else -1
        if written >= lines if lines else out.exists():
            break
        time.sleep(0.002)
    if proc.exitcode is None:  # not a pid the forkserver has reaped already
        os.kill(proc.pid, sig)
    return joined(proc, 120)


@pytest.mark.slow  # a process of its own per run
@pytest.mark.parametrize("lines", [0, 1, 5])
def test_sigkill_then_rerun_gives_the_uninterrupted_files(
        lines: int, tiny_sd_path: Path, prompts: Path, reference: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    argv = job_args(tiny_sd_path, prompts, out)
    assert kill_after(argv, out, lines) == -signal.SIGKILL  # killed mid-run, not finished
    assert main(argv) == 0
    assert_same_files(out, reference)


@pytest.mark.slow  # a process of its own
def test_ctrl_c_is_one_line_exit_130_and_a_rerun_finishes_the_job(
        tiny_sd_path: Path, prompts: Path, reference: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    argv = job_args(tiny_sd_path, prompts, out)
    assert kill_after(argv, out, 2, signal.SIGINT, log) == 130, log.read_text()
    err = log.read_text()
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("diffbatch: error: interrupted")
    assert main(argv) == 0
    assert_same_files(out, reference)


CLONE_NEWNS = 0x00020000  # unshare(2): a private mount namespace


def full_disk_runs(argv: list[str], disk: str, tmp: str) -> None:
    """In a process of its own (forked: tests/forked.py), in a private mount namespace: a 24 KiB tmpfs at ``disk``
    (``mounted`` written once it is there), the job run until the disk is full, the tmpfs grown to 4 MiB (as a
    user freeing space would), the job run again. Each run is a fresh process forked from this one (which runs no
    model itself), its stderr and exit code written under ``tmp``. Exits 99 where the machine refuses the
    namespace or the mount (the test skips)."""
    import ctypes
    import subprocess

    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNS) != 0:
        raise SystemExit(99)
    for cmd in (["mount", "--make-rprivate", "/"], ["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", disk]):
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            raise SystemExit(99)
    Path(tmp, "mounted").touch()
    Path(tmp, "rc1").write_text(str(cli_in_fork(argv, f"{tmp}/err1")))
    subprocess.run(["cp", "-r", f"{disk}/out", f"{tmp}/after-failure"], check=True)
    subprocess.run(["mount", "-o", "remount,size=4m", disk], check=True)
    Path(tmp, "rc2").write_text(str(cli_in_fork(argv, f"{tmp}/err2")))
    subprocess.run(["cp", "-r", f"{disk}/out", f"{tmp}/copy"], check=True)


@pytest.mark.slow  # a tmpfs in a mount namespace, a process of its own
def test_a_full_disk_is_one_line_and_a_rerun_after_freeing_space_finishes_the_job(
        tiny_sd_path: Path, prompts: Path, reference: Path, tmp_path: Path) -> None:
    """On a real full file system: a 24 KiB tmpfs (6 pages: the manifest and 5 PNGs) mounted in a private mount
    namespace, grown to 4 MiB after the failure. Both runs in one forked process in that namespace; each run's
    stderr and exit code are its own."""
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    child = start_function(full_disk_runs, job_args(tiny_sd_path, prompts, disk / "out"), str(disk), str(tmp_path))
    joined(child, 240)
    if child.exitcode == 99 or not (tmp_path / "mounted").exists():
        pytest.skip("this machine does not allow to mount a small tmpfs in a private mount namespace")
    assert child.exitcode == 0, child.exitcode
    err = (tmp_path / "err1").read_text()
    assert (tmp_path / "rc1").read_text().strip() == "1", err
    assert "Traceback" not in err and "diffbatch: error: the disk is full" in err.strip().splitlines()[-1]
    failed = tmp_path / "after-failure"
    assert 0 < len(list(failed.glob("*.png"))) < N_IMAGES and not list(failed.glob(".*.tmp"))
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()
    assert_same_files(copy, reference)


@pytest.mark.slow  # three runs of the job
def test_a_full_disk_anywhere_in_the_writer_is_resumable(
        tiny_sd_path: Path, prompts: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """The same without a tmpfs (every machine): the disk fills on the 4th PNG, then on a manifest line."""
    import errno

    from diffbatch.io import writer

    out = tmp_path / "out"
    argv = job_args(tiny_sd_path, prompts, out)
    real_write, real_append = writer.write_bytes_atomic, writer.OutputWriter._append
    calls = []

    def png_fills_the_disk(path, data):
        calls.append(path)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(writer, "write_bytes_atomic", png_fills_the_disk)
    assert main(argv) == 1
    assert "diffbatch: error: the disk is full" in capsys.readouterr().err
    monkeypatch.setattr(writer, "write_bytes_atomic", real_write)

    def line_fills_the_disk(self, record):
        self._manifest = self._manifest or open(self.out_dir / MANIFEST, "a", encoding="utf-8")
        self._manifest.write(json.dumps(record)[:30])  # half a line reached the disk
        self._manifest.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.OutputWriter, "_append", line_fills_the_disk)
    assert main(argv) == 1
    monkeypatch.setattr(writer.OutputWriter, "_append", real_append)
    assert main(argv) == 0
    assert_same_files(out, reference)


def damage_cut_last_line(out: Path) -> None:
    data = (out / MANIFEST).read_bytes()
    (out / MANIFEST).write_bytes(data[: len(data) - 40])  # the last line cut mid-way, no newline


def damage_png_without_line(out: Path) -> None:
    lines = (out / MANIFEST).read_text(encoding="utf-8").splitlines(keepends=True)
    (out / MANIFEST).write_text("".join(lines[:-1]), encoding="utf-8")  # died between rename and append


def damage_cut_png(out: Path) -> None:
    path = out / "00003-103.png"
    path.write_bytes(path.read_bytes()[:50])  # a copy cut short: the manifest line is there


def damage_leftover_temp_file(out: Path) -> None:
    (out / ".00002-102.png.0123abcd.tmp").write_bytes(b"\x89PNG half")
    (out / "00002-102.png").unlink()  # died before the rename


def damage_line_twice(out: Path) -> None:
    lines = (out / MANIFEST).read_text(encoding="utf-8").splitlines(keepends=True)
    (out / MANIFEST).write_text("".join(lines + lines[:1]), encoding="utf-8")


DAMAGES = {
    "cut manifest line": (damage_cut_last_line, N_IMAGES - 1),
    "png without manifest line": (damage_png_without_line, N_IMAGES - 1),
    "cut png": (damage_cut_png, N_IMAGES - 1),
    "leftover temp file": (damage_leftover_temp_file, N_IMAGES - 1),
    "repeated manifest line": (damage_line_twice, N_IMAGES),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_repairs_what_a_kill_can_leave_and_says_how_many_it_skipped(
        damage: str, tiny_sd_path: Path, prompts: Path, reference: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for path in reference.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    damage_fn, skipped = DAMAGES[damage]
    damage_fn(out)
    capsys.readouterr()
    assert main(job_args(tiny_sd_path, prompts, out)) == 0
    assert f"skipped {skipped} images already written, {N_IMAGES - skipped} to make" in capsys.readouterr().err
    assert_same_files(out, reference)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_changed_job_is_refused_naming_the_image_and_nothing_is_touched(
        tiny_sd_path: Path, prompts: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    changed = tmp_path / "changed.txt"
    changed.write_text("a red circle\na purple square\na green triangle\na yellow star\n")
    before = snapshot(reference)
    capsys.readouterr()
    assert main(job_args(tiny_sd_path, changed, reference)) == 2
    err = capsys.readouterr().err
    assert "holds a different job" in err and "image 2" in err and "'a purple square'" in err
    assert "--overwrite" in err and err.count("\n") == 1
    assert snapshot(reference) == before
    assert main(job_args(tiny_sd_path, prompts, reference, "--steps", "3")) == 2  # a parameter changed too


def test_overwrite_replaces_the_changed_images_and_keeps_the_rest(
        tiny_sd_path: Path, prompts: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for path in reference.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    changed = tmp_path / "changed.txt"
    changed.write_text("a red circle\na purple square\n")  # images 0-1 kept, 2-3 changed, 4-7 gone
    fresh = tmp_path / "fresh"
    assert main(job_args(tiny_sd_path, changed, fresh)) == 0
    capsys.readouterr()
    assert main(job_args(tiny_sd_path, changed, out, "--overwrite")) == 0
    assert "skipped 2 images already written, 2 to make" in capsys.readouterr().err
    assert snapshot(out).keys() == snapshot(fresh).keys()  # the old job's other images are gone
    assert all(data == (fresh / name).read_bytes() for name, data in snapshot(out).items() if name != MANIFEST)
    assert sorted(records(out), key=lambda r: r["index"]) == records(fresh)


def test_a_longer_job_in_the_same_folder_makes_only_the_new_images(
        tiny_sd_path: Path, prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    short, out = tmp_path / "short.txt", tmp_path / "out"
    short.write_text("a red circle\n")
    assert main(job_args(tiny_sd_path, short, out)) == 0
    capsys.readouterr()
    assert main(job_args(tiny_sd_path, prompts, out)) == 0
    assert f"skipped 2 images already written, {N_IMAGES - 2} to make" in capsys.readouterr().err
    assert len(records(out)) == N_IMAGES


def test_resume_check_of_an_empty_or_missing_folder_makes_everything(tmp_path: Path) -> None:
    specs = [GenerationSpec(prompt="a", seed=k, num_inference_steps=2, guidance_scale=7.5, height=16, width=16,
                            guidance_rescale=0.0) for k in range(3)]
    plan = plan_resume(tmp_path / "missing", specs, "tiny")
    assert (plan.todo, plan.done, plan.rewrite, plan.remove) == ([0, 1, 2], 0, False, [])


def test_a_second_run_on_a_folder_being_written_is_refused(
        tiny_sd_path: Path, prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with lock_folder(out):  # as a running job holds it
        assert main(job_args(tiny_sd_path, prompts, out)) == 2
    assert "another diffbatch run is writing to this folder" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_a_folder_written_before_the_variation_emphasis_and_clip_skip_fields_existed_still_resumes(
        capsys: pytest.CaptureFixture, tiny_sd_path: Path, prompts: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    lines = (reference / MANIFEST).read_text(encoding="utf-8").splitlines()[:2]
    older = [{k: v for k, v in json.loads(line).items() if not k.startswith("variation_")
              and k not in ("emphasis", "clip_skip")} for line in lines]
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in older), encoding="utf-8")
    for record in older:
        (out / record["file"]).write_bytes((reference / record["file"]).read_bytes())
    assert main(job_args(tiny_sd_path, prompts, out)) == 0
    assert "skipped 2 images already written" in capsys.readouterr().err
    for path in reference.glob("*.png"):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(r["index"] for r in records(out)) == sorted(r["index"] for r in records(reference))


def test_an_older_line_read_a_bracketed_prompt_literally_so_its_image_is_another_one() -> None:
    """Before the prompt language, brackets went to the text encoder as text: such a line is not the image the
    job (A1111's reading, the default) makes now; a prompt without the syntax is."""
    from diffbatch.io.resume import _same

    for prompt, same in (("a red circle", True), ("a (red) circle", False)):
        expected = {"prompt": prompt, "negative_prompt": "", "emphasis": "original", "clip_skip": 1}
        assert _same({"prompt": prompt, "negative_prompt": ""}, [expected], 0) is same
        assert _same({**expected, "emphasis": "none"}, [expected], 0) is False


def test_a_retrained_model_at_the_same_path_is_another_job(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """The model is identified by its weights' fingerprint, not its name: rerunning a job into its folder after
    the model was retrained (saved again at the same path) redoes the images instead of skipping them."""
    from tiny import save_tiny_sd

    model, out = tmp_path / "model", tmp_path / "out"
    save_tiny_sd(model, seed=0)
    args = ["generate", "--prompt", "a red circle", "--out", str(out), "--model", str(model), "--steps", "2",
            "--no-gallery"]
    assert main(args) == 0
    first = records(out)[0]
    before = (out / first["file"]).read_bytes()
    assert len(first["model_hash"]) == 10 and f"Model hash: {first['model_hash']}" in Image.open(
        out / first["file"]).text["parameters"]
    assert main(args) == 0 and "skipped 1 images" in capsys.readouterr().err  # same weights: resumes
    save_tiny_sd(model, seed=1)  # retrained: same path, same name, other weights
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds a different job" in err and "model_hash" in err
    assert main([*args, "--overwrite"]) == 0
    assert records(out)[-1]["model_hash"] != first["model_hash"]
    assert (out / first["file"]).read_bytes() != before
