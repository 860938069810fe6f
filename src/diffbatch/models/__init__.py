"""Models shipped inside the package (package data): the embedded default shapes model."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

DEFAULT_MODEL = "shapes"


def default_model_path() -> Path:
    """Folder of the embedded default model (a diffusers Stable Diffusion layout), from any cwd or wheel."""
    folder = Path(str(importlib.resources.files(__name__) / DEFAULT_MODEL))
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded model is missing at {folder}: regenerate it with `python -m diffbatch.training.shapes`")
    return folder
