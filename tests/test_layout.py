"""The server's data folder has one owner (server/layout.py). Its names are an on-disk format: a data dir an
earlier release wrote must open with its database, images and batch folders where they were."""

from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from diffbatch.server.layout import DataLayout  # noqa: E402
from diffbatch.server.store import Store  # noqa: E402


def test_the_data_dir_keeps_the_names_earlier_releases_wrote(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    assert layout.database == tmp_path / "diffbatch.sqlite3"
    assert layout.url_file("ab12") == tmp_path / "files" / "ab12.png"
    assert layout.job_image("batch_1", 7, 42) == tmp_path / "batches" / "batch_1" / "00007-42.png"


def test_the_store_records_paths_relative_to_the_data_dir_and_finds_them_after_a_move(tmp_path: Path) -> None:
    first, moved = tmp_path / "a", tmp_path / "b"
    store = Store(first)
    image = store.layout.url_file("ab12")
    image.parent.mkdir()
    image.write_bytes(b"png")
    store.add_file(image, "ab12")
    assert [row[1] for row in store.url_files()] == [image]
    store.close()
    first.rename(moved)
    store = Store(moved)
    try:
        assert store.file_path("ab12") == moved / "files" / "ab12.png"
        assert [row[1] for row in store.url_files()] == [moved / "files" / "ab12.png"]
    finally:
        store.close()


def test_crash_leftovers_are_the_temporary_pngs_in_batch_folders_only(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    folder = layout.job_folder("batch_1")
    folder.mkdir(parents=True)
    (folder / ".00000-1.png.0123abcd.tmp").write_bytes(b"")  # io.writer.save_png's temporary name
    (folder / "00000-1.png").write_bytes(b"")
    assert [p.name for p in layout.crash_leftovers()] == [".00000-1.png.0123abcd.tmp"]
