"""Scale-out on Ray: a job on a local cluster of two engine actors writes the files of a local run.

The embedded model at the default thread count: the actors run one torch thread each (Ray gives an actor its
CPUs as OMP_NUM_THREADS), the local run two on CI; the files are the same because no image depends on the
thread count (adapters/invariance.py)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from diffbatch.cli import main
from diffbatch.io.writer import MANIFEST

pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install -e '.[ray]')")

JOB = [{"prompt": "a red circle"}, {"prompt": "a blue square", "guidance_scale": 1.0},
       {"prompt": "a green star", "height": 32, "scheduler": "euler_a"}, {"prompt": "a yellow triangle", "seed": 9},
       {"prompt": "a purple square", "cache": "deepcache:2", "num_inference_steps": 5}]  # a step cache on Ray too


def records(out: Path) -> list[dict]:
    lines = (out / MANIFEST).read_text(encoding="utf-8").splitlines()
    return sorted(({k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines),
                  key=lambda r: r["index"])


@pytest.mark.ray
def test_two_ray_workers_write_the_files_of_a_local_run_and_resume_the_same_way(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job, init = tmp_path / "job.jsonl", tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(init)  # img2img: the PNG's Init image hash comes from the driver
    lines = [*JOB, {"prompt": "a pink ring", "image": str(init), "strength": 0.6}]
    job.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["generate", str(job), "--steps", "3", "-n", "2"]
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert main([*args, "--out", str(local)]) == 0
    on_ray.mkdir()  # a run killed after two images: those are skipped, not sent to Ray
    first = (local / MANIFEST).read_text(encoding="utf-8").splitlines(keepends=True)[:2]
    (on_ray / MANIFEST).write_text("".join(first), encoding="utf-8")
    for line in first:
        name = json.loads(line)["file"]
        (on_ray / name).write_bytes((local / name).read_bytes())
    capsys.readouterr()

    assert main([*args, "--out", str(on_ray), "--ray", "--workers", "2"]) == 0
    assert "skipped 2 images already written, 10 to make" in capsys.readouterr().err
    assert sorted(p.name for p in on_ray.iterdir()) == sorted(p.name for p in local.iterdir())
    for path in local.iterdir():
        if path.name != MANIFEST:
            assert (on_ray / path.name).read_bytes() == path.read_bytes(), path.name
    assert records(on_ray) == records(local) and len(records(local)) == 12
