"""The one executor interface: resolved specs in, one future per image out, cancel.

Three executors implement it: ``local.EngineLoop`` (this process's engine in its own thread, continuous
batching), ``ray.RayDataExecutor`` (a Ray Data actor pool of engines, for offline jobs) and
``serve.ReplicaLoop`` (a Ray Serve deployment of engine replicas, for the server). Every driver uses it the same
way: the CLI job (``run_job``: each image written as it finishes), the server's online routes and its batch-job
runner. Specs come resolved (``Resolver.resolve``: checked once, at the edge, with their seeds decided there);
an image is a pure function of its spec, so any executor makes the same bytes for it.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..spec import GenerationSpec

if TYPE_CHECKING:
    from ..io.writer import OutputWriter

STOP_SECONDS = 600.0  # how long an interrupted or failed job waits for the executor's step under way


class QueueFull(Exception):
    """The executor holds its most images: the caller should retry later (HTTP 429)."""


class ShuttingDown(Exception):
    """The executor is stopping and admits nothing new (HTTP 503)."""


class Cancelled(Exception):
    """The caller cancelled these images before they finished (HTTP 409)."""


@dataclass(frozen=True)
class Encoded:
    """A finished image as its PNG bytes (``io.writer.encode_png``, parameters chunk included), made where the
    image was (a Ray Data worker); the other executors' futures hold ``engine.Result``."""

    png: bytes
    seconds: float
    numerics: str = ""  # the numeric path the worker made it on (numerics.py)


class Executor(Protocol):
    """Where images are made. ``submit`` queues all the specs or none (``QueueFull``, ``ShuttingDown``) and
    returns one future per spec, in order, each settling to a ``Result`` (or ``Encoded``) or to the image's
    error; ``cancel`` fails the futures not yet done with ``Cancelled`` (images waiting never start, running
    ones are dropped before their next step where the executor can) and returns how many it cancelled."""

    def start(self) -> None: ...

    def submit(self, resolved: list[GenerationSpec]) -> list[concurrent.futures.Future]: ...

    def cancel(self, futures: list[concurrent.futures.Future]) -> int: ...

    def queue_length(self) -> int: ...

    def stop(self, drain_seconds: float) -> None: ...


def settle(future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> bool:
    """Complete ``future`` unless it is done already (a cancel, from another thread); True when this call did."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        return False
    return True


def run_job(executor: Executor, specs: Sequence[GenerationSpec], todo: Sequence[int], writer: OutputWriter,
            on_written: Callable[[], None] = lambda: None, stop_seconds: float = STOP_SECONDS) -> None:
    """Start ``executor``, make the images ``todo`` (indices into the resolved ``specs``) on it, and write each
    with ``writer`` in this thread as it finishes; a finished image is dropped once written, so a job of any
    length holds only the images in flight. The first error (an image's, a write's, Ctrl-C) cancels the rest
    and is raised once the executor has stopped (after the step under way, up to ``stop_seconds``)."""
    if not todo:
        return  # nothing to make: no executor started (no Ray cluster for a finished job)
    executor.start()
    try:
        pending = dict(zip(executor.submit([specs[k] for k in todo]), todo, strict=True))
        try:
            for future in concurrent.futures.as_completed(list(pending)):
                k = pending.pop(future)
                result = future.result()
                if isinstance(result, Encoded):
                    writer.write_encoded(k, specs[k], result.png, result.seconds, result.numerics)
                else:
                    writer.write(k, result)
                on_written()
        finally:
            if pending:
                executor.cancel(list(pending))
    finally:
        executor.stop(stop_seconds)
