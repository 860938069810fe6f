"""The local executor: this process's engine in its own thread; callers only submit and await.

Used by the CLI job (``base.run_job``), the single-process server and each Ray Serve replica. Admission happens
in the engine thread between steps, by policy:
- ``continuous``: every waiting image joins the running batch at the next denoising step (diffbatch's way);
- ``window``: what peers do — when the engine is idle, wait ``window`` after the oldest waiting image, then
  run the images with its exact parameters (up to the batch size) to completion;
- ``none``: one image at a time (AUTOMATIC1111's global lock).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..engine import Engine
from ..errors import DiffbatchError
from ..spec import GenerationSpec
from .base import Cancelled, QueueFull, ShuttingDown, settle

log = logging.getLogger("diffbatch.server")


@dataclass
class Pending:
    spec: GenerationSpec  # resolved
    future: concurrent.futures.Future
    arrived: float = field(default_factory=time.monotonic)


def parameter_key(spec: GenerationSpec) -> tuple:
    """What must be identical for a diffusers list batch: everything but prompt, negative prompt and seed."""
    record = dataclasses.asdict(dataclasses.replace(spec, prompt="", negative_prompt="", seed=0, image=None))
    return (*record.values(), spec.is_img2img)


class EngineLoop:
    """The ``base.Executor`` interface over one engine. ``max_queue``: images waiting or running at most (the
    CLI: no bound, its job is planned already); ``log_errors``: log a failed step with its traceback (the
    server's log) besides failing its images' futures (the CLI raises the error itself)."""

    def __init__(self, engine: Engine, max_queue: float = math.inf, policy: str = "continuous",
                 window_s: float = 0.1, log_errors: bool = True) -> None:
        self.engine = engine
        self.log_errors = log_errors
        self.max_queue = max_queue
        self.policy = policy
        self.window_s = window_s
        self._pending: deque[Pending] = deque()
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._cancels = self._dropped = 0  # cancel() calls, and how many _drop_cancelled has seen: a job of
        # thousands of images is scanned for cancelled ones only after a cancel, not at every step
        self._thread = threading.Thread(target=self._run, name="diffbatch-engine", daemon=True)

    # Caller side (any thread) ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, resolved: list[GenerationSpec]) -> list[concurrent.futures.Future]:
        """Queue all or none of these specs, already resolved (``Engine.resolve``: checked once, by the caller, at
        the edge); futures of the Results."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self.queue_length() + len(resolved) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.queue_length()} of {self.max_queue:g} images)")
            items = [Pending(spec, concurrent.futures.Future()) for spec in resolved]
            self._pending.extend(items)
            self._cond.notify()
        return [item.future for item in items]

    def cancel(self, futures: list[concurrent.futures.Future]) -> int:
        """Cancel images: those waiting never start, those running are aborted before the next step. Each
        future not yet done fails with ``Cancelled``; returns how many were."""
        cancelled, gone = 0, set(futures)
        with self._cond:
            self._cancels += 1
            self._pending = deque(p for p in self._pending if p.future not in gone)
            for future in gone:
                cancelled += settle(future, error=Cancelled("cancelled by the client"))
            self._cond.notify()
        return cancelled

    def queue_length(self) -> int:
        """Images waiting or running."""
        return len(self._pending) + len(self._futures)

    def stop(self, drain_seconds: float) -> None:
        """Stop admitting; let running images finish (up to ``drain_seconds``); fail what never started."""
        with self._cond:
            self._stopping = True
            never_started, self._pending = list(self._pending), deque()
            self._cond.notify()
        for item in never_started:
            item.future.set_exception(ShuttingDown("the server shut down before this image started"))
        self._thread.join(drain_seconds)

    # Engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._drop_cancelled()
                self._admit()
                if not self.engine.has_unfinished():
                    if self._stopping:
                        return
                    self._cond.wait(timeout=self._idle_wait())
                    continue
            self._step()

    def _step(self) -> None:
        try:
            results = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - one bad step must not kill the server
            if self.log_errors:
                log.exception("engine step failed; failing its in-flight images")
            self._fail_all(exc)
            return
        with self._cond:  # cancel() settles futures under the same lock
            for result in results:  # settle: a replica's future may be cancelled by asyncio, outside this lock
                settle(self._futures.pop(result.request_id), result=result)

    def _drop_cancelled(self) -> None:
        if self._dropped == self._cancels:
            return
        self._dropped = self._cancels
        gone = [request_id for request_id, future in self._futures.items() if future.done()]
        if gone:
            self.engine.abort(gone)
            for request_id in gone:
                del self._futures[request_id]

    def _fail_all(self, exc: Exception) -> None:
        self.engine.abort()
        with self._cond:
            futures, self._futures = self._futures, {}
            for future in futures.values():
                settle(future, error=exc)

    def _admit(self) -> None:
        for item in self._ready():
            try:  # resolved before submit(); admitting loads a LoRA on its first use, which may fail for this image
                request_id = self.engine.admit(item.spec)
            except DiffbatchError as exc:
                item.future.set_exception(exc)
                continue
            self._futures[request_id] = item.future

    def _ready(self) -> list[Pending]:
        if self.policy == "continuous" or not self._pending or self.engine.has_unfinished():
            return self._take(len(self._pending)) if self.policy == "continuous" else []
        if self.policy == "none":
            return self._take(1)
        if time.monotonic() < self._pending[0].arrived + self.window_s:
            return []
        key = parameter_key(self._pending[0].spec)
        group = [p for p in self._pending if parameter_key(p.spec) == key][: self.engine.max_batch_size]
        for p in group:
            self._pending.remove(p)
        return group

    def _take(self, n: int) -> list[Pending]:
        return [self._pending.popleft() for _ in range(n)]

    def _idle_wait(self) -> float | None:
        if self.policy == "window" and self._pending:
            return max(0.0, self._pending[0].arrived + self.window_s - time.monotonic())
        return None

