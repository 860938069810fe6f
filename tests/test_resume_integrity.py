"""Resume keeps only the images the job would make: a kept PNG is the file its manifest line describes, a
changed init image is a changed job, and ``--overwrite`` leaves exactly the files of a fresh run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffbatch.cli import main
from diffbatch.io.writer import MANIFEST

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def job(model: Path, out: Path, *extra: object) -> list[object]:
    return ["generate", *[a for p in PROMPTS for a in ("--prompt", p)], "--out", out, "--model", model,
            "--steps", "2", "--size", "16x16", "--no-gallery", *extra]


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text(encoding="utf-8").splitlines()]


def records(out: Path) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k != "seconds"} for r in lines(out)), key=lambda r: r["index"])


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != MANIFEST}


def assert_same_job(out: Path, fresh: Path) -> None:
    """The files a fresh run makes, byte for byte, and its manifest records (one line per image)."""
    assert files(out) == files(fresh)
    assert records(out) == records(fresh) and len(lines(out)) == len(lines(fresh))


@pytest.fixture(scope="module")
def fresh(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fresh") / "out"
    assert main([str(a) for a in job(tiny_sd_path, out)]) == 0
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "out"))


def test_every_manifest_line_records_the_sha256_of_its_png(fresh: Path) -> None:
    import hashlib

    for record in lines(fresh):
        assert record["file_sha256"] == hashlib.sha256((fresh / record["file"]).read_bytes()).hexdigest()


def test_a_png_copied_over_another_image_is_made_again_and_said_so(
        capsys: pytest.CaptureFixture, tiny_sd_path: Path, fresh: Path, tmp_path: Path) -> None:
    out = copy_of(fresh, tmp_path)
    shutil.copyfile(out / "00002-2.png", out / "00001-1.png")  # a complete PNG, of another image
    code, err = run(capsys, *job(tiny_sd_path, out))
    assert code == 0, err
    assert "skipped 2 images already written, 1 to make" in err
    assert "00001-1.png" in err and "not the files their manifest lines describe" in err
    assert_same_job(out, fresh)


def test_a_png_with_one_flipped_byte_is_made_again(
        capsys: pytest.CaptureFixture, tiny_sd_path: Path, fresh: Path, tmp_path: Path) -> None:
    out = copy_of(fresh, tmp_path)
    data = bytearray((out / "00000-0.png").read_bytes())
    data[len(data) // 2] ^= 0x10  # still ends with IEND
    (out / "00000-0.png").write_bytes(bytes(data))
    code, err = run(capsys, *job(tiny_sd_path, out))
    assert code == 0, err
    assert "skipped 2 images already written, 1 to make" in err and "00000-0.png" in err
    assert_same_job(out, fresh)


def test_lines_without_hashes_from_an_older_diffbatch_resume_and_damage_is_still_found(
        capsys: pytest.CaptureFixture, tiny_sd_path: Path, fresh: Path, tmp_path: Path) -> None:
    """A line written before ``file_sha256`` existed: its PNG is kept when it decodes completely and its
    parameters name the line's seed and prompt (a copied or damaged file does not pass)."""
    out = copy_of(fresh, tmp_path)
    older = [{k: v for k, v in r.items() if k != "file_sha256"} for r in lines(out)]
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in older), encoding="utf-8")
    shutil.copyfile(out / "00002-2.png", out / "00001-1.png")
    data = bytearray((out / "00000-0.png").read_bytes())
    data[len(data) // 2] ^= 0x10
    (out / "00000-0.png").write_bytes(bytes(data))
    code, err = run(capsys, *job(tiny_sd_path, out))
    assert code == 0, err
    assert "skipped 1 images already written, 2 to make" in err
    assert files(out) == files(fresh)


def test_overwrite_removes_a_stale_png_that_has_no_manifest_line(
        capsys: pytest.CaptureFixture, tiny_sd_path: Path, fresh: Path, tmp_path: Path) -> None:
    """A kill between the rename and the append leaves a PNG without a line; the job is then changed (another
    base seed): --overwrite leaves exactly what a fresh run of the new job leaves."""
    out = copy_of(fresh, tmp_path)
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in lines(out)[:-1]), encoding="utf-8")
    new_fresh = tmp_path / "new-fresh"
    assert run(capsys, *job(tiny_sd_path, new_fresh, "--seed", "10"))[0] == 0
    code, err = run(capsys, *job(tiny_sd_path, out, "--seed", "10", "--overwrite"))
    assert code == 0, err
    assert_same_job(out, new_fresh)


