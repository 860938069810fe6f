#!/usr/bin/env bash
# The core-only check (CI's second step, after `make test`): a second venv, .venv-core, with diffbatch's core
# dependencies and the test runner only -- no server, ray, openvino, lora or test extras (fastapi, uvicorn,
# httpx, openai, ray, openvino, peft, playwright, schemathesis). Every test module must collect, the ones that
# need an extra skip saying which, and every test that needs none runs and passes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-core
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q "torch==2.13.0" 2>/dev/null || "$VENV/bin/pip" install -q torch
fi
"$VENV/bin/pip" install -q -e . -e ./shapes "pytest>=8" "pytest-timeout>=2.3"
"$VENV/bin/python" - <<'PY' || exit 1
import importlib.util, sys
sys.path.insert(0, "tests")
from extras import EXTRA  # the optional modules the tests use (one list)
present = sorted({name.partition(".")[0] for name in EXTRA if importlib.util.find_spec(name.partition(".")[0])})
if present:
    sys.exit(f"core_check.sh: {', '.join(present)} installed in .venv-core: this is not a core-only environment")
PY
"$VENV/bin/python" -m pytest -p no:cacheprovider -rs "$@"
