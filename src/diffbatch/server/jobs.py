"""The job runner: feeds pending batch-job items to the engine loop and records what finishes.

A bounded number of items is in flight at once, so online requests still join the running batch.
Finished images are written by this thread (not the engine thread) and only then marked done.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading

from ..errors import DiffbatchError
from ..io.writer import png_name, save_png
from ..spec import spec_from_record
from .loop import EngineLoop, QueueFull, ShuttingDown
from .store import Store, StoredItem

log = logging.getLogger("diffbatch.server")

class JobRunner:
    def __init__(self, store: Store, loop: EngineLoop, inflight: int) -> None:
        self.store = store
        self.loop = loop
        self.inflight = inflight
        self._running: dict[tuple[str, int], StoredItem] = {}
        self._done: queue.Queue[tuple[StoredItem, concurrent.futures.Future] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="diffbatch-jobs", daemon=True)

    def start(self) -> None:
        for stale in (self.store.data_dir / "batches").glob("*/.*.tmp"):  # half-written PNGs of a crash
            stale.unlink(missing_ok=True)
        self._thread.start()

    def wake(self) -> None:
        """A job was created or cancelled: look for work now rather than at the next poll."""
        self._done.put(None)

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        self.wake()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._submit_more()
            try:
                event = self._done.get(timeout=0.5)
            except queue.Empty:
                continue
            while event is not None:
                self._record(*event)
                event = self._done.get_nowait() if not self._done.empty() else None
        while self._running:  # drain: record what the engine loop finishes while it stops
            try:
                event = self._done.get(timeout=1.0)
            except queue.Empty:
                break
            if event is not None:
                self._record(*event)

    def _submit_more(self) -> None:
        free = self.inflight - len(self._running)
        for item in self.store.pending_items(free, set(self._running)) if free > 0 else []:
            try:
                [future] = self.loop.submit([spec_from_record(item.spec)])
            except (QueueFull, ShuttingDown):
                return  # retried at the next poll (or after a restart)
            except DiffbatchError as exc:
                self.store.finish_item(item, None, str(exc))
                continue
            self._running[(item.job_id, item.index)] = item
            future.add_done_callback(lambda f, item=item: self._done.put((item, f)))

    def _record(self, item: StoredItem, future: concurrent.futures.Future) -> None:
        self._running.pop((item.job_id, item.index), None)
        exc = future.exception()
        if isinstance(exc, ShuttingDown):
            return  # stays pending: resumes when the server starts again
        if exc is not None:
            self.store.finish_item(item, None, f"{type(exc).__name__}: {exc}")
            return
        result = future.result()
        folder = self.store.data_dir / "batches" / item.job_id
        path = save_png(folder / png_name(item.index, result.spec.seed), result)
        file_id = self.store.add_file(path, file_id=f"{item.job_id}-{item.index}")
        self.store.finish_item(item, file_id, None, result.seconds)

