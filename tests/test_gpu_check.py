"""benchmarks/gpu_check.sh, the one-shot GPU check: on a machine without CUDA it says so and exits 0, and its
Python part runs end to end on the tiny SDXL pipeline on the CPU, so it cannot rot while no GPU is lent."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the script would run for real")
def test_script_skips_without_cuda():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU here" in done.stdout and "skipped" in done.stdout


@pytest.mark.slow
def test_python_part_runs_on_the_tiny_sdxl_on_the_cpu():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--images", "4", "--batch-size", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for heading in ("### Throughput", "### Denoiser batch efficiency", "skipped: needs CUDA"):
        assert heading in out
    assert out.count("diffbatch / list batches") == 2 and "| 16 |" in out  # both workloads; rows 1..16
