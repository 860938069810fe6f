"""Reading a job: prompts from a text file, a JSON-lines file, stdin or ``--prompt`` flags, as specs.

Seed convention (DESIGN.md): image k of the job (0-based, in order) gets ``base_seed + k`` unless its
line sets ``seed``, so any image can be regenerated alone. With a sweep (io/sweep.py), k counts the images of
the prompts, and every cell of one of them shares its seed (a sweep compares settings on the same noise).
A dynamic prompt (io/dynamic.py) is a line per prompt it expands to.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..errors import InputError, SpecError
from ..numbers import loads_json
from ..seeds import JOB_BASE_SEED, job_seed
from ..spec import GenerationSpec, spec_from_record
from .dynamic import Dynamic
from .expansion import Template, expand_all
from .images import list_images
from .sweep import MAX_PROMPT_CHARS, Cell, Sweep
from .text import decode_text

JSONL_SUFFIXES = (".jsonl", ".ndjson")
STDIN = "-"
AUTHORED_LIMIT = 1000  # images a sweep or dynamic prompts may make a job without --yes


@dataclass(frozen=True)
class JobSource:
    """Where a job's prompts come from, and what applies to every image unless a line says otherwise."""

    prompts_file: str | None = None  # a text or .jsonl file, or "-" for stdin
    prompts: tuple[str, ...] = ()  # --prompt flags (instead of a file)
    prompts_from: str = "--prompt"  # where ``prompts`` came from, named in errors (``--from IMAGE.png``)
    image: str | None = None  # --image: one init image for all prompts, or a folder paired with prompts
    images_per_prompt: int = 1  # -n
    base_seed: int = JOB_BASE_SEED  # --seed: image k gets base_seed + k (seeds.job_seed)
    defaults: dict[str, Any] = field(default_factory=dict)  # spec fields from flags; a jsonl line overrides
    sweep: Sweep | None = None  # --sweep: every image once per cell
    dynamic: Dynamic | None = None  # --dynamic: each prompt a template
    limit: int | None = AUTHORED_LIMIT  # most images a sweep or dynamic prompts may make (None: --yes)
    over_limit: str = "give --yes to run it"  # what the refusal of a job over ``limit`` says to do
    max_prompt_chars: int = MAX_PROMPT_CHARS  # longest prompt authoring may make (Prompt S/R, dynamic templates)
    max_text_chars: int | None = None  # all the prompts dynamic templates may make together (None: no budget)


@dataclass(frozen=True)
class JobItem:
    """One image of the job: its position, its spec (seed assigned) and the input it came from; ``notes``: what
    the job's authoring says of it (its dynamic prompt's ``template``, its ``sweep`` cell), kept in the manifest."""

    index: int
    spec: GenerationSpec
    where: str  # e.g. "prompts.jsonl:3" or "--prompt #1": named in any later error about this image
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _PromptLine:
    fields: dict[str, Any]  # spec fields the input line sets
    where: str


def read_job(source: JobSource, stdin: TextIO | None = None) -> list[JobItem]:
    """Every image of the job, in order; raises ``InputError``/``SpecError`` naming the input at fault."""
    if source.images_per_prompt < 1:
        raise SpecError(f"-n {source.images_per_prompt} is invalid: must be an integer >= 1")
    lines = _read_lines(source, sys.stdin if stdin is None else stdin)
    if source.image is not None:
        lines = _pair_images(lines, list_images(source.image), source.image)
    return _expand(lines, source)


def plan_records(records: list[tuple[dict[str, Any], str]], source: JobSource) -> list[JobItem]:
    """A job from records already read, each with where it came from (the server's batch lines): planned as
    ``read_job`` plans a file's (dynamic prompts, sweep cells, seeds)."""
    return _expand([_PromptLine(record, where) for record, where in records], source)


