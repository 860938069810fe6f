"""diffbatch: a step-level batch inference engine for diffusion image models."""

from .engine import Engine, Result
from .errors import DiffbatchError, InputError, ModelLoadError, SpecError
from .spec import GenerationSpec, ModelDefaults

__all__ = ["DiffbatchError", "Engine", "GenerationSpec", "InputError", "ModelDefaults", "ModelLoadError",
           "Result", "SpecError"]
__version__ = "0.1.0"
