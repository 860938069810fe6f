"""Errors meant for people: each says what was wrong, where, and what is allowed.

They carry structure too (``field``, and for spec errors ``value`` and ``reason``): the CLI turns a field
into its flag and the server into OpenAI's ``param`` from these, never by reading the message.
"""

from __future__ import annotations

import errno
import sqlite3
from typing import Any

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiffbatchError(ValueError):
    """Base of every input error diffbatch raises; a ``ValueError`` so callers can catch either."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field  # the GenerationSpec field (or request input) at fault, where there is one


class SpecError(DiffbatchError):
    """A generation spec (or a field of one) is invalid: ``field`` had ``value``; ``reason`` says what is
    allowed. The message is ``field=value is invalid: reason`` unless one is given."""

    def __init__(self, message: str | None = None, *, field: str | None = None, value: Any = None,
                 reason: str | None = None) -> None:
        super().__init__(message or f"{field}={shown(value)} is invalid: {reason}", field)
        self.value = value
        self.reason = reason


class InputError(DiffbatchError):
    """An input file (prompts, jsonl, init image) is missing, empty or malformed."""


class ModelLoadError(DiffbatchError):
    """A model path or hub id cannot be loaded as a supported diffusers pipeline."""


def shown(value: Any, limit: int = 100) -> str:
    """``repr(value)`` for a message, cut after about ``limit`` characters: a megabyte of prompt is not for people
    (and a server would send it back)."""
    text = repr(value[:limit]) if isinstance(value, str) else repr(value)
    if isinstance(value, str) and len(value) > limit:
        return f"{text}... ({len(value)} characters)"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def is_disk_full(exc: BaseException) -> bool:
    """A write failed for want of space: the disk (or a quota) is full, for a file or for SQLite."""
    if isinstance(exc, sqlite3.OperationalError):
        return "full" in str(exc)  # "database or disk is full"
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS
