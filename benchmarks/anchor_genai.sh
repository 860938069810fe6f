#!/usr/bin/env bash
# The fast-path anchor (issue 12): OpenVINO GenAI's Text2ImagePipeline vs diffbatch on the same random SD-1.5
# weights (benchmarks/anchor_genai.py). GenAI and optimum-intel live in a throwaway venv (GENAI_VENV, default
# /tmp/genai-venv), created here when missing, so their pins never touch .venv. Prints both sides' JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GENAI_VENV:-/tmp/genai-venv}
WORK=${WORK:-$(mktemp -d)}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==2.13.0" 2>/dev/null || "$VENV/bin/pip" install -q torch
  "$VENV/bin/pip" install -q "optimum-intel[openvino]" openvino-genai diffusers
fi
.venv/bin/python benchmarks/anchor_genai.py save "$WORK/sd15"
PATH="$VENV/bin:$PATH" "$VENV/bin/python" benchmarks/anchor_genai.py genai "$WORK/sd15" "$WORK/genai.json"
.venv/bin/python benchmarks/anchor_genai.py diffbatch "$WORK/sd15" "$WORK/diffbatch.json"
cat "$WORK/genai.json" "$WORK/diffbatch.json"
