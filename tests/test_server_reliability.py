"""A public server's data dir stays bounded (retention with a fake clock, DELETE /v1/batches/{id}), a full disk
is a 507 and a resumable job rather than a crash, and per-key limits (--api-keys) keep one client from filling
the queue for all."""

from __future__ import annotations

from extras import need

need("fastapi", "httpx", "uvicorn")  # before the imports that need them: a clear skip without the extra

import errno
import json
import os
import sqlite3
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from diffbatch import Engine
from diffbatch.cli import main
from diffbatch.server import ServerConfig, create_app
from diffbatch.server import jobs as jobs_module
from diffbatch.server import routes as routes_module
from diffbatch.server.keys import KeyLimit, KeyLimiter, load_keys
from diffbatch.server.retention import ORPHAN_GRACE_S, Retention, sweep
from diffbatch.server.store import Store
from server_helpers import offline, png_pixels

FAST = {"num_inference_steps": 2}
DAY = 86400.0


@pytest.fixture(scope="module")
def engine(tiny_sd_path) -> Engine:
    return Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=8)


def serve(engine, tmp_path, **config):
    return TestClient(create_app(ServerConfig(data_dir=tmp_path / "data", **config), engine))


def url_image(client, prompt: str) -> str:
    response = client.post("/v1/images/generations", json={"prompt": prompt, "response_format": "url", **FAST})
    assert response.status_code == 200, response.text
    return response.json()["data"][0]["url"]


def finished_job(client, lines: list[dict]) -> str:
    job = client.post("/v1/batches", content="\n".join(json.dumps(x) for x in lines)).json()
    return wait_completed(client, job["id"])


def wait_completed(client, job_id: str) -> str:
    deadline = time.monotonic() + 60
    while client.get(f"/v1/batches/{job_id}").json()["status"] != "completed":
        assert time.monotonic() < deadline, "the batch job did not finish"
        time.sleep(0.05)
    return job_id


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# Retention ---------------------------------------------------------------------------------------------------
def test_url_images_expire_after_keep_files_and_the_oldest_go_first_over_the_cap(engine, tmp_path):
    with serve(engine, tmp_path) as client:
        urls = [url_image(client, f"kept {i}") for i in range(3)]
        store: Store = client.app.state.server.store
        sizes = [size for *_, size in store.url_files()]
        assert len(sizes) == 3 and all(size > 0 for size in sizes)
        now = time.time()
        # a cap that holds the two newest: the oldest goes, the others stay served
        swept = sweep(store, Retention(keep_files=DAY, max_data_bytes=sizes[1] + sizes[2]), now)
        assert swept.files == 1
        assert client.get(urls[0]).status_code == 404 and client.get(urls[1]).status_code == 200
        assert len(client.get("/v1/images/history").json()["data"]) == 2
        assert sweep(store, Retention(keep_files=DAY), now + DAY / 2).files == 0  # not old enough yet
        assert sweep(store, Retention(keep_files=DAY), now + DAY + 60).files == 2  # a day later: all gone
        assert [client.get(u).status_code for u in urls] == [404, 404, 404]
        assert not list((store.data_dir / "files").glob("*.png"))
        assert client.get("/v1/images/history").json()["data"] == []


def test_finished_batch_jobs_expire_after_keep_jobs_and_leftovers_are_removed(engine, tmp_path):
    with serve(engine, tmp_path) as client:
        store: Store = client.app.state.server.store
        job_id = finished_job(client, [{"prompt": "job", **FAST}])
        folder = store.data_dir / "batches" / job_id
        assert list(folder.glob("*.png"))
        now = time.time()
        assert sweep(store, Retention(keep_jobs=None), now + 365 * DAY).jobs == 0  # kept until deleted
        orphan = store.data_dir / "batches" / "batch_gone"  # a job deleted while an image was being written
        orphan.mkdir()
        stray = store.data_dir / "files" / "stray.png"  # a crash between the write and the row
        stray.parent.mkdir(exist_ok=True)
        stray.write_bytes(b"x")
        swept = sweep(store, Retention(keep_jobs=30 * DAY), now + 31 * DAY)
        assert swept.jobs == 1 and swept.folders == 1 and swept.files == 1
        assert client.get(f"/v1/batches/{job_id}").status_code == 404
        assert not folder.exists() and not orphan.exists() and not stray.exists()
        young = store.data_dir / "files" / "young.png"  # its row may still be coming: kept
        young.write_bytes(b"x")
        assert sweep(store, Retention(), time.time() + ORPHAN_GRACE_S / 2).files == 0 and young.exists()


