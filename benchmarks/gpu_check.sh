#!/usr/bin/env bash
# One-shot GPU check (issue 12): under 8 minutes on one GPU. Prints the SDXL-architecture benchmark tables
# (benchmarks/gpu_check.py) and runs the CUDA tests (tests/gpu). Without a CUDA GPU it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): skipped"
  exit 0
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
timeout 420 "$PY" benchmarks/gpu_check.py "$@"
timeout 120 "$PY" -m pytest -p no:cacheprovider -q tests/gpu
