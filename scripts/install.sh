#!/usr/bin/env bash
# Set up .venv with diffbatch and its test tools. Works on a fresh machine:
# prefers the CPU build torch==2.13.0 where the machine's pip can find it (no multi-GB CUDA download),
# and falls back to the default torch wheel elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
fi
if ! .venv/bin/python -c "import importlib.util as u; assert u.find_spec('torch')" >/dev/null 2>&1; then
  .venv/bin/pip install -q "torch==2.13.0" 2>/dev/null || .venv/bin/pip install -q torch
fi
# The pip step re-resolves every dependency (~8 s) even when nothing changed: it runs only when what it installs
# from changed (the two pyproject.toml files, this script, the interpreter), or diffbatch is not this checkout's,
# or a test extra is missing (the tests would skip what needs it).
STAMP=.venv/.install-stamp
WANT=$(cat pyproject.toml shapes/pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)-$(.venv/bin/python -V)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] \
    || ! .venv/bin/python -c "
import importlib.util as u, pathlib, sys, diffbatch, diffbatch_shapes
assert pathlib.Path(diffbatch.__file__).resolve().is_relative_to(pathlib.Path('src').resolve())
sys.path.insert(0, 'tests')
from extras import EXTRA  # the optional modules the tests use (one list)
assert all(u.find_spec(m) for m in {'pytest_timeout', 'ruff', *(name.partition('.')[0] for name in EXTRA)})
" >/dev/null 2>&1; then
  rm -f "$STAMP"
  .venv/bin/pip install -q -e ".[test]" -e ./shapes  # shapes/: the embedded model's training and evaluation
  echo "$WANT" > "$STAMP"
fi
# The gallery test drives a headless Chromium: Debian's package, installed only when missing and when running
# as root with apt-get (elsewhere nothing happens and that one test is skipped, saying why).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null 2>&1 \
    || echo "install.sh: could not install chromium; the gallery browser test will be skipped" >&2
fi