def test_the_janitor_sweeps_at_start_and_removes_what_a_crash_left(engine, tmp_path):
    data = tmp_path / "data"
    (data / "files").mkdir(parents=True)
    (data / "batches" / "batch_of_a_deleted_job").mkdir(parents=True)
    stray = data / "files" / "0123abcd.png"  # written, then the process died before its row
    stray.write_bytes(b"\x89PNG")
    os.utime(stray, (time.time() - 2 * ORPHAN_GRACE_S,) * 2)
    with serve(engine, tmp_path) as client:
        deadline = time.monotonic() + 10
        while stray.exists() or (data / "batches" / "batch_of_a_deleted_job").exists():
            assert time.monotonic() < deadline, "the start-up sweep did not run"
            time.sleep(0.05)
        assert client.get("/health").status_code == 200


def test_delete_batch_removes_the_job_and_its_images(engine, tmp_path):
    with serve(engine, tmp_path) as client:
        job_id = finished_job(client, [{"prompt": "a", **FAST}, {"prompt": "b", **FAST}])
        url = json.loads(client.get(f"/v1/batches/{job_id}/results").text.splitlines()[0])["url"]
        assert client.get(url).status_code == 200
        response = client.delete(f"/v1/batches/{job_id}")
        assert response.status_code == 200 and response.json() == {"id": job_id, "object": "batch.deleted",
                                                                    "deleted": True}
        assert client.get(f"/v1/batches/{job_id}").status_code == 404
        assert client.get(f"/v1/batches/{job_id}/results").status_code == 404
        assert client.get(url).status_code == 404
        assert not (client.app.state.server.store.data_dir / "batches" / job_id).exists()
        assert client.delete(f"/v1/batches/{job_id}").status_code == 404
        assert client.delete("/v1/batches/..%2F..").status_code == 404


def test_deleting_a_running_job_stops_it_and_writes_nothing_more(engine, tmp_path):
    with serve(engine, tmp_path) as client:
        lines = "\n".join(json.dumps({"prompt": f"slow {i}", "num_inference_steps": 20}) for i in range(40))
        job_id = client.post("/v1/batches", content=lines).json()["id"]
        assert client.delete(f"/v1/batches/{job_id}").status_code == 200
        time.sleep(1.0)  # images in flight at deletion finish now: they must not be written
        data = client.app.state.server.store.data_dir
        assert not (data / "batches" / job_id).exists()
        assert client.get("/health").status_code == 200


def test_bad_retention_flags_are_one_line_exit_2(capsys, tmp_path):
    for flags in (["--keep-files", "soon"], ["--keep-jobs", "-1d"], ["--max-data-gb", "0"], ["--keep-files", "inf"]):
        assert main(["serve", "--data-dir", str(tmp_path), *flags]) == 2
        err = capsys.readouterr().err
        assert flags[0] in err and "Traceback" not in err


# A full disk ------------------------------------------------------------------------------------------------
def test_full_disk_on_a_url_response_is_507_in_openai_shape_and_nothing_half_written(engine, tmp_path,
                                                                                       monkeypatch):
    with serve(engine, tmp_path) as client:
        monkeypatch.setattr(routes_module, "save_png", disk_full)
        response = client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url", **FAST})
        assert response.status_code == 507
        error = response.json()["error"]
        assert "disk is full" in error["message"] and error["type"] == "server_error" and "param" in error
        monkeypatch.setattr(client.app.state.server.store, "create_job", _sqlite_full)
        assert client.post("/v1/batches", content='{"prompt": "x"}').status_code == 507
        files = client.app.state.server.store.data_dir / "files"
        assert not files.exists() or not list(files.iterdir())  # no PNG, no temporary file
        monkeypatch.undo()
        assert client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url",
                                                           **FAST}).status_code == 200  # space is back


def _sqlite_full(*args, **kwargs):
    raise sqlite3.OperationalError("database or disk is full")


def test_a_batch_job_on_a_full_disk_waits_and_finishes_once_space_is_back(engine, tmp_path, monkeypatch):
    real_save, failures = jobs_module.save_png, []

    def full_for_a_while(path, result):
        if len(failures) < 3:
            failures.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, result)

    monkeypatch.setattr(jobs_module, "save_png", full_for_a_while)
    monkeypatch.setattr(jobs_module, "STORE_RETRY_S", 0.2)
    with serve(engine, tmp_path) as client:
        lines = [{"prompt": f"full {i}", "seed": i, **FAST} for i in range(4)]
        job_id = finished_job(client, lines)
        rows = [json.loads(x) for x in client.get(f"/v1/batches/{job_id}/results").text.splitlines()]
        assert len(failures) == 3 and [r["index"] for r in rows] == [0, 1, 2, 3]
        for row in rows:  # every image whole and the one diffusers makes for its line
            expected = offline(engine, prompt=row["prompt"], seed=row["seed"], **FAST)
            assert np.array_equal(png_pixels(client.get(row["url"]).content), expected)
        assert not list((client.app.state.server.store.data_dir / "batches").rglob(".*.tmp"))


