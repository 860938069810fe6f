"""Parameter sweeps: AUTOMATIC1111's X/Y/Z plot, as one job of one mixed batch.

``--sweep FIELD=V1,V2,...`` (up to three: X, Y, Z) makes every prompt and ``-n`` image once per cell of the
axes' product; every cell is a request of its own (its own PNG parameters, ``--from`` regenerates it), and all
of them share one engine, so a guidance x steps x sampler grid runs in the same denoiser calls.

- FIELD: a spec field (``num_inference_steps``, ``guidance_scale``, ``scheduler``, ``seed``, ``strength``, ...),
  a short name (``steps``, ``guidance``/``cfg``, ``sampler``, ``negative``), ``size`` (``WxH``), ``lora:NAME``
  (that LoRA's weight; 0 leaves it out), or ``prompt``: A1111's Prompt S/R, where each value replaces the first
  value's text in the prompt and negative prompt.
- Values: comma-separated (CSV quoting for a value holding a comma); numbers also as A1111's ranges,
  ``10-30 (+10)`` (a step), ``1-2 [5]`` (a count), ``1-4`` (step 1). Each value is checked by its field's own
  rule before anything runs; a sampler may be named by its label (``DPM++ 2M``).
- Seeds: a sweep compares settings on the same noise, as A1111's does: every cell of one prompt's image has the
  seed that image would have without the sweep (``--seed BASE``: image k of the prompts gets BASE + k), unless
  ``seed`` is an axis.

Torch-free: a job's cells are planned (and ``--dry-run`` prints them) without loading a model.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError, shown
from ..numbers import MAX_DIGITS, parse_int, parse_number
from ..samplers import SAMPLERS
from ..spec import EDGES, GenerationSpec, Kind, check_field, parse_size

AXIS_NAMES = ("X", "Y", "Z")
MAX_PROMPT_CHARS = 100_000  # a prompt authoring makes (Prompt S/R here, dynamic templates) may reach; a server: its own
MAX_VALUES = 1000  # values on one axis (a range such as seed=1-1000000 is refused before it is listed)
ALIASES = {"steps": "num_inference_steps", "guidance": "guidance_scale", "cfg": "guidance_scale",
           "sampler": "scheduler", "negative": "negative_prompt", "variation": "variation_strength",
           "hires": "hires_scale", "denoising": "strength"}
SHORT = {"num_inference_steps": "steps", "guidance_scale": "guidance", "negative_prompt": "negative",
         "variation_strength": "variation strength", "variation_seed": "variation seed",
         "guidance_rescale": "CFG rescale", "hires_scale": "hires"}
REPEATABLE = ("prompt",)  # Prompt S/R may be on two axes, as in A1111's X/Y/Z plot (each finds its own text)
NOT_SWEPT = {"prompt": "use prompt=FIND,REPLACE,... (Prompt S/R)", "image": "give --image a folder instead",
             "height": "use size=WxH,...", "width": "use size=WxH,...", "loras": "use lora:NAME=W1,W2,..."}
# ASCII digits only (\d matches every script's, which int() then refuses), each number at most MAX_DIGITS long: a
# longer one is no range, and parse_number refuses it by its length
NUMBER = rf"[+-]?[0-9]{{1,{MAX_DIGITS}}}(?:\.[0-9]{{0,{MAX_DIGITS}}})?"
COUNT = rf"[0-9]{{1,{MAX_DIGITS}}}"
RANGE = re.compile(rf"^\s*({NUMBER})\s*-\s*({NUMBER})\s*(?:\(\s*({NUMBER})\s*\)|\[\s*({COUNT})\s*\])?\s*$")
LABELS = {d.label.lower(): name for name, d in SAMPLERS.items()}


@dataclass(frozen=True)
class Axis:
    """One axis: what it sets (``target``: a spec field, ``size``, ``prompt`` or ``lora:NAME``), its values
    as the spec takes them, and each value's label on the grid (``guidance 7.5``, ``DPM++ 2M``)."""

    text: str  # as given: named in every error about it
    target: str
    values: tuple[Any, ...]
    labels: tuple[str, ...]

    def apply(self, fields: dict[str, Any], k: int, where: str, max_chars: int = MAX_PROMPT_CHARS) -> dict[str, Any]:
        """``fields`` (a spec record) with this axis's value ``k`` set; a replaced prompt longer than ``max_chars``
        is refused before it is built."""
        value = self.values[k]
        if self.target == "size":
            return {**fields, "width": value[0], "height": value[1]}
        if self.target == "prompt":
            return _replace_prompt(fields, self.values[0], value, self.text, where, max_chars)
        if self.target.startswith("lora:"):
            loras = dict(_pairs(fields.get("loras") or {}))
            loras.pop(self.target[5:], None)
            return {**fields, "loras": {**loras, **({self.target[5:]: value} if value else {})}}
        return {**fields, self.target: value}


