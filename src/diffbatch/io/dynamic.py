"""Dynamic prompts: ``{red|blue} {circle|square}`` variants and ``__name__`` wildcards, expanded through the
``dynamicprompts`` library (the one AUTOMATIC1111's Dynamic Prompts extension and ComfyUI nodes use), not a
parser of our own.

- ``combinatorial``: every variant of each template, in the library's order;
- ``random:N``: N draws per template, seeded by the job's ``--seed`` and the template's position, so the same
  job draws the same prompts;
- wildcards: ``__name__`` reads ``WILDCARDS/name.txt`` (one value per line); a wildcard with no file, or one
  used without a wildcards folder, is refused (the library would leave ``__name__`` in the prompt).

Torch-free, as the rest of planning a job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, SpecError, shown
from ..numbers import parse_int
from .text import decode_text

COMBINATORIAL = "combinatorial"
RANDOM = "random"
MAX_DRAWS = 10**12  # random:N takes N below this


@dataclass(frozen=True)
class Dynamic:
    """How templates expand: every variant (``count`` None) or ``count`` random draws."""

    count: int | None = None
    wildcards: str | None = None  # folder of NAME.txt files

    @property
    def text(self) -> str:
        return COMBINATORIAL if self.count is None else f"{RANDOM}:{self.count}"


def parse_dynamic(text: str, wildcards: str | None = None) -> Dynamic:
    """``combinatorial`` (the default of a bare ``--dynamic``) or ``random:N``."""
    value = text.strip().lower()
    if value == COMBINATORIAL:
        return Dynamic(None, wildcards)
    method, _, count = value.partition(":")
    if method == RANDOM and 1 <= _count(count.strip()) < MAX_DRAWS:
        return Dynamic(_count(count.strip()), wildcards)
    rule = "use combinatorial, or random:N with N from 1 to 10**12 - 1"
    raise SpecError(f"--dynamic {shown(text, 60)} is invalid: {rule}", field="dynamic", value=text, reason=rule)


def _count(text: str) -> int:
    """A draw count as numbers.py reads every number, unsigned; 0 (refused) for anything it refuses."""
    try:
        return parse_int(text, "N") if text[:1] in "0123456789" and text else 0
    except ValueError:
        return 0


def expand(template: str, dynamic: Dynamic, seed: int, limit: int | None, where: str,
           manager: Any = None) -> list[str]:
    """The prompts ``template`` stands for (at most ``limit`` + 1 of them: the caller refuses a job past its
    limit); raises ``InputError`` naming ``where`` for a malformed template or an unknown wildcard. ``manager``:
    a ``wildcard_manager(dynamic.wildcards)`` to share between templates (one is made otherwise)."""
    from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
    from pyparsing import ParseBaseException

    manager = manager if manager is not None else wildcard_manager(dynamic.wildcards)
    try:
        with _unknown_wildcards(where, dynamic.wildcards), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the library's pyparsing calls, not the user's
            if dynamic.count is None:
                found = CombinatorialPromptGenerator(wildcard_manager=manager).generate(
                    template, max_prompts=None if limit is None else limit + 1)
            else:
                generator = RandomPromptGenerator(wildcard_manager=manager, seed=seed)
                count = dynamic.count if limit is None else min(dynamic.count, limit + 1)  # random:10**9
                found = generator.generate(template, num_images=count)
    except ParseBaseException as exc:
        raise InputError(f"{where}: malformed dynamic prompt {template!r}: {exc.msg} (column {exc.col})") from None
    if not found:
        raise InputError(f"{where}: the dynamic prompt {template!r} expands to no prompt")
    return [str(p) for p in found]


def wildcard_manager(folder: str | None) -> Any:
    """The library's wildcard manager over ``folder``'s files, its ``.txt`` files read as prompts files are
    (io/text.py: UTF-8 or a byte-order mark, anything else refused naming the file; the library dropped Latin-1
    bytes and kept a UTF-8 mark in the prompt), a symlink loop not followed round (``_loops_back``)."""
    from dynamicprompts.wildcards.wildcard_manager import WildcardManager

    if not folder:
        return WildcardManager()
    return WildcardManager(root_map={"": [_collections(Path(folder))]})


def _collections(root: Path) -> dict[str, Any]:
    from dynamicprompts.wildcards.collection.structured import parse_structured_file

    found: dict[str, Any] = {}
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and not _loops_back(folder, d)]
        for name in sorted(files):
            path = Path(folder) / name
            key = path.relative_to(root).with_suffix("").as_posix()
            if path.suffix == ".txt":
                found[key] = _wildcard_file(path)
            elif path.suffix in (".json", ".yaml"):
                prefix = path.parent.relative_to(root).as_posix()
                for name_in_file, collection in _structured(path, parse_structured_file):
                    found[name_in_file if prefix == "." else f"{prefix}/{name_in_file}"] = collection
    return found


def _loops_back(folder: str, name: str) -> bool:
    """Whether ``folder/name`` is ``folder`` itself or a folder above it (a symlink loop: walking it never ends); a
    link to a folder elsewhere is walked under its own name too, as the library does."""
    here, there = os.path.realpath(folder), os.path.realpath(os.path.join(folder, name))
    return here == there or here.startswith(there.rstrip(os.sep) + os.sep)


def _structured(path: Path, parse: Any) -> list[tuple[str, Any]]:
    try:
        return list(parse(path))
    except Exception as exc:  # noqa: BLE001 - YAML/JSON errors of the library's parsers, said with the file
        raise InputError(f"wildcard file {path}: cannot read it: {exc}"[:300]) from None


def _wildcard_file(path: Path) -> Any:
    from dynamicprompts.wildcards.collection import WildcardTextFile

    class PromptsFileWildcard(WildcardTextFile):
        """A wildcard ``.txt`` file read as a prompts file: one value per line, blank and ``#`` lines skipped."""

        def read_text(self) -> str:
            try:
                data = self._path.read_bytes()
            except OSError as exc:
                raise InputError(f"wildcard file {self._path}: cannot read it: {exc.strerror}") from None
            return decode_text(data, f"wildcard file {self._path}")

        def get_values(self) -> list[str]:
            if self._cache is None:
                lines = (line.strip() for line in self.read_text().splitlines())
                self._cache = [line for line in lines if line and not line.startswith("#")]
            return self._cache

    return PromptsFileWildcard(path)


class _Unknown(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("No values found for wildcard"):
            self.names.append(message.rsplit(" ", 1)[-1].strip("'\""))


@contextlib.contextmanager
def _unknown_wildcards(where: str, folder: str | None) -> Iterator[None]:
    """The library logs an unknown wildcard and leaves it in the prompt: here it is an error."""
    handler = _Unknown()
    logger = logging.getLogger("dynamicprompts")
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    if handler.names:
        name = handler.names[0]
        file = Path(folder) / f"{name}.txt" if folder else None
        if file is not None and file.is_file() and not _wildcard_file(file).get_values():
            raise InputError(f"{where}: wildcard __{name}__: {Path(folder) / name}.txt holds no values (every line "
                             "blank or a # comment)")
        place = f"no {name}.txt in --wildcards {folder}" if folder else "no --wildcards folder given"
        raise InputError(f"{where}: unknown wildcard __{name}__ ({place})")


def expand_prompts(template: str, mode: str = COMBINATORIAL, seed: int = 0, wildcards: str | None = None) -> list[str]:
    """The library's dynamic prompts: the prompts ``template`` expands to (``mode``: combinatorial or random:N,
    ``seed``: the random draws'), every one of them (no job-size limit here)."""
    return expand(template, parse_dynamic(mode, wildcards), seed, None, "template")