# Per-key limits ----------------------------------------------------------------------------------------------
def keys_file(tmp_path, text: str):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    return path


def test_per_key_request_rate_and_images_in_flight(engine, tmp_path):
    path = keys_file(tmp_path, "# clients\nsk-alice rpm=3 name=alice\nsk-bob images=2 name=bob\n")
    with serve(engine, tmp_path, api_key="operator", api_keys=path) as client:
        alice = {"Authorization": "Bearer sk-alice"}
        assert [client.get("/v1/models", headers=alice).status_code for _ in range(4)] == [200, 200, 200, 429]
        refused = client.get("/v1/models", headers=alice)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error" and "sk-alice" not in refused.text
        assert client.get("/v1/models", headers={"Authorization": "Bearer operator"}).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Bearer sk-nobody"}).status_code == 401
        assert client.get("/health").status_code == 200

        bob = {"Authorization": "Bearer sk-bob"}
        limiter: KeyLimiter = client.app.state.server.limiter
        over = client.post("/v1/images/generations", headers=bob, json={"prompt": "x", "n": 3, **FAST})
        assert over.status_code == 429 and "bob" in over.json()["error"]["message"]
        ok = client.post("/v1/images/generations", headers=bob, json={"prompt": "x", "n": 2, **FAST})
        assert ok.status_code == 200 and limiter.in_flight(limiter.keys["sk-bob"]) == 0  # released when done
        limiter.reserve_images(limiter.keys["sk-bob"], 2)  # as if two images of bob were still running
        assert client.post("/v1/images/generations", headers=bob, json={"prompt": "x", **FAST}).status_code == 429
        assert client.post("/v1/images/generations", headers={"Authorization": "Bearer operator"},
                           json={"prompt": "x", **FAST}).status_code == 200  # others are not held up


def test_the_request_window_slides():
    now = [0.0]
    limiter = KeyLimiter({"k": KeyLimit("k", "k", rpm=2)}, clock=lambda: now[0])
    limit = limiter.keys["k"]
    assert limiter.admit_request(limit) is None and limiter.admit_request(limit) is None
    now[0] = 59.0
    assert limiter.admit_request(limit) == pytest.approx(1.0)
    now[0] = 60.5
    assert limiter.admit_request(limit) is None


@pytest.mark.parametrize("text, message", [
    ("sk-a rpm=fast\n", "line 1: rpm='fast' must be a whole number"),
    ("sk-a\n# c\nsk-a images=2\n", "line 3: the key is listed twice"),
    ("sk-a colour=red\n", "'colour=red' is not one of"),
    ("# nothing\n", "lists no key"),
])
def test_a_bad_keys_file_names_the_line(tmp_path, capsys, text, message):
    path = keys_file(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        load_keys(path)
    assert main(["serve", "--api-keys", str(path), "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert message.split(":")[-1].strip() in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()


def test_keys_file_is_not_readable_is_one_line(tmp_path, capsys):
    assert main(["serve", "--api-keys", os.fspath(tmp_path / "missing.txt")]) == 2
    assert "cannot read the file" in capsys.readouterr().err


# Model fingerprint -------------------------------------------------------------------------------------------
def test_a_job_made_with_other_weights_fails_on_restart_instead_of_mixing_models(engine, tmp_path):
    data = tmp_path / "data"
    store = Store(data)
    theirs = store.create_job([{"prompt": "old model", "seed": 0, **FAST}], model_hash="0123456789")
    ours = store.create_job([{"prompt": "same model", "seed": 1, **FAST}], model_hash=engine.model_hash)
    store.close()
    with serve(engine, tmp_path) as client:
        job = client.get(f"/v1/batches/{theirs}").json()
        assert job["status"] == "failed" and job["model_hash"] == "0123456789"
        assert "0123456789" in job["errors"][0]["message"] and engine.model_hash in job["errors"][0]["message"]
        assert job["request_counts"]["completed"] == 0 and client.get(f"/v1/batches/{theirs}/results").text == ""
        wait_completed(client, ours)
        made = client.post("/v1/batches", content='{"prompt": "x", "num_inference_steps": 2}').json()
        assert made["model_hash"] == engine.model_hash and len(engine.model_hash) == 10


def test_two_servers_on_one_data_dir_are_refused(engine, tmp_path, capsys):
    with serve(engine, tmp_path) as client:
        assert client.get("/health").status_code == 200
        assert main(["serve", "--data-dir", str(tmp_path / "data")]) == 2
        err = capsys.readouterr().err
        assert "another diffbatch server is using this folder" in err and err.count("\n") == 1
    with serve(engine, tmp_path) as client:  # released when the first one stopped
        assert client.get("/health").status_code == 200