@dataclass(frozen=True)
class Cell:
    """One cell of the sweep: its position on each axis and its labels (X first)."""

    position: tuple[int, ...]
    labels: tuple[str, ...]

    def record(self) -> dict[str, Any]:
        """What the manifest keeps of the cell (the gallery draws the grids from it)."""
        return {name.lower(): [k, label] for name, k, label in zip(AXIS_NAMES, self.position, self.labels,
                                                                   strict=False)}


@dataclass(frozen=True)
class Sweep:
    axes: tuple[Axis, ...]

    @property
    def size(self) -> int:
        return math.prod(len(axis.values) for axis in self.axes)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(axis.target for axis in self.axes)

    def cells(self) -> Iterator[Cell]:
        """In reading order of the grids: Z outermost, then Y (rows), then X (columns)."""
        ranges = [range(len(axis.values)) for axis in reversed(self.axes)]
        for reversed_position in itertools.product(*ranges):
            position = tuple(reversed(reversed_position))
            yield Cell(position, tuple(a.labels[k] for a, k in zip(self.axes, position, strict=True)))

    def apply(self, fields: dict[str, Any], cell: Cell, where: str, max_chars: int = MAX_PROMPT_CHARS
              ) -> dict[str, Any]:
        for axis, k in zip(self.axes, cell.position, strict=True):
            fields = axis.apply(fields, k, where, max_chars)
        return fields

    def describe(self) -> list[str]:
        """One line per axis, for ``--dry-run``: ``X: guidance 5 | guidance 7.5 | guidance 10``."""
        return [f"{name}: {' | '.join(axis.labels)}" for name, axis in zip(AXIS_NAMES, self.axes, strict=False)]


def parse_sweep(texts: list[str] | tuple[str, ...]) -> Sweep | None:
    """The ``--sweep`` values (``FIELD=V1,V2,...``) as a sweep; None for none. Raises ``SpecError`` naming the
    axis and the value at fault."""
    if not texts:
        return None
    if len(texts) > len(AXIS_NAMES):
        raise SpecError(f"--sweep: {len(texts)} axes given, at most {len(AXIS_NAMES)} (X, Y, Z)", field="sweep")
    axes = tuple(parse_axis(text) for text in texts)
    targets = [axis.target for axis in axes]
    for target in targets:
        if targets.count(target) > 1 and target not in REPEATABLE:
            raise SpecError(f"--sweep: {target} is on more than one axis", field="sweep")
    return Sweep(axes)


def parse_axis(text: str) -> Axis:
    name, sep, values_text = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise SpecError(f"--sweep {text!r}: expected FIELD=V1,V2,... (e.g. guidance=5,7.5,10)", field="sweep")
    target = _target(name, text)
    raw = [v.strip() for v in next(csv.reader([values_text], skipinitialspace=True), [])]
    if not raw or any(v == "" for v in raw):
        raise SpecError(f"--sweep {text!r}: an empty value (give V1,V2,...)", field="sweep")
    values: list[Any] = []
    for value in raw:
        values += _values(target, value, text)
    if len(values) > MAX_VALUES:
        raise SpecError(f"--sweep {text!r}: {len(values)} values, at most {MAX_VALUES} on one axis", field="sweep")
    if target == "prompt" and len(values) < 2:
        raise SpecError(f"--sweep {text!r}: Prompt S/R needs the text to find and at least one replacement",
                        field="sweep")
    return Axis(text, target, tuple(values), tuple(_label(target, v) for v in values))


def _target(name: str, text: str) -> str:
    lowered = name.lower()
    if lowered in ("size", "prompt"):
        return lowered
    if lowered.startswith("lora:"):
        if not name[5:].strip():
            raise SpecError(f"--sweep {text!r}: lora:NAME needs the LoRA's name", field="sweep")
        return "lora:" + name[5:].strip()
    field = ALIASES.get(lowered, lowered)
    if field in NOT_SWEPT:
        raise SpecError(f"--sweep {text!r}: {name} is not swept this way: {NOT_SWEPT[field]}", field="sweep")
    if field not in EDGES:
        known = sorted({*EDGES, *ALIASES, "size", "lora:NAME"} - set(NOT_SWEPT) | {"prompt"})
        raise SpecError(f"--sweep {text!r}: unknown field {name!r}; one of: {', '.join(known)}", field="sweep")
    return field