def test_a_png_of_another_job_without_a_line_is_refused_without_overwrite(
        capsys: pytest.CaptureFixture, tiny_sd_path: Path, fresh: Path, tmp_path: Path) -> None:
    out = copy_of(fresh, tmp_path)
    (out / MANIFEST).write_text("", encoding="utf-8")  # every line lost: only the images are left
    before = files(out)
    code, err = run(capsys, *job(tiny_sd_path, out, "--seed", "10"))
    assert code == 2 and err.count("\n") == 1
    assert "00000-0.png" in err and "--overwrite" in err
    assert files(out) == before
    assert run(capsys, *job(tiny_sd_path, out))[0] == 0  # the same job as the images: resumed
    assert_same_job(out, fresh)


def test_a_folder_at_an_image_name_is_one_line_exit_2(
        capsys: pytest.CaptureFixture, tiny_sd_path: Path, fresh: Path, tmp_path: Path) -> None:
    out = copy_of(fresh, tmp_path)
    (out / "00001-1.png").unlink()
    (out / "00001-1.png").mkdir()
    code, err = run(capsys, *job(tiny_sd_path, out))
    assert code == 2 and err.count("\n") == 1 and "00001-1.png" in err and "Traceback" not in err


# Init images ---------------------------------------------------------------------------------------------
def img2img(model: Path, image: Path, out: Path, *extra: object) -> list[object]:
    return ["generate", "--prompt", "a shape", "--image", image, "--strength", "0.6", "--out", out,
            "--model", model, "--steps", "2", "--no-gallery", *extra]


def picture(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def test_a_changed_init_image_is_a_changed_job_refused_then_redone_with_overwrite(
        capsys: pytest.CaptureFixture, tiny_sd_path: Path, tmp_path: Path) -> None:
    init, out, fresh = tmp_path / "init.png", tmp_path / "out", tmp_path / "fresh"
    picture(init, 0)
    assert run(capsys, *img2img(tiny_sd_path, init, out))[0] == 0
    record = lines(out)[0]
    assert len(record["image_hash"]) == 10
    with Image.open(out / record["file"]) as png:
        assert f"Init image hash: {record['image_hash']}" in png.text["parameters"]
    assert "skipped 1 images" in run(capsys, *img2img(tiny_sd_path, init, out))[1]  # unchanged: resumed
    picture(init, 1)  # another picture copied over init.png
    code, err = run(capsys, *img2img(tiny_sd_path, init, out))
    assert code == 2 and "holds a different job" in err and "image_hash" in err
    assert run(capsys, *img2img(tiny_sd_path, init, out, "--overwrite"))[0] == 0
    assert run(capsys, *img2img(tiny_sd_path, init, fresh))[0] == 0
    assert_same_job(out, fresh)


def test_from_a_png_whose_init_image_changed_since_is_refused(
        capsys: pytest.CaptureFixture, tiny_sd_path: Path, tmp_path: Path) -> None:
    init, out = tmp_path / "init.png", tmp_path / "out"
    picture(init, 0)
    assert run(capsys, *img2img(tiny_sd_path, init, out))[0] == 0
    made = out / lines(out)[0]["file"]
    assert run(capsys, "generate", "--from", made, "--model", tiny_sd_path, "--out", tmp_path / "again",
               "--no-gallery")[0] == 0
    assert (tmp_path / "again" / made.name).read_bytes() == made.read_bytes()  # regenerated byte for byte
    picture(init, 1)
    code, err = run(capsys, "generate", "--from", made, "--model", tiny_sd_path, "--out", tmp_path / "later",
                    "--no-gallery")
    assert code == 2 and err.count("\n") == 1 and "init.png" in err and "changed" in err
