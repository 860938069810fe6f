"""Errors meant for people: each says what was wrong, where, and what is allowed."""


class DiffbatchError(ValueError):
    """Base of every input error diffbatch raises; a ``ValueError`` so callers can catch either."""


class SpecError(DiffbatchError):
    """A generation spec (or a field of one) is invalid."""


class InputError(DiffbatchError):
    """An input file (prompts, jsonl, init image) is missing, empty or malformed."""


class ModelLoadError(DiffbatchError):
    """A model path or hub id cannot be loaded as a supported diffusers pipeline."""