def _values(target: str, value: str, text: str) -> list[Any]:
    """One comma-separated entry as the values it stands for (a range is several), each checked."""
    if target in ("prompt", "negative_prompt"):
        return [value]
    if target == "size":
        try:
            size = parse_size(value)
            check_field("width", size[0])
            check_field("height", size[1])
        except SpecError as exc:
            raise _bad(text, value, exc.reason or str(exc)) from None
        return [size]
    lora = target.startswith("lora:")
    kind = Kind.NUMBER if lora else EDGES[target].kind
    if kind in (Kind.INT, Kind.NUMBER):
        found = _range(value, kind, text) if RANGE.match(value) else [_number(value, kind, text)]
    else:
        key = EDGES[target].key
        read = key.read if key is not None and key.read is not None else (lambda v: v)  # A1111's labels too
        found = [LABELS.get(value.lower(), value) if target == "scheduler" else read(value)]
    for v in found:
        try:
            check_field("loras", ((target[5:], v),)) if lora else check_field(target, v)
        except SpecError as exc:
            raise _bad(text, _shown(v), exc.reason or str(exc)) from None
    return found


def _number(value: str, kind: Kind, text: str) -> int | float:
    try:
        return parse_int(value, "the integer") if kind is Kind.INT else parse_number(value, "the number")
    except ValueError:
        what = "an integer" if kind is Kind.INT else "a number"
        raise _bad(text, value, f"must be {what} of the digits 0-9, at most {MAX_DIGITS} of them") from None


def _range(value: str, kind: Kind, text: str) -> list[int | float]:
    """A1111's ranges: ``a-b`` (step 1), ``a-b (+s)``, ``a-b [count]`` (evenly spaced, ends included)."""
    found = RANGE.match(value)
    assert found is not None
    start, end = float(found[1]), float(found[2])
    if found[4] is not None:
        count = int(found[4])
        if not 1 <= count <= MAX_VALUES:
            raise _bad(text, value, f"a range's count must be 1-{MAX_VALUES}")
        points = [start + (end - start) * i / (count - 1) for i in range(count)] if count > 1 else [start]
    else:
        step = float(found[3]) if found[3] is not None else (1.0 if end >= start else -1.0)
        if step == 0 or (end - start) * step < 0:
            raise _bad(text, value, "a range's step must go from its start towards its end")
        count = math.floor((end - start) / step + 1e-9) + 1
        if count > MAX_VALUES:
            raise _bad(text, value, f"the range holds {count} values, at most {MAX_VALUES} on one axis")
        points = [start + step * i for i in range(count)]
    if kind is Kind.INT:
        if any(not float(p).is_integer() for p in (start, end)) or (found[3] and not float(found[3]).is_integer()):
            raise _bad(text, value, "must be integers")
        return [int(round(p)) for p in points]
    return [round(p, 10) for p in points]


def _label(target: str, value: Any) -> str:
    if target == "scheduler":
        return SAMPLERS[value].label if value in SAMPLERS else str(value)
    if target == "size":
        return f"{value[0]}x{value[1]}"
    if target == "prompt":
        return str(value)
    name = target if target.startswith("lora:") else SHORT.get(target, target.replace("_", " "))
    return f"{name} {_shown(value)}"


def _shown(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _bad(text: str, value: str, reason: str) -> SpecError:
    return SpecError(f"--sweep {shown(text)}: {shown(value, 60)} is invalid: {reason}", field="sweep", value=value,
                     reason=reason)


def _pairs(loras: Any) -> list[tuple[str, float]]:
    if isinstance(loras, dict):
        return list(loras.items())
    return [tuple(pair) for pair in loras]


def _replace_prompt(fields: dict[str, Any], find: str, replace: str, text: str, where: str,
                    max_chars: int) -> dict[str, Any]:
    """A1111's Prompt S/R: ``find`` replaced by ``replace`` in the prompt and the negative prompt; their lengths
    are computed, and checked against ``max_chars``, before either is built (ten 4,000-character prompts with
    a 20,000-character replacement of one letter would be 1.6 GB)."""
    prompt, negative = str(fields.get("prompt", "")), str(fields.get("negative_prompt") or "")
    if find not in prompt and find not in negative:
        raise SpecError(f"{where}: --sweep {shown(text)}: Prompt S/R did not find {shown(find)} in the prompt or "
                        "negative prompt", field="sweep")
    for name, original in (("prompt", prompt), ("negative prompt", negative)):
        length = len(original) + original.count(find) * (len(replace) - len(find))
        if length > max_chars:
            raise SpecError(f"{where}: --sweep {shown(text)}: Prompt S/R would make a {name} of {length:,} "
                            f"characters, over the limit of {max_chars:,}", field="sweep")
    changed = {**fields, "prompt": prompt.replace(find, replace)}
    if negative:
        changed["negative_prompt"] = negative.replace(find, replace)
    return changed


def sweep(spec: GenerationSpec, *axes: str) -> list[GenerationSpec]:
    """The library's sweep: ``spec`` once per cell of ``axes`` (``"guidance=5,7.5"``, ...), X fastest; every
    other field, the seed included, as in ``spec``. Pass the list to ``Engine.generate``: one mixed batch."""
    plan = parse_sweep(list(axes))
    if plan is None:
        return [spec]
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    return [GenerationSpec(**plan.apply(fields, cell, "sweep")) for cell in plan.cells()]
