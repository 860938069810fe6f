"""The server's data folder (``--data-dir``), in one place: what lives where, and how the store names a file.

    DATA_DIR/
        diffbatch.sqlite3       the store: jobs, items, files (with -wal and -shm beside it: SQLite's WAL mode)
        files/ID.png            images served by URL (``response_format=url``)
        batches/JOB/NAME.png    a batch job's images, named as a CLI job names them (io.writer.png_name)
        .../.NAME.xxxxxxxx.tmp  a PNG being written (io.writer.save_png); only a crash leaves one behind

The store keeps a file's path relative to the folder (``stored``), so a data dir can be moved or restored
elsewhere. The folder itself is what ``try_lock`` locks: one server per data dir.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..io.writer import TEMP_GLOB, png_name

DEFAULT_DATA_DIR = Path("diffbatch-data")  # --data-dir when none is given
DATABASE = "diffbatch.sqlite3"
URL_FILES = "files"  # images served by URL
URL_FILES_STORED = URL_FILES + "/"  # how each of their stored paths begins (the store selects them by it)
BATCHES = "batches"  # one folder per batch job
TEMP_PNGS = TEMP_GLOB  # io.writer.save_png's temporary files


@dataclass(frozen=True)
class DataLayout:
    root: Path  # --data-dir

    @property
    def database(self) -> Path:
        return self.root / DATABASE

    @property
    def url_files(self) -> Path:
        return self.root / URL_FILES

    def url_file(self, file_id: str) -> Path:
        """Where the image served as ``/files/{file_id}.png`` is written."""
        return self.url_files / f"{file_id}.png"

    @property
    def batches(self) -> Path:
        return self.root / BATCHES

    def job_folder(self, job_id: str) -> Path:
        return self.batches / job_id

    def job_image(self, job_id: str, index: int, seed: int) -> Path:
        """Image ``index`` (0-based line) of batch job ``job_id``, made with ``seed``."""
        return self.job_folder(job_id) / png_name(index, seed)

    def crash_leftovers(self) -> Iterator[Path]:
        """Half-written batch-job PNGs: any temporary file a writer left (no writer runs before the job runner
        starts, so all of them are a crash's)."""
        return self.batches.glob(f"*/{TEMP_PNGS}")

    def stored(self, path: Path) -> str:
        """How the store records ``path`` (a file under the folder): relative, with ``/``."""
        return path.relative_to(self.root).as_posix()

    def path(self, stored: str) -> Path:
        """The file a store row names (``stored``'s inverse)."""
        return self.root / stored
