"""benchmarks/gpu_check.sh, the one-shot GPU check: on a machine without CUDA it says so and exits 0, and its
Python part runs end to end on the tiny SDXL pipeline on the CPU, so it cannot rot while no GPU is lent."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the script would run for real")
@pytest.mark.slow  # the shell script in a fresh interpreter
def test_script_skips_without_cuda():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU here" in done.stdout and "skipped" in done.stdout


@pytest.mark.slow  # the whole check on the tiny SDXL
def test_python_part_runs_on_the_tiny_sdxl_on_the_cpu(monkeypatch, capsys, request):
    """In this process (runpy, as ``python gpu_check.py`` runs it): the script is what is tested, not Python's
    start-up; the shell part is run for real above."""
    # the script puts tests/ and benchmarks/ on sys.path itself and imports from them: it must, as on the GPU
    # machine, so neither is there before it runs and nothing it imports from them is loaded yet
    here = {str(ROOT / "tests"), str(ROOT / "benchmarks")}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in here and p != ""])
    for name in ("tiny", "tiny_sdxl", "helpers", "results_md", "throughput"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    rng = torch.random.get_rng_state()
    request.addfinalizer(lambda: torch.random.set_rng_state(rng))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--tiny", "--device", "cpu", "--images", "4",
                                      "--batch-size", "2"])
    runpy.run_path(str(ROOT / "benchmarks" / "gpu_check.py"), run_name="__main__")
    out = capsys.readouterr().out
    for heading in ("### Throughput", "### Denoiser batch efficiency", "skipped: needs CUDA"):
        assert heading in out
    assert out.count("diffbatch / list batches") == 2 and "| 16 |" in out  # both workloads; rows 1..16
