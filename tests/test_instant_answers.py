"""Answers that need no model import neither torch nor diffusers (issue 34): help, the version, argument errors,
dry runs, one-line refusals. Importing them took 6-7 s of every such answer; the import graph is what is
checked here (each command in a fresh interpreter), the seconds are benchmarked, not asserted."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from diffbatch.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


@pytest.mark.parametrize("argv", [
    ["--help"], ["--version"], ["generate", "--help"], ["serve", "--help"], ["generate", "--bogus"],
    ["generate", "--prompt", "a {red|blue} circle", "--dynamic", "--sweep", "steps=2,3", "--sweep", "guidance=1,5",
     "--sweep", "sampler=ddim,euler_a", "--dry-run", "--out", "unused"],
    ["generate", "--prompt", "x", "--steps", "0", "--out", "unused"],
    ["gallery", "no-such-folder"],
], ids=["help", "version", "generate-help", "serve-help", "bad-flag", "dry-run-sweep", "bad-steps", "gallery"])
def test_an_answer_that_needs_no_model_imports_no_torch(argv, tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    heavy = next(line for line in done.stdout.splitlines() if line.startswith("HEAVY:"))
    assert heavy == "HEAVY:", f"{argv} imported {heavy[6:]}"
