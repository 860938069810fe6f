"""Step caching per request (issue 21): what a spec's ``cache`` field may say. Torch-free: the CLI, the HTTP
edge and the ``--ray`` driver check it without a model.

``off`` (the default: every step computes the whole denoiser), ``auto`` (the model family's recommended
method and setting, fixed at resolve time so the PNG records what ran), or ``METHOD:VALUE``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from .numbers import parse_int, parse_number

OFF, AUTO = "off", "auto"


@dataclass(frozen=True)
class Method:
    name: str
    parse: Callable[[str], float]  # the VALUE's type
    low: float
    high: float
    meaning: str  # what VALUE is, for help texts and errors


METHODS = {m.name: m for m in (
    Method("deepcache", int, 2, 10, "UNet families: compute the deep UNet features every VALUE steps (2-10) and "
                                    "on the first fifth and last tenth of steps, reuse them in between (DeepCache, "
                                    "Ma et al. 2023)"),
    Method("fbcache", float, 0.0, 1.0, "transformer families: skip the other blocks while the first block's "
                                       "residual changes by less than VALUE (0-1) relative (First-Block-Cache)"),
)}
RULE = f"must be {OFF}, {AUTO}, " + " or ".join(f"{m.name}:VALUE ({m.low:g}-{m.high:g})" for m in METHODS.values())


@dataclass(frozen=True)
class CacheSetting:
    method: str
    value: float


def parse_cache(text: str) -> CacheSetting | None:
    """``None`` for ``off`` (and ``auto``, which only a model can resolve); ``ValueError`` saying what is wrong."""
    if text in (OFF, AUTO):
        return None
    name, sep, raw = text.partition(":")
    method = METHODS.get(name)
    if method is None or not sep:
        raise ValueError(RULE)
    try:  # ASCII digits only: int() also takes '٣', '３', ' 3' and '0_3'
        value = parse_int(raw, "VALUE") if method.parse is int else parse_number(raw, "VALUE")
    except ValueError:
        raise ValueError(f"{name}: VALUE must be {'an integer' if method.parse is int else 'a number'} of the "
                         "digits 0-9") from None
    if not method.low <= value <= method.high:
        raise ValueError(f"{name}: VALUE must be from {method.low:g} to {method.high:g}")
    return CacheSetting(name, value)


def canonical_cache(text: str) -> str:
    """``text`` as written into PNGs and manifests, one text for one setting: ``deepcache:05`` -> ``deepcache:5``,
    ``fbcache:0.10`` -> ``fbcache:0.1``; exact, and without an exponent (which ``parse_cache`` would refuse)."""
    setting = parse_cache(text)
    if setting is None:
        return text
    raw = text.partition(":")[2]
    number = str(int(raw)) if METHODS[setting.method].parse is int else format(Decimal(raw).normalize(), "f")
    return f"{setting.method}:{number}"


def cache_ok(value: object) -> bool:
    """The spec field's rule: a string ``parse_cache`` accepts."""
    if not isinstance(value, str) or len(value) > 40:
        return False
    try:
        parse_cache(value)
    except ValueError:
        return False
    return True
