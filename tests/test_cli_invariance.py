"""``diffbatch generate`` as users run it (default thread count, the embedded model): the same job gives the
same files, byte for byte, whatever ``--batch-size`` and whatever thread count the process runs with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffbatch.cli import main
from forked import joined, start_cli
from helpers import noise_image

JOB = [{"prompt": "a red circle"}, {"prompt": "a blue star", "guidance_scale": 1.0},
       {"prompt": "a green square", "scheduler": "dpm++_2m", "height": 32},
       {"prompt": "a pink triangle", "scheduler": "ddim", "negative_prompt": "blurry"},
       {"prompt": "a yellow circle", "image": "init.png", "strength": 0.7}]

pytestmark = pytest.mark.slow  # ~11 s: whole CLI runs, one of them a process of its own


@pytest.fixture
def job(tmp_path: Path) -> Path:
    noise_image(size=64, seed=3).save(tmp_path / "init.png")
    lines = [{**line, "image": str(tmp_path / line["image"])} if "image" in line else line for line in JOB]
    path = tmp_path / "job.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def files(out: Path) -> dict[str, bytes]:
    """Every PNG's bytes, and the manifest without its timings."""
    found = {p.name: p.read_bytes() for p in out.glob("*.png") if p.name != "grid.png"}
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    found["manifest"] = json.dumps(sorted(({k: v for k, v in r.items() if k != "seconds"} for r in lines),
                                          key=lambda r: r["index"])).encode()
    return found


def test_batch_size_does_not_change_a_single_byte(job: Path, tmp_path: Path) -> None:
    made = {}
    for size in ("1", "3", "auto"):
        out = tmp_path / f"out-{size}"
        assert main(["generate", str(job), "--out", str(out), "--steps", "3", "-n", "2", "--seed", "5",
                     "--no-gallery", "--batch-size", size]) == 0
        made[size] = files(out)
    assert len(made["auto"]) == 11  # 10 images and the manifest
    assert made["1"] == made["auto"] and made["3"] == made["auto"]


def test_a_one_thread_process_writes_the_files_of_a_default_one(job: Path, tmp_path: Path) -> None:
    """The one-thread run is a process of its own at one torch thread (forked from a pre-imported interpreter:
    tests/forked.py); OMP_NUM_THREADS=1 set by a launcher is what Ray gives its actors, run in test_ray.py."""
    args = ["generate", str(job), "--steps", "3", "-n", "2", "--seed", "5", "--no-gallery"]
    assert main([*args, "--out", str(tmp_path / "default")]) == 0
    one = start_cli([*args, "--out", tmp_path / "one"], threads=1)
    assert joined(one, 120) == 0
    assert files(tmp_path / "one") == files(tmp_path / "default")
