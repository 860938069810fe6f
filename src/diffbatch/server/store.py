"""SQLite store of batch jobs, their items, and the files the server wrote.

The database is the source of truth: an item is done when its row says so, and only after its PNG was renamed
into place. After a crash, every item not marked done is generated again, into the same file name (the
write is atomic), so a job ends with no lost and no duplicated image.

Claims: a job runner takes pending items with ``claim_items``, which records a lease in each item's row (who,
and until when); nobody else takes an item while its lease runs. The runner renews its leases while it works and
releases those it gives up; a runner that dies leaves leases that expire (``LEASE_S``), after which any runner
takes the items again. An item is done once: ``finish_item`` only finishes an item still pending.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.resume import try_lock
from .layout import URL_FILES_STORED, DataLayout

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created REAL NOT NULL, status TEXT NOT NULL, total INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL, idx INTEGER NOT NULL, spec TEXT NOT NULL, status TEXT NOT NULL,
    file_id TEXT, error TEXT, seconds REAL, PRIMARY KEY (job_id, idx));
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, path TEXT NOT NULL, created REAL NOT NULL);
"""
# columns added after the first release, each added to a store that lacks it
MIGRATIONS = {("files", "settings"): "TEXT",  # the image's settings, for the history
              ("files", "bytes"): "INTEGER",  # the file's size, for --max-data-gb
              ("jobs", "finished"): "REAL",  # when the job completed or was cancelled, for --keep-jobs
              ("jobs", "model_hash"): "TEXT",  # the weights' fingerprint the job's images are made with
              ("jobs", "error"): "TEXT",  # why the job failed as a whole
              ("jobs", "owner"): "TEXT",  # the tenant (KeyLimit.tenant) that made it; NULL: the operator
              ("files", "owner"): "TEXT",  # likewise, for the history and /files
              ("items", "claimed_by"): "TEXT",  # the job runner holding the item's lease (JobRunner.claimant)
              ("items", "lease_until"): "REAL"}  # when that lease ends (time.time()); NULL: not claimed
log = logging.getLogger("diffbatch.server")
INCREMENTAL = 2  # PRAGMA auto_vacuum's value for incremental
RECLAIM_PAGES = 4096  # free pages given back per step of reclaim (16 MiB of 4 KiB pages)
LEASE_S = 120.0  # how long a claim holds without renewal: a runner that died gives its items back after this
IN_USE = "--data-dir {}: another diffbatch server is using this folder"


def check_data_dir(data_dir: Path) -> None:
    """Refuse a data dir another server holds, before the model loads (the store takes the lock itself)."""
    fd = try_lock(data_dir) if data_dir.is_dir() else -1
    if fd is None:
        raise InputError(IN_USE.format(data_dir), field="data_dir")
    if fd >= 0:
        os.close(fd)


@dataclass(frozen=True)
class StoredItem:
    job_id: str
    index: int
    spec: dict[str, Any]  # a resolved GenerationSpec record (seed fixed at submission)
    owner: str | None = None  # the job's tenant: its images belong to it too


# Tenancy: every read of jobs, items and files takes ``viewer``: None sees everything (the operator's key, or a
# server without keys); a tenant (``KeyLimit.tenant``) sees only what it made. What it may not see is answered
# exactly as what does not exist.
VISIBLE = "(? IS NULL OR owner = ?)"


