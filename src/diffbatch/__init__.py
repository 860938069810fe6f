"""diffbatch: a step-level batch inference engine for diffusion image models.

``Engine`` and ``Result`` load torch and diffusers on first use, so the CLI can answer bad input (and set
library verbosity) before paying for, or printing from, those imports.
"""

from typing import TYPE_CHECKING, Any

from .errors import DiffbatchError, InputError, ModelLoadError, SpecError
from .io.dynamic import expand_prompts
from .io.sweep import sweep
from .spec import GenerationSpec, ModelDefaults

if TYPE_CHECKING:
    from .engine import Engine, Result

__all__ = ["DiffbatchError", "Engine", "GenerationSpec", "InputError", "ModelDefaults", "ModelLoadError",
           "Result", "SpecError", "expand_prompts", "sweep"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("Engine", "Result"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'diffbatch' has no attribute {name!r}")
