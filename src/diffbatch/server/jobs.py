"""The job runner: feeds pending batch-job items to the engine loop and records what finishes.

A bounded number of items is in flight at once, so online requests still join the running batch.
Finished images are written by this thread (not the engine thread) and only then marked done.
The items in flight are claimed in the store (leases, store.py), renewed while they run and released when
given up, so the store, not only this process's memory, says who is making which item.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
import uuid

from ..errors import DiffbatchError
from ..executors.base import Cancelled, Executor, QueueFull, ShuttingDown
from ..io.writer import NOTES, save_png
from ..spec import spec_from_record
from .store import LEASE_S, Store, StoredItem

log = logging.getLogger("diffbatch.server")
STORE_RETRY_S = 30.0  # after an image could not be stored (a full disk), how long to wait before more work

class JobRunner:
    def __init__(self, store: Store, loop: Executor, inflight: int) -> None:
        self.store = store
        self.loop = loop
        self.inflight = inflight
        self.claimant = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # its name in the store
        self._renew_at = 0.0  # monotonic: when to renew this runner's leases next
        self._running: dict[tuple[str, int], concurrent.futures.Future] = {}  # (job, index) -> its image
        self._cancelled: set[str] = set()  # jobs cancelled or deleted while this process ran
        self._lock = threading.Lock()  # _running and _cancelled: cancel_job runs on an HTTP thread
        self._done: queue.Queue[tuple[StoredItem, concurrent.futures.Future] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._paused_until = 0.0  # monotonic: no new work before (the last store failed)
        self._thread = threading.Thread(target=self._run, name="diffbatch-jobs", daemon=True)

    def start(self) -> None:
        engine = self.loop.engine
        for job_id in self.store.fail_other_models(engine.model_hash, engine.model_name):
            log.warning("batch %s was made with other weights than %s: marked failed", job_id, engine.model_name)
        for stale in self.store.layout.crash_leftovers():
            stale.unlink(missing_ok=True)
        if released := self.store.release_all_claims():  # a crashed server's: this one holds the data dir
            log.info("batch items claimed by a server that stopped: %d, made again now", released)
        self._thread.start()

    def wake(self) -> None:
        """A job was created or cancelled: look for work now rather than at the next poll."""
        self._done.put(None)

    def cancel_job(self, job_id: str) -> int:
        """Abort the job's images in the engine (waiting ones never start, running ones stop before the next
        step) and submit no more of them; the caller has marked the job cancelled (or deleted) in the store
        first, so the aborted items are not recorded as failures. Returns how many were aborted."""
        with self._lock:
            self._cancelled.add(job_id)
            futures = [future for (job, _), future in self._running.items() if job == job_id]
        return self.loop.cancel(futures)

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        self.wake()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._renew()
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

    def _renew(self) -> None:
        """Keep this runner's leases from ending while their images run (a third of a lease ahead)."""
        if self._running and time.monotonic() >= self._renew_at:
            self.store.renew_claims(self.claimant)
            self._renew_at = time.monotonic() + LEASE_S / 3

    def _submit_more(self) -> None:
        if time.monotonic() < self._paused_until:
            return
        free = self.inflight - len(self._running)
        claimed = self.store.claim_items(self.claimant, free) if free > 0 else []
        for k, item in enumerate(claimed):
            if not self._submit(item):
                self.store.release_claims(self.claimant, claimed[k:])  # retried at the next poll
                return

    def _submit(self, item: StoredItem) -> bool:
        """Queue one claimed item; False when the engine loop takes no more now (full, or shutting down)."""
        with self._lock:  # a job cancelled since it was claimed gets no new image
            if item.job_id in self._cancelled or (item.job_id, item.index) in self._running:
                return True
            try:
                # resolved again: a LoRA or sampler check may fail on the model this server runs now
                [future] = self.loop.submit([self.loop.engine.resolve(spec_from_record(_spec_record(item.spec)))])
            except (QueueFull, ShuttingDown):
                return False
            except DiffbatchError as exc:
                self.store.finish_item(item, None, str(exc))
                return True
            self._running[(item.job_id, item.index)] = future
        future.add_done_callback(lambda f, item=item: self._done.put((item, f)))
        return True

    def _record(self, item: StoredItem, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._running.pop((item.job_id, item.index), None)
        exc = future.exception()
        if isinstance(exc, ShuttingDown | Cancelled):
            # stays pending: resumes when the server starts again; or its job was cancelled or deleted
            self._release(item)
            return
        if exc is not None:
            self.store.finish_item(item, None, f"{type(exc).__name__}: {exc}")
            return
        try:
            self._store(item, future.result())
        except Exception as exc:  # a full disk: the item stays pending and is made again once space is back
            self._paused_until = time.monotonic() + STORE_RETRY_S
            log.error("batch %s line %d not stored (%s); retrying in %.0f s", item.job_id, item.index + 1, exc,
                      STORE_RETRY_S)
            self._release(item)

    def _release(self, item: StoredItem) -> None:
        """The item stays pending and unclaimed; a store that refuses even that (a full disk) lets the lease end."""
        with contextlib.suppress(sqlite3.Error):
            self.store.release_claims(self.claimant, [item])

    def _store(self, item: StoredItem, result) -> None:
        if not self.store.has_job(item.job_id):
            return  # deleted while this image ran (DELETE /v1/batches/{id})
        path = self.store.layout.job_image(item.job_id, item.index, result.spec.seed)
        path = save_png(path, result)  # atomic: whole or absent
        file_id = self.store.add_file(path, file_id=f"{item.job_id}-{item.index}", owner=item.owner)
        self.store.finish_item(item, file_id, None, result.seconds)



def _spec_record(record: dict) -> dict:
    """A stored item's spec, without what the job's authoring noted beside it (a sweep cell, a template)."""
    return {key: value for key, value in record.items() if key not in NOTES}
