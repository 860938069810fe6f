"""Retention: the data dir does not grow without bound on a public server.

- Images served by URL (``files/``) are deleted ``keep_files`` seconds after they were made, and the oldest
  go first while they hold more than ``max_data_bytes``.
- Batch jobs keep their images until the job is deleted (``DELETE /v1/batches/{id}``) or, once finished
  (completed or cancelled), for ``keep_jobs`` seconds.
- Leftovers are removed: batch folders without a job (a job deleted while an image of it was being
  written), and, in the sweep at start, files under ``files/`` without a row an hour after they were
  written (a crash between the write and the row, or between the row's deletion and the unlink).

A ``Janitor`` thread sweeps at start and every ``interval`` seconds (the database answers which files are due,
so a sweep does not walk the folder); ``sweep(store, policy, now)`` takes the
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

from .store import Store

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


def delete_job(store: Store, job_id: str) -> bool:
    """A batch job, its rows and its images (``DELETE /v1/batches/{id}`` and expiry), and the disk its rows
    took; False when another deletion took it first."""
    deleted = store.delete_job(job_id)  # one transaction; images in flight are not recorded (JobRunner checks)
    shutil.rmtree(store.layout.job_folder(job_id), ignore_errors=True)
    if deleted:
        store.reclaim()
    return deleted


def sweep(store: Store, policy: Retention, now: float, leftover_files: bool = True) -> Swept:
    """One pass of the policy at time ``now``. ``leftover_files``: also look for files under ``files/``
    without a row (a walk of the folder: the janitor does it at start, where crashes leave them)."""
    swept = Swept()
    if policy.keep_files is not None:
        swept.files += _delete(store, store.url_files(created_before=now - policy.keep_files))
    if policy.max_data_bytes is not None:
        swept.files += _delete(store, _over_cap(store, policy.max_data_bytes))
    if policy.keep_jobs is not None:
        for job_id in store.finished_jobs(now - policy.keep_jobs):
            delete_job(store, job_id)
            swept.jobs += 1
    jobs = store.job_ids()
    for folder in _children(store.layout.batches):
        if folder.is_dir() and folder.name not in jobs:
            shutil.rmtree(folder, ignore_errors=True)
            swept.folders += 1
    if leftover_files:
        swept.files += _delete_unlisted(store, now)
    return swept


def _over_cap(store: Store, cap: int) -> list[tuple[str, Path, float, int]]:
    """The oldest URL images whose removal brings the rest to ``cap`` bytes or under."""
    oldest_first = store.url_files()
    total = sum(size for *_, size in oldest_first)
    over = []
    for row in oldest_first:
        if total <= cap:
            break
        over.append(row)
        total -= row[3]
    return over


def _delete_unlisted(store: Store, now: float) -> int:
    listed = {path for _, path, _, _ in store.url_files()}
    deleted = 0
    for path in _children(store.layout.url_files):
        with contextlib.suppress(FileNotFoundError):
            if path not in listed and path.stat().st_mtime < now - ORPHAN_GRACE_S:
                path.unlink()
                deleted += 1
    return deleted


def _delete(store: Store, rows: list[tuple[str, Path, float, int]]) -> int:
    """Rows first, then files: a URL never lists a file that is about to go."""
    store.delete_files([file_id for file_id, *_ in rows])
    for _, path, _, _ in rows:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return len(rows)


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
        first = True
        while True:
            try:
                swept = sweep(self.store, self.policy, time.time(), leftover_files=first)
                first = False
                if swept.files or swept.jobs or swept.folders:
                    log.info("retention: deleted %d images, %d batch jobs, %d orphan folders",
                             swept.files, swept.jobs, swept.folders)
            except Exception:  # a failed sweep (disk, database) is retried at the next one; serving goes on
                log.exception("retention sweep failed")
            if self._stopping.wait(self.interval):
                return
