"""Numbers as people type them, read one way wherever they are typed (flags, sweeps, templates, cache values, JSON
lines): ASCII digits only, and a length cap checked before any conversion. Python's ``int()`` also takes ``'٣'``,
``'３'``, ``' 3'`` and ``'0_3'``, and refuses an integer of more than 4,300 digits with a traceback of its own.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DIGITS = 40  # far past any seed (2**63 has 19 digits) or count, far short of a 4,300-digit int()
INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only (re's \d matches every script's digits)


def parse_int(text: str, what: str) -> int:
    """``text`` as an integer of ASCII digits (an optional sign, no blanks, no underscores); ``ValueError``
    naming ``what`` otherwise."""
    if not INTEGER.fullmatch(text):
        raise ValueError(f"{what} {text[:40]!r} is not an integer of the digits 0-9")
    return _capped_int(text, what)


def loads_json(text: str) -> Any:
    """``json.loads`` with its integers capped at ``MAX_DIGITS`` digits (``ValueError`` saying so)."""
    return json.loads(text, parse_int=lambda digits: _capped_int(digits, "an integer"))


def _capped_int(text: str, what: str) -> int:
    digits = len(text.lstrip("+-"))
    if digits > MAX_DIGITS:
        raise ValueError(f"{what} of {digits} digits is too long (at most {MAX_DIGITS})")
    return int(text)


DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")  # 7, -1.5, .5, 3. (no exponent, no blanks)


def parse_number(text: str, what: str) -> float:
    """``text`` as a decimal number of ASCII digits, at most ``MAX_DIGITS`` of them; ``ValueError`` naming
    ``what`` otherwise (``float()`` also takes other scripts' digits, ``1e999``, ``inf`` and ``nan``)."""
    if not DECIMAL.fullmatch(text):
        raise ValueError(f"{what} {text[:40]!r} is not a decimal number of the digits 0-9")
    digits = sum(c.isdigit() for c in text)
    if digits > MAX_DIGITS:
        raise ValueError(f"{what} of {digits} digits is too long (at most {MAX_DIGITS})")
    return float(text)
