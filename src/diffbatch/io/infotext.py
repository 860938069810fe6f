"""Read settings back from a PNG's ``parameters`` text chunk (``diffbatch generate --from IMAGE``): the
infotext diffbatch writes (io/writer.py ``format_parameters``) and the one AUTOMATIC1111 writes, which share
a format: the prompt, an optional ``Negative prompt:`` line, then one line of ``Key: value`` settings
(values holding ``,`` or ``:`` JSON-quoted)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError

from ..errors import InputError, SpecError, shown
from ..numerics import DEFAULT as DEFAULT_NUMERICS
from ..numerics import KEY as NUMERICS_KEY
from ..numerics import NumericPath, parse_numerics
from ..samplers import MISSING, SAMPLERS, schedule_taken
from ..spec import EDGES, PARSE, check_field, parse_size
from .a1111 import REASONS, exif_parameters, unhonoured
from .writer import PARAMETERS_KEY

# The settings line is read as A1111's modules/infotext_utils.py re_param_code reads it,
# \s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$) with findall: a key, then a JSON-quoted value or a plain
# one up to the next comma. Not with that expression itself: findall retries it from every character of a long run
# of key characters with no colon after it, each try running to the end of the run (quadratic: 60 KB of "a" took
# 36 s). These pieces each run once over the text they match.
KEY = re.compile(r"\w[\w \-/]*")  # a run of key characters from its first word character: no backtracking
SPACES = re.compile(r"\s*")
QUOTED = re.compile(r'"(?:\\.|[^\\"])++"')
NEGATIVE = "Negative prompt:"
LABELS = {sampler.label: name for name, sampler in SAMPLERS.items()}  # "Euler a" -> "euler_a"
KEYS = {edges.key.name: (name, edges.key.read or PARSE[edges.kind]) for name, edges in EDGES.items()
        if edges.key is not None}
# The fields each key sets
KEY_FIELDS = {**{key: (name,) for key, (name, _) in KEYS.items()}, "Size": ("width", "height"),
              "Sampler": ("scheduler",), "Init image": ("image",)}


@dataclass
class Infotext:
    """What a PNG says: spec fields, the model's name, and the sampler as written (``default_sampler``: a
    diffusers class name, meaning the model's own sampler, which the caller checks against the model)."""

    fields: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    default_sampler: str | None = None
    image_hash: str | None = None  # A1111's "Init image hash": the init image file's fingerprint when made
    settings: dict[str, str] = field(default_factory=dict)  # every key of its settings line, as written
    refused: dict[str, str] = field(default_factory=dict)  # the keys diffbatch does not honour, and why (a1111.py)
    a1111: str | None = None  # the AUTOMATIC1111 (or Forge) version that made it; None: diffbatch
    # The numeric path it was made on: diffbatch writes the key off float32 on a CPU, so its PNG without one was made
    # there; None for an AUTOMATIC1111 PNG (``Version:``, no key): made on a path nobody recorded
    numerics: NumericPath | None = DEFAULT_NUMERICS


    def ignore(self, keys: list[str] | set[str]) -> None:
        """Make it without these keys (``--ignore``): not refused, and the fields they set left to the defaults."""
        for key in keys:
            self.refused.pop(key, None)
            for name in KEY_FIELDS.get(key, ()):
                self.fields.pop(name, None)
            if key == "Sampler":
                self.default_sampler = None


def read_infotext(path: Path) -> Infotext:
    """The settings of the PNG at ``path``; ``InputError`` naming the file when it has none or they are bad."""
    try:
        return parse_infotext(png_parameters(path))
    except ValueError as exc:
        raise InputError(f"--from {path}: {exc}") from None


def png_parameters(source: str | os.PathLike | BinaryIO) -> str:
    """The ``parameters`` text of an image (a path or a binary file); ``ValueError`` saying what is wrong."""
    try:
        with Image.open(source) as image:
            text = image.info.get(PARAMETERS_KEY)
            if text is None and image.format in ("JPEG", "WEBP"):  # A1111 writes them into the EXIF there
                text = exif_parameters(image)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read it as an image: {exc}") from None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"no '{PARAMETERS_KEY}' text in it (a PNG's text chunk, or a JPEG's or WebP's EXIF "
                         "UserComment: not written by diffbatch or AUTOMATIC1111)")
    return text