class Store:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.layout = DataLayout(data_dir)  # where each file lives (layout.py)
        data_dir.mkdir(parents=True, exist_ok=True)
        self._folder_lock = try_lock(data_dir)  # two servers on one data dir would run each job twice
        if self._folder_lock is None:
            raise InputError(IN_USE.format(data_dir), field="data_dir")
        self._db = sqlite3.connect(self.layout.database, check_same_thread=False, isolation_level=None)
        self._reclaiming()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        for (table, column), kind in MIGRATIONS.items():
            if column not in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        self._lock = threading.Lock()

    def _reclaiming(self) -> None:
        """Pages freed by a deleted job go back to the file system (``reclaim``), not only to SQLite's free list:
        incremental auto-vacuum, which a store made before it gets by one VACUUM (auto_vacuum can only change
        there), run before WAL mode, while nothing else has the database open (the folder lock is held)."""
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL:
            self._db.execute(f"PRAGMA auto_vacuum = {INCREMENTAL}")
            log.info("converting %s to incremental auto-vacuum (once; a large store takes a while)",
                     self.layout.database)
            try:
                self._db.execute("VACUUM")  # once; it needs free disk the size of the store
            except sqlite3.OperationalError as exc:  # a full disk: the store works, deletions free no disk yet
                log.warning("could not convert %s to incremental vacuum (%s); tried again at the next start",
                            self.layout.database, exc)

    def reclaim(self) -> None:
        """Give the free pages back to the file system and empty the write-ahead log: after deleting a job (a
        100,000-image job is 1.6 GB of rows and log, kept on disk until then). In chunks, the lock let go between
        them, so other store calls are not held for the whole; a failure (a full disk) is logged, the job stays
        deleted."""
        try:
            before = None  # a store not converted (a full disk at start) frees nothing: stop, not spin
            while (free := self._query("PRAGMA freelist_count")[0][0]) > 0 and free != before:
                before = free
                with self._lock:  # a page a step: executescript steps them all
                    self._db.executescript(f"PRAGMA incremental_vacuum({RECLAIM_PAGES});")
            with self._lock:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("could not give a deleted job's disk back (%s); it is reused by later jobs", exc)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._folder_lock is not None and self._folder_lock >= 0:
                os.close(self._folder_lock)
                self._folder_lock = None

    # Jobs ------------------------------------------------------------------------------------------------
    def create_job(self, specs: list[dict[str, Any]], model_hash: str = "", owner: str | None = None) -> str:
        """A job of resolved spec records, made with the weights ``model_hash`` (hub.model_fingerprint), owned
        by the tenant ``owner`` (None: the operator)."""
        job_id = "batch_" + uuid.uuid4().hex
        rows = [(job_id, k, json.dumps(spec), "pending") for k, spec in enumerate(specs)]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO jobs (id, created, status, total, model_hash, owner) "
                             "VALUES (?, ?, 'in_progress', ?, ?, ?)",
                             (job_id, time.time(), len(specs), model_hash, owner))
            self._db.executemany("INSERT INTO items (job_id, idx, spec, status) VALUES (?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")
        return job_id

    def job(self, job_id: str, viewer: str | None = None) -> dict[str, Any] | None:
        rows = self._query("SELECT id, created, status, total, model_hash, error FROM jobs WHERE id = ? AND "
                           + VISIBLE, (job_id, viewer, viewer))
        if not rows:
            return None
        job_id, created, status, total, model_hash, error = rows[0]
        counts = dict(self._query("SELECT status, COUNT(*) FROM items WHERE job_id = ? GROUP BY status", (job_id,)))
        errors = [{"line": idx + 1, "message": message} for idx, message in self._query(
            "SELECT idx, error FROM items WHERE job_id = ? AND status = 'failed' ORDER BY idx LIMIT 100", (job_id,))]
        return {"id": job_id, "object": "batch", "created_at": int(created), "status": status,
                "request_counts": {"total": total, "completed": counts.get("done", 0),
                                   "failed": counts.get("failed", 0), "cancelled": counts.get("cancelled", 0)},
                "errors": ([{"line": None, "message": error}] if error else []) + errors,
                "model_hash": model_hash or None}

    def results(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT idx, spec, file_id, seconds FROM items WHERE job_id = ? AND status = 'done' "
                           "ORDER BY idx", (job_id,))
        return [{"index": idx, **json.loads(spec), "file_id": file_id, "seconds": seconds}
                for idx, spec, file_id, seconds in rows]

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE items SET status = 'cancelled' WHERE job_id = ? AND status = 'pending'",
                             (job_id,))
            self._db.execute("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ? AND "
                             "status = 'in_progress'", (time.time(), job_id))
            self._db.execute("COMMIT")

    def fail_other_models(self, model_hash: str, model: str) -> list[str]:
        """Unfinished jobs made with other weights (the server restarted with another or retrained model)
        fail rather than finish with these: a job never mixes two models. Jobs without a hash (made before
        the fingerprint existed, or of a model without one) are left to run."""
        with self._lock:
            rows = self._db.execute("SELECT id, model_hash FROM jobs WHERE status = 'in_progress' AND "
                                    "COALESCE(model_hash, '') NOT IN ('', ?)", (model_hash,)).fetchall()
            for job_id, theirs in rows:
                error = (f"made with model hash {theirs}; this server runs {model} (hash {model_hash or 'unknown'}): "
                         "the job's remaining images were not made, so it never mixes two models")
                self._db.execute("BEGIN")
                self._db.execute("UPDATE items SET status = 'cancelled' WHERE job_id = ? AND status = 'pending'",
                                 (job_id,))
                self._db.execute("UPDATE jobs SET status = 'failed', error = ?, finished = ? WHERE id = ?",
                                 (error, time.time(), job_id))
                self._db.execute("COMMIT")
        return [job_id for job_id, _ in rows]

    def has_job(self, job_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM jobs WHERE id = ?", (job_id,)))

    def job_ids(self) -> set[str]:
        return {row[0] for row in self._query("SELECT id FROM jobs")}

    def delete_job(self, job_id: str) -> bool:
        """Forget a job, its items and its files' rows (the caller removes its folder); False when it was not
        there (another DELETE took it first)."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM files WHERE id IN (SELECT file_id FROM items WHERE job_id = ?)", (job_id,))
            self._db.execute("DELETE FROM items WHERE job_id = ?", (job_id,))
            deleted = self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0
            self._db.execute("COMMIT")
        return deleted

    def finished_jobs(self, before: float) -> list[str]:
        """Jobs completed or cancelled before ``before`` (a store older than the ``finished`` column: created)."""
        return [row[0] for row in self._query(
            "SELECT id FROM jobs WHERE status != 'in_progress' AND COALESCE(finished, created) < ?", (before,))]

    # Claims ----------------------------------------------------------------------------------------------
    def claim_items(self, claimant: str, limit: int, now: float | None = None,
                    lease_s: float = LEASE_S) -> list[StoredItem]:
        """Up to ``limit`` pending items nobody holds (never claimed, released, or their lease ended before
        ``now``), oldest job first, in index order; each now leased to ``claimant`` until ``now + lease_s``."""
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the select and the claim as one: no two claimants get an item
            rows = self._db.execute(
                "SELECT i.job_id, i.idx, i.spec, j.owner FROM items i JOIN jobs j ON j.id = i.job_id "
                "WHERE i.status = 'pending' AND j.status = 'in_progress' AND COALESCE(i.lease_until, 0) < ? "
                "ORDER BY j.created, i.idx LIMIT ?", (now, limit)).fetchall()
            self._db.executemany("UPDATE items SET claimed_by = ?, lease_until = ? WHERE job_id = ? AND idx = ?",
                                 [(claimant, now + lease_s, job_id, idx) for job_id, idx, _, _ in rows])
            self._db.execute("COMMIT")
        return [StoredItem(job_id, idx, json.loads(spec), owner) for job_id, idx, spec, owner in rows]

    def renew_claims(self, claimant: str, now: float | None = None, lease_s: float = LEASE_S) -> int:
        """Extend every lease ``claimant`` holds on a pending item to ``now + lease_s``; how many it holds."""
        now = time.time() if now is None else now
        with self._lock:
            return self._db.execute("UPDATE items SET lease_until = ? WHERE claimed_by = ? AND status = 'pending'",
                                    (now + lease_s, claimant)).rowcount

    def release_claims(self, claimant: str, items: list[StoredItem]) -> None:
        """Give up ``claimant``'s leases on ``items``: anyone may claim them at once."""
        with self._lock:
            self._db.executemany("UPDATE items SET claimed_by = NULL, lease_until = NULL "
                                 "WHERE claimed_by = ? AND job_id = ? AND idx = ?",
                                 [(claimant, item.job_id, item.index) for item in items])

    def release_all_claims(self) -> int:
        """Every lease in the store, of any runner: a server starting holds the data dir's lock, so each one is a
        dead process's, and its items should not wait for the lease to end. How many there were."""
        with self._lock:
            return self._db.execute("UPDATE items SET claimed_by = NULL, lease_until = NULL "
                                    "WHERE lease_until IS NOT NULL").rowcount

    def finish_item(self, item: StoredItem, file_id: str | None, error: str | None, seconds: float = 0.0) -> None:
        status = "done" if error is None else "failed"
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE items SET status = ?, file_id = ?, error = ?, seconds = ?, lease_until = NULL "
                             "WHERE job_id = ? AND idx = ? AND status = 'pending'",
                             (status, file_id, error, seconds, item.job_id, item.index))
            self._db.execute("UPDATE jobs SET status = 'completed', finished = ? WHERE id = ? AND "
                             "status = 'in_progress' AND "
                             "NOT EXISTS (SELECT 1 FROM items WHERE job_id = ? AND status = 'pending')",
                             (time.time(), item.job_id, item.job_id))
            self._db.execute("COMMIT")

    # Files -----------------------------------------------------------------------------------------------
    def add_file(self, path: Path, file_id: str | None = None, settings: dict[str, Any] | None = None,
                 owner: str | None = None) -> str:
        """Register a written file; URLs name it by this server-made id, never by a user-given path.
        ``settings``: the image's resolved spec record (and sampler, model), for the history; ``owner``: the
        tenant whose request made it (None: the operator)."""
        file_id = file_id or uuid.uuid4().hex
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO files (id, path, created, settings, bytes, owner) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (file_id, self.layout.stored(path), time.time(),
                              None if settings is None else json.dumps(settings), path.stat().st_size, owner))
        return file_id

    def url_files(self, created_before: float | None = None) -> list[tuple[str, Path, float, int]]:
        """Images served by URL (made before ``created_before``), oldest first: (id, path, created, bytes)."""
        rows = self._query("SELECT id, path, created, bytes FROM files WHERE path LIKE ? AND created < ? "
                           "ORDER BY created", (URL_FILES_STORED + "%", float("inf") if created_before is None
                                                else created_before))
        return [(file_id, self.layout.path(path), created, size or 0) for file_id, path, created, size in rows]

    def delete_files(self, file_ids: list[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM files WHERE id = ?", [(file_id,) for file_id in file_ids])

    def history(self, limit: int, viewer: str | None = None) -> list[dict[str, Any]]:
        """Images with settings, newest first."""
        rows = self._query("SELECT id, created, settings FROM files WHERE settings IS NOT NULL AND " + VISIBLE
                           + " ORDER BY created DESC LIMIT ?", (viewer, viewer, limit))
        return [{"file_id": file_id, "created": created, **json.loads(settings)} for file_id, created, settings in rows]

    def file_path(self, file_id: str, viewer: str | None = None) -> Path | None:
        rows = self._query("SELECT path FROM files WHERE id = ? AND " + VISIBLE, (file_id, viewer, viewer))
        return self.layout.path(rows[0][0]) if rows else None