def _read_lines(source: JobSource, stdin: TextIO) -> list[_PromptLine]:
    if source.prompts_file is not None and source.prompts:
        raise InputError("give a PROMPTS file or --prompt, not both")
    if source.prompts:
        if source.prompts_from != "--prompt":  # one prompt, from a file (--from a PNG): its name
            return [_PromptLine({"prompt": p}, source.prompts_from) for p in source.prompts]
        return [_PromptLine({"prompt": p}, f"--prompt #{i}") for i, p in enumerate(source.prompts, 1)]
    if source.prompts_file is None:
        raise InputError("no prompts: give a PROMPTS file (text or .jsonl), - for stdin, or --prompt TEXT")
    name, text = _read_text(source.prompts_file, stdin)
    lines = _parse_jsonl(name, text) if _is_jsonl(source.prompts_file, text) else _parse_text(name, text)
    if not lines:
        raise InputError(f"{name}: no prompts in it (empty, or only blank and # lines)")
    return lines


def _read_text(path: str, stdin: TextIO) -> tuple[str, str]:
    if path == STDIN:
        buffer = getattr(stdin, "buffer", None)  # a real stdin: its bytes, decoded as a file's are
        return "<stdin>", decode_text(buffer.read(), "<stdin>") if buffer else stdin.read().removeprefix("\ufeff")
    file = Path(path)
    if not file.exists():
        raise InputError(f"{path}: prompts file does not exist")
    if file.is_dir():
        raise InputError(f"{path}: prompts file is a directory")
    try:
        return path, decode_text(file.read_bytes(), path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read prompts file: {exc.strerror}") from None


def _is_jsonl(path: str, text: str) -> bool:
    """Files by suffix; stdin is JSON lines when its first non-blank line starts with ``{``."""
    if path != STDIN:
        return Path(path).suffix.lower() in JSONL_SUFFIXES
    return next((s for s in (r.strip() for r in text.split("\n")) if s), "").startswith("{")


def _numbered(text: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that hold something."""
    stripped = ((n, raw.strip()) for n, raw in enumerate(text.split("\n"), 1))
    return [(n, s) for n, s in stripped if s]


def _parse_text(name: str, text: str) -> list[_PromptLine]:
    return [_PromptLine({"prompt": s}, f"{name}:{n}") for n, s in _numbered(text) if not s.startswith("#")]


def _parse_jsonl(name: str, text: str) -> list[_PromptLine]:
    lines = []
    for n, s in _numbered(text):
        where = f"{name}:{n}"
        try:
            record = loads_json(s)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: malformed JSON line: {exc.msg} (column {exc.colno})") from None
        except RecursionError:  # json's own limit: "[" * 100000 is not a traceback
            raise InputError(f"{where}: malformed JSON line: nested too deeply") from None
        except ValueError as exc:  # an integer too long to read (numbers.py)
            raise InputError(f"{where}: {exc}") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object with a 'prompt', got {type(record).__name__}")
        lines.append(_PromptLine(record, where))
    return lines


def _pair_images(lines: list[_PromptLine], images: list[Path], source: str) -> list[_PromptLine]:
    """One image for all prompts, one prompt for all images, or one image per prompt in sorted order."""
    if len(images) == 1:
        return [_PromptLine({"image": str(images[0]), **line.fields}, line.where) for line in lines]
    if len(lines) == 1:
        return [_PromptLine({"image": str(image), **lines[0].fields}, lines[0].where) for image in images]
    if len(lines) != len(images):
        raise InputError(f"--image {source}: {len(images)} images but {len(lines)} prompts; "
                         "give one prompt for all images, or one prompt per image")
    pairs = zip(lines, images, strict=True)
    return [_PromptLine({"image": str(image), **line.fields}, line.where) for line, image in pairs]


def _expand(lines: list[_PromptLine], source: JobSource) -> list[JobItem]:
    """``images_per_prompt`` images per line (per prompt of a dynamic line), each once per sweep cell; a line's
    own seed S gives its copies S, S+1, ..."""
    variants = _variants(lines, source)
    total = len(variants) * source.images_per_prompt * (source.sweep.size if source.sweep else 1)
    if (source.sweep or source.dynamic) and source.limit is not None and total > source.limit:
        shown = f"more than {source.limit}" if len(variants) > source.limit else str(total)
        raise InputError(f"the job holds {shown} images (prompts x copies x sweep cells), over the limit of "
                         f"{source.limit} for sweeps and dynamic prompts: {source.over_limit}")
    _check_sweep_axes(source)
    cells: list[Cell | None] = list(source.sweep.cells()) if source.sweep else [None]  # counted first: 1000^3
    items: list[JobItem] = []
    image = 0  # the images of the prompts, before the sweep: the k of the seed convention
    for line, template in variants:
        fields = _merge(source.defaults, line.fields)
        if (source.sweep and "strength" in source.sweep.targets and fields.get("image") is None
                and "hires_scale" not in source.sweep.targets and not fields.get("hires_scale")):
            raise InputError(f"{line.where}: --sweep strength: this image has no init image or hires fix, so every "
                             "cell would be the same image labelled differently; give --image (or an image field)")
        for copy in range(source.images_per_prompt):
            for cell in cells:
                swept = (source.sweep.apply(fields, cell, line.where, source.max_prompt_chars)
                         if source.sweep and cell else fields)
                seed = _seed(swept.get("seed"), job_seed(source.base_seed, image), copy)
                spec = spec_from_record({**swept, "seed": seed}, line.where)
                notes = {**({"template": template} if template is not None else {}),
                         **({"sweep": {"image": image, **cell.record()}} if cell else {})}
                items.append(JobItem(len(items), spec, line.where, notes))
            image += 1
    return items


def _check_sweep_axes(source: JobSource) -> None:
    """A seed axis sets each image's seed: copies (``-n``) would get seeds the grid's labels do not show."""
    if source.sweep and "seed" in source.sweep.targets and source.images_per_prompt > 1:
        raise InputError(f"--sweep seed with -n {source.images_per_prompt}: the seed axis gives each cell its seed, "
                         "so copies would be made on seeds its labels do not name; put every seed on the axis "
                         "instead of -n")


def _variants(lines: list[_PromptLine], source: JobSource) -> list[tuple[_PromptLine, str | None]]:
    """Each line, or with dynamic prompts each prompt its template expands to (with the template)."""
    if source.dynamic is None:
        return [(line, None) for line in lines]
    templates = [Template(line.fields["prompt"], job_seed(source.base_seed, n), line.where)
                 for n, line in enumerate(lines) if isinstance(line.fields.get("prompt"), str)]
    expanded = iter(expand_all(templates, source.dynamic, source.limit, source.max_prompt_chars,
                               max_total_chars=source.max_text_chars))
    found: list[tuple[_PromptLine, str | None]] = []
    for line in lines:
        template = line.fields.get("prompt")
        if not isinstance(template, str):
            found.append((line, None))  # not text: left for the spec to reject with the line's name
            continue
        prompts = next(expanded, None)
        if prompts is None:
            break  # the expansion stopped once over the limit: _expand refuses the job
        found += [(_PromptLine({**line.fields, "prompt": prompt}, line.where), template) for prompt in prompts]
    return found


def _merge(defaults: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Flags under the line's fields; a --strength flag only touches images that have an init image."""
    merged = {**defaults, **fields}
    if merged.get("image") is None and "strength" not in fields:
        merged.pop("strength", None)
    return merged


def _seed(own: Any, default: int, copy: int) -> Any:
    """The seed of copy ``copy`` of a line: its own seed S gives S + copy; without one, ``default``."""
    if own is None:
        return default
    if isinstance(own, int) and not isinstance(own, bool):
        return job_seed(own, copy)
    return own  # not an integer: left for the spec to reject with the line's name


def describe_job(items: list[JobItem], source: JobSource, shown: int = 20) -> str:
    """What ``generate --dry-run`` prints: the job's size, its sweep axes and its prompts (the first ``shown``)."""
    cells = source.sweep.size if source.sweep else 1
    lines = [f"{len(items)} images" + (f": {len(items) // cells} images of the prompts x {cells} sweep cells"
                                       if source.sweep else "")]
    if source.sweep:
        lines += source.sweep.describe()
    prompts = list(dict.fromkeys(item.spec.prompt for item in items))
    lines.append(f"{len(prompts)} distinct prompts" + (f" (the first {shown}):" if len(prompts) > shown else ":"))
    lines += [f"  {p}" for p in prompts[:shown]]
    return "\n".join(lines)