def parse_infotext(text: str) -> Infotext:
    lines = text.strip("\n").split("\n")
    settings = _settings(lines[-1], whole_line=len(lines) == 1)  # one line: settings only, no prompt
    if "Steps" not in settings:
        raise ValueError("its parameters have no settings line (Steps: ..., Seed: ...)")
    body = lines[:-1]
    negative = next((i for i, line in enumerate(body) if line.startswith(NEGATIVE)), len(body))
    found = Infotext(model=settings.get("Model"), image_hash=settings.get("Init image hash"), settings=settings,
                     refused=unhonoured(settings, set(KEYS)))
    if NUMERICS_KEY in settings:
        found.numerics = parse_numerics(settings[NUMERICS_KEY])
    elif "Version" in settings:  # A1111 and Forge write their version; diffbatch does not
        found.numerics = None
        found.a1111 = settings["Version"]
    if "Denoising strength" in settings and not ({"Init image", "Init image hash", "Hires upscale"} & set(settings)):
        found.refused["Denoising strength"] = REASONS["Denoising strength"]
    found.fields["prompt"] = "\n".join(body[:negative])
    if negative < len(body):
        found.fields["negative_prompt"] = "\n".join(body[negative:])[len(NEGATIVE):].strip()
    for key, (name, kind) in KEYS.items():
        if key in settings and (value := _value(key, settings[key], kind)) is not None:  # None: unset (Automatic)
            found.fields[name] = value
    if "Size" in settings:
        found.fields["width"], found.fields["height"] = parse_size(settings["Size"])
    if "Init image" in settings:
        found.fields["image"] = settings["Init image"]
    _sampler(settings, found)
    _check_fields(found)
    return found


def _check_fields(found: Infotext) -> None:
    """Every value the PNG gives by each field's own rule: a value diffbatch does not take (``Hires upscaler:
    4x-UltraSharp``, ``Cache: deepcache:٣``) is refused naming its key, like a key it does not honour, rather than
    offered to a client or sent on to fail later."""
    for name, value in list(found.fields.items()):
        try:
            check_field(name, value)
        except SpecError as exc:
            key = next((k for k, fields in KEY_FIELDS.items() if name in fields), name)
            found.refused[key] = str(exc.reason)
            del found.fields[name]


def _settings(line: str, whole_line: bool = False) -> dict[str, str]:
    """The ``Key: value`` pairs of a settings line (a later key wins); none unless the first starts the line
    when ``whole_line``."""
    found: dict[str, str] = {}
    for start, key, value in _pairs(line):
        if whole_line and not found and start != SPACES.match(line).end():
            return {}
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        found[key.strip()] = value
    return found


def _pairs(line: str) -> Iterator[tuple[int, str, str]]:
    """(where the key starts, key, value) as ``re_param_code``'s findall finds them, in one pass: a key is tried
    from the first word character of a run of key characters only, since a try from later in the run ends at
    the same character, and fails alike."""
    pos = 0
    while (key := KEY.search(line, pos)) is not None:
        start, key_end = key.span()
        pos = key_end
        if key_end - start >= 2 and line.startswith(":", key_end):
            value_start = SPACES.match(line, key_end + 1).end()
            value_end, pos = _value_end(line, value_start)
            yield start, line[start:key_end], line[value_start:value_end]


def _value_end(line: str, start: int) -> tuple[int, int]:
    """Where a value starting at ``start`` ends, and where the next key may start: a JSON-quoted value when a
    comma or the end follows its closing quote, else everything up to the next comma."""
    quoted = QUOTED.match(line, start)
    if quoted is not None and _ends_value(line, quoted.end()):
        end = quoted.end()
    else:
        comma = line.find(",", start)
        end = len(line) if comma < 0 else comma
    return end, end + 1 if line.startswith(",", end) else end


def _ends_value(line: str, pos: int) -> bool:
    """``(?:,|$)`` at ``pos``: a comma, the end, or a newline that ends the text."""
    return line.startswith(",", pos) or pos == len(line) or (pos == len(line) - 1 and line[pos] == "\n")


def _value(key: str, value: str, kind: type) -> int | float | str | None:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{key}: {shown(value)} is not a number") from None


def _sampler(settings: dict[str, str], found: Infotext) -> None:
    """The sampler and its schedule: A1111's label (older A1111 wrote the schedule into it: ``DPM2 a Karras``),
    or diffbatch's class name of a model's own sampler; what diffbatch lacks is refused by name."""
    # (a schedule diffbatch does not have at all is refused by the field's rule, _check_fields)
    label = settings.get("Sampler")
    if label is None:
        return
    base, suffix = label, None
    for name in ("Karras", "Exponential"):
        if label not in LABELS and label.endswith(" " + name) and label[: -len(name) - 1] in LABELS:
            base, suffix = label[: -len(name) - 1], name.lower()
    if base in LABELS:
        found.fields["scheduler"] = LABELS[base]
        if suffix is not None:
            found.fields.setdefault("schedule", suffix)
        if not schedule_taken(LABELS[base], found.fields.get("schedule")):
            found.refused["Schedule type"] = f"diffbatch's {base} has no {found.fields.pop('schedule')} schedule"
    elif label.endswith("Scheduler"):  # diffbatch writes the model's own sampler as its class name
        found.default_sampler = label
    else:
        found.refused["Sampler"] = MISSING.get(label, f"diffbatch has no such sampler (it has {', '.join(LABELS)}, "
                                                      "or the model's own)")
