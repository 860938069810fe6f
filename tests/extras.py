"""The optional extras the tests use, and the skip that names the missing one: a module (or fixture) that needs
one calls ``need`` before importing it, so that without the extra it skips saying what to install instead of
failing at collection (scripts/core_check.sh runs the suite that way)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXTRA = {"fastapi": "server", "uvicorn": "server", "httpx": "test", "openai": "test", "ray": "ray",
         "ray.data": "ray", "ray.serve": "ray", "openvino": "openvino", "peft": "lora", "playwright": "test",
         "schemathesis": "test", "hypothesis": "test"}


def need(*modules: str) -> None:
    """Skip the calling module (at import) or test (in a fixture or test) unless every module imports."""
    caller = Path(sys._getframe(1).f_code.co_filename).name  # the skip is reported here, in extras.py
    for module in modules:
        pytest.importorskip(module, reason=f"{caller}: {module} is not installed "
                                           f"(pip install -e '.[{EXTRA[module]}]')")
