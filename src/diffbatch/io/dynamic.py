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
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, SpecError

COMBINATORIAL = "combinatorial"
RANDOM = "random"


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
    if method == RANDOM and count.strip().isdigit() and int(count) >= 1:
        return Dynamic(int(count), wildcards)
    raise SpecError(f"--dynamic {text!r} is invalid: use combinatorial, or random:N with N >= 1", field="dynamic",
                    value=text, reason="use combinatorial, or random:N with N >= 1")


def expand(template: str, dynamic: Dynamic, seed: int, limit: int | None, where: str) -> list[str]:
    """The prompts ``template`` stands for (at most ``limit`` + 1 of them: the caller refuses a job past its
    limit); raises ``InputError`` naming ``where`` for a malformed template or an unknown wildcard."""
    from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
    from dynamicprompts.wildcards.wildcard_manager import WildcardManager
    from pyparsing import ParseBaseException

    manager = WildcardManager(Path(dynamic.wildcards)) if dynamic.wildcards else WildcardManager()
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
        place = f"no {name}.txt in --wildcards {folder}" if folder else "no --wildcards folder given"
        raise InputError(f"{where}: unknown wildcard __{name}__ ({place})")


def expand_prompts(template: str, mode: str = COMBINATORIAL, seed: int = 0, wildcards: str | None = None) -> list[str]:
    """The library's dynamic prompts: the prompts ``template`` expands to (``mode``: combinatorial or random:N,
    ``seed``: the random draws'), every one of them (no job-size limit here)."""
    return expand(template, parse_dynamic(mode, wildcards), seed, None, "template")
