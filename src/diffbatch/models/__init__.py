"""Models shipped inside the package (package data): the embedded default shapes model."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

DEFAULT_MODEL = "shapes"


def model_folder() -> Path:
    """Where the embedded default model lives (package data), whether or not it is there."""
    return Path(str(importlib.resources.files(__name__) / DEFAULT_MODEL))


def default_model_path() -> Path:
    """Folder of the embedded default model (a diffusers Stable Diffusion layout), from any cwd or wheel."""
    folder = model_folder()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"the embedded model is missing at {folder}: regenerate it with "
                                "`python -m diffbatch_shapes.training.shapes` (the repository's shapes/ package)")
    return folder
