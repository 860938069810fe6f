"""Dynamic prompts expanded under a time budget, in a worker process of their own.

A template's cost cannot be read off its length: nested variables (``${a1=${a0}${a0}}...${a8}``, 143 characters)
took the library 16 s, 177 characters 267 s, and 600 ``{a|b}`` groups drawn 20,000 times 213 s. No Python thread
can be stopped mid-expansion, so the expansion runs in a child process (one, kept between jobs, at a lower CPU
priority than the engine), and one that overruns ``BUDGET_S`` is killed and its job refused in one line. Jobs take
turns (one lock): six hostile templates wait for each other, not the server's threads or its engine. The child
also turns Python's RecursionError (``{`` x 200, a wildcard file that names itself) into a refusal by name.

The child speaks JSON lines on its stdin and stdout (``_serve``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

from ..errors import InputError
from .dynamic import Dynamic, expand, wildcard_manager

BUDGET_S = 20.0  # seconds one job's templates may take to expand
NICENESS = 10  # the child's CPU priority below the server's (engine first)
READY = "ready"  # the child's first line
START_S = 60.0  # seconds the child may take to start (import dynamicprompts) before it is given up


@dataclass(frozen=True)
class Template:
    text: str
    seed: int  # its random draws' seed
    where: str  # named in every refusal about it ("prompts.txt:3")


def expand_all(templates: list[Template], dynamic: Dynamic, limit: int | None, max_chars: int,
               budget_s: float | None = None, max_total_chars: int | None = None) -> list[list[str]]:
    """The prompts of each template, stopping once more than ``limit`` are found (the caller refuses the job);
    ``InputError`` for a malformed template, an unknown wildcard, a prompt over ``max_chars`` characters, prompts
    over ``max_total_chars`` characters together (the server's text budget, checked in the child: a refused job's
    prompts never reach this process), or a job whose templates take longer than ``budget_s`` seconds (default
    ``BUDGET_S``)."""
    if not templates:
        return []  # nothing to expand: no worker started
    request = {"templates": [asdict(t) for t in templates], "dynamic": asdict(dynamic), "limit": limit,
               "max_chars": max_chars, "max_total_chars": max_total_chars}
    if os.name != "posix":  # select() on pipes is POSIX: elsewhere the templates expand here, without a budget
        answer = _answer(request)
    else:
        with _LOCK:
            answer = _WORKER.ask(request, BUDGET_S if budget_s is None else budget_s)
    if "error" in answer:
        raise InputError(answer["error"])
    return answer["prompts"]


class _Worker:
    """The child process, started on first use and again after a kill; stopped when this process exits."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        atexit.register(self.stop)

    def ask(self, request: dict, budget_s: float) -> dict:
        where = request["templates"][0]["where"]
        try:
            process = self._running()
            process.stdin.write(json.dumps(request) + "\n")
            process.stdin.flush()
        except OSError as exc:  # could not start, or died before reading (a broken pipe)
            self.stop()
            return {"error": f"{where}: the dynamic prompts could not be expanded: {exc}"}
        if not self._readable(budget_s):
            self.stop()
            return {"error": f"{where}: the dynamic prompts took longer than {budget_s:g} s to expand (nested "
                             "variables or wildcards, or many random draws of many variants); refused"}
        line = process.stdout.readline()
        try:
            return json.loads(line)
        except ValueError:  # the child died (out of memory, killed): an empty or cut line
            self.stop()
            return {"error": f"{where}: the dynamic prompts could not be expanded: the expansion process ended"}

    def _readable(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        stdout = self.process.stdout
        while not select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if time.monotonic() >= deadline:
                return False
        return True

    def _running(self) -> subprocess.Popen:
        """The child, started if needed (in a session of its own: a Ctrl-C is the parent's to handle); the budget
        starts once it is ready (its imports are not the job's)."""
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([sys.executable, "-P", "-c", f"from {__name__} import _serve; _serve()"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                            encoding="utf-8", start_new_session=True)
            if not self._readable(START_S) or self.process.stdout.readline().strip() != READY:
                self.stop()
                raise OSError("the expansion process did not start")
        return self.process

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            for pipe in (self.process.stdin, self.process.stdout):
                with contextlib.suppress(OSError):
                    pipe.close()
            self.process = None


_LOCK = threading.Lock()
_WORKER = _Worker()


def _answer(request: dict) -> dict:
    """In the child: one job's templates expanded, or the error that refuses it."""
    dynamic = Dynamic(**request["dynamic"])
    limit, max_chars, max_total = request["limit"], request["max_chars"], request["max_total_chars"]
    found: list[list[str]] = []
    count = total = 0
    manager = None
    for template in (Template(**t) for t in request["templates"]):
        room = None if limit is None else max(0, limit - count)
        try:
            manager = manager or wildcard_manager(dynamic.wildcards)  # the folder walked once a job
            prompts = expand(template.text, dynamic, template.seed, room, template.where, manager)
        except InputError as exc:
            return {"error": str(exc)}
        except RecursionError:
            return {"error": f"{template.where}: the dynamic prompt nests too deeply, or a wildcard or variable "
                             "refers to itself"}
        except Exception as exc:  # noqa: BLE001 - the library's own failure, said as this template's
            return {"error": f"{template.where}: the dynamic prompt could not be expanded: {exc}"[:500]}
        longest = max(prompts, key=len)
        if len(longest) > max_chars:
            return {"error": f"{template.where}: the dynamic prompt makes a prompt of {len(longest):,} characters, "
                             f"over the limit of {max_chars:,}"}
        total += sum(len(p) for p in prompts)
        if max_total is not None and total > max_total:
            return {"error": f"{template.where}: the dynamic prompts reach {total:,} characters of prompts there, "
                             f"over this job's budget of {max_total:,}"}
        found.append(prompts)
        count += len(prompts)
        if limit is not None and count > limit:
            break  # already over: the caller refuses the job
    return {"prompts": found}


def _serve() -> None:
    if hasattr(os, "nice"):
        os.nice(NICENESS)
    import dynamicprompts.generators  # noqa: F401 - loaded before READY: the budget is the expansion's own

    answers, sys.stdout = sys.stdout, sys.stderr  # the answers' channel is this module's alone: no library prints
    answers.write(READY + "\n")
    answers.flush()
    for line in sys.stdin:
        answers.write(json.dumps(_answer(json.loads(line))) + "\n")
        answers.flush()

