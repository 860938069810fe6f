"""Retention: the data dir does not grow without bound on a public server.

- Images served by URL (``files/``) are deleted ``keep_files`` seconds after they were made, and the oldest
  go first while they hold more than ``max_data_bytes``.
- Batch jobs keep their images until the job is deleted (``DELETE /v1/batches/{id}``) or, once finished
  (completed or cancelled), for ``keep_jobs`` seconds.
- Leftovers are removed: batch folders without a job (a job deleted while an image of it was being
  written) and files under ``files/`` without a row, an hour after they were written (a crash between the
  write and the row, or between the row's deletion and the unlink).

A ``Janitor`` thread sweeps at start and every ``interval`` seconds; ``sweep(store, policy, now)`` takes the
clock as an argument so tests run it with a fake one. The row goes first, then the file: a URL never lists a
file that is about to go.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .store import URL_FILES, Store

log = logging.getLogger("diffbatch.server")
ORPHAN_GRACE_S = 3600.0  # a file under files/ without a row is a leftover once this old (its row may be coming)


@dataclass(frozen=True)
class Retention:
    keep_files: float | None = 86400.0  # seconds an image served by URL is kept; None: forever
    max_data_bytes: int | None = None  # cap on the bytes of images served by URL; None: no cap
    keep_jobs: float | None = 30 * 86400.0  # seconds a finished batch job is kept; None: until deleted


@dataclass
class Swept:
    files: int = 0  # URL images deleted
    jobs: int = 0  # batch jobs expired
    folders: int = 0  # orphan batch folders removed


def delete_job(store: Store, job_id: str) -> None:
    """A batch job, its rows and its images (``DELETE /v1/batches/{id}`` and expiry)."""
    store.cancel(job_id)  # in-flight items are not recorded after this (JobRunner checks the job exists)
    store.delete_job(job_id)
    shutil.rmtree(store.data_dir / "batches" / job_id, ignore_errors=True)


def sweep(store: Store, policy: Retention, now: float) -> Swept:
    swept = Swept()
    files = store.url_files()
    expired = [f for f in files if policy.keep_files is not None and f[2] < now - policy.keep_files]
    kept = [f for f in files if f not in expired]
    if policy.max_data_bytes is not None:
        total = sum(size for *_, size in kept)
        while kept and total > policy.max_data_bytes:
            oldest = kept.pop(0)
            expired.append(oldest)
            total -= oldest[3]
    store.delete_files([file_id for file_id, *_ in expired])
    for _, path, _, _ in expired:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    swept.files = len(expired)
    if policy.keep_jobs is not None:
        for job_id in store.finished_jobs(now - policy.keep_jobs):
            delete_job(store, job_id)
            swept.jobs += 1
    jobs = store.job_ids()
    for folder in _children(store.data_dir / "batches"):
        if folder.is_dir() and folder.name not in jobs:
            shutil.rmtree(folder, ignore_errors=True)
            swept.folders += 1
    listed = {path for _, path, _, _ in store.url_files()}
    for path in _children(store.data_dir / URL_FILES):
        with contextlib.suppress(FileNotFoundError):
            if path not in listed and path.stat().st_mtime < now - ORPHAN_GRACE_S:
                path.unlink()
                swept.files += 1
    return swept


def _children(root: Path) -> list[Path]:
    return list(root.iterdir()) if root.is_dir() else []


class Janitor:
    """Runs ``sweep`` at start and every ``interval`` seconds until stopped."""

    def __init__(self, store: Store, policy: Retention, interval: float = 60.0) -> None:
        self.store = store
        self.policy = policy
        self.interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="diffbatch-janitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while True:
            try:
                swept = sweep(self.store, self.policy, time.time())
                if swept.files or swept.jobs or swept.folders:
                    log.info("retention: deleted %d images, %d batch jobs, %d orphan folders",
                             swept.files, swept.jobs, swept.folders)
            except Exception:  # a failed sweep (disk, database) is retried at the next one; serving goes on
                log.exception("retention sweep failed")
            if self._stopping.wait(self.interval):
                return
