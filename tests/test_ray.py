"""Scale-out on Ray: a job on a local cluster of two engine actors writes the files of a local run; which
cluster ``--ray`` uses (the address given, RAY_ADDRESS, a running ``ray start`` cluster, else a fresh local
one), and one line when it cannot reach it.

The embedded model at the default thread count: the actors run one torch thread each (Ray gives an actor its
CPUs as OMP_NUM_THREADS), the local run two on CI; the files are the same because no image depends on the
thread count (adapters/invariance.py).

Every test runs with its own Ray temporary directory (RAY_TMPDIR) and without RAY_ADDRESS, so no other Ray on
the machine (a running cluster, a stale address file) changes what it sees."""

import json
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from diffbatch.cli import main
from diffbatch.errors import InputError
from diffbatch.executors.ray import Cluster, choose_cluster
from diffbatch.io.writer import MANIFEST

pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install -e '.[ray]')")

JOB = [{"prompt": "a red circle"}, {"prompt": "a blue square", "guidance_scale": 1.0},
       {"prompt": "a green star", "height": 32, "scheduler": "euler_a"}, {"prompt": "a yellow triangle", "seed": 9},
       {"prompt": "a purple square", "cache": "deepcache:2", "num_inference_steps": 5}]  # a step cache on Ray too


@pytest.fixture
def ray_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This test's own Ray temporary directory (where ``ray_current_cluster`` lives), and no RAY_ADDRESS. Short,
    under /tmp: Ray's socket paths inside it must fit the 107 bytes of a Unix socket name."""
    root = Path(tempfile.mkdtemp(prefix="dbray", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (root / "ray").mkdir()
    yield root / "ray"
    shutil.rmtree(root, ignore_errors=True)


def dead_address() -> str:
    """A local port nothing listens on (taken from the kernel, then freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_without_an_address_a_stale_address_file_gives_a_fresh_local_cluster(ray_dir: Path) -> None:
    (ray_dir / "ray_current_cluster").write_text(dead_address())  # left by a cluster killed without `ray stop`
    assert choose_cluster(None) == Cluster(None)


def test_without_an_address_a_running_ray_start_cluster_is_joined(ray_dir: Path) -> None:
    with socket.socket() as head:  # stands in for the GCS of a cluster `ray start --head` left running
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        (ray_dir / "ray_current_cluster").write_text(address + "\n")
        assert choose_cluster(None) == Cluster(address, str(ray_dir / "ray_current_cluster"))


def test_local_starts_a_fresh_cluster_whatever_else_is_there(ray_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (ray_dir / "ray_current_cluster").write_text(dead_address())
    assert choose_cluster("local") == Cluster(None, "--ray")
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert choose_cluster(None) == Cluster(None, "RAY_ADDRESS")


@pytest.mark.parametrize("origin", ["RAY_ADDRESS", "--ray"])
def test_an_address_where_no_cluster_answers_is_one_line_and_exit_2_before_any_image(
        origin: str, ray_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    address = dead_address()
    if origin == "RAY_ADDRESS":  # was: ray.init(num_cpus=...) refused to join it, with a traceback
        monkeypatch.setenv("RAY_ADDRESS", address)
    given = address if origin == "--ray" else None
    with pytest.raises(InputError, match=re.escape(f"no Ray cluster answers at {address} (from {origin})")):
        choose_cluster(given)
    out = tmp_path / "out"
    flags = ["--ray", *([given] if given else [])]
    assert main(["generate", "--prompt", "a red circle", "--steps", "1", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err  # the error ends it (after the progress bar's first line), no traceback
    assert "Traceback" not in err and err.count("diffbatch: error:") == 1
    assert err.splitlines()[-1].startswith(f"diffbatch: error: --ray: no Ray cluster answers at {address}")
    assert not list(out.glob("*.png"))


def records(out: Path) -> list[dict]:
    lines = (out / MANIFEST).read_text(encoding="utf-8").splitlines()
    return sorted(({k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines),
                  key=lambda r: r["index"])


@pytest.mark.ray
def test_two_ray_workers_write_the_files_of_a_local_run_and_resume_the_same_way(
        tmp_path: Path, ray_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (ray_dir / "ray_current_cluster").write_text(dead_address())  # a stale address file: still a local cluster
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
