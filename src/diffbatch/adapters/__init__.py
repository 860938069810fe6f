"""Model-family adapters. ``load_adapter`` picks one from the pipeline's model_index.json."""

from .base import Adapter, Cond
from .loading import load_adapter

__all__ = ["Adapter", "Cond", "load_adapter"]
