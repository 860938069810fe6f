"""The server under hostile authoring input and racing clients: planning a batch never holds the threads online
requests use, a job's prompts count against its budget, a deleted job's disk is given back, a DELETE or a cancel
racing another answers once, and missing or null fields are 4xx or defaults, never a 500."""

from __future__ import annotations

from extras import need

need("fastapi", "httpx", "uvicorn")  # before the imports that need them: a clear skip without the extra

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from diffbatch import Engine
from diffbatch.io import expansion
from diffbatch.server import ServerConfig, create_app
from test_authoring_bounds import NESTED
from test_server_security import FAST, JSONL, batch, nothing_queued, png_upload


@pytest.fixture(scope="module")
def engine(tiny_sd_path) -> Engine:
    return Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=8)


def serve(engine, tmp_path, **config) -> TestClient:
    return TestClient(create_app(ServerConfig(data_dir=tmp_path / "data", **config), engine))


def test_an_edit_without_a_prompt_is_a_400_naming_it(engine, tmp_path):
    with serve(engine, tmp_path) as client:
        response = client.post("/v1/images/edits", files=png_upload(32), data={"strength": "0.5"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", response.text


def test_a_null_field_means_its_default(engine, tmp_path):
    with serve(engine, tmp_path) as client:
        response = client.post("/v1/images/generations", json={"prompt": "x", "cache": None, "seed": None, **FAST})
        assert response.status_code == 200, response.text
        assert "Cache" not in response.json()["data"][0].get("settings", {}).get("parameters", "")
        assert batch(client, [{"prompt": "x", "cache": None, **FAST}]).status_code == 200


def test_a_batch_line_with_a_5000_digit_seed_is_a_400(engine, tmp_path):
    with serve(engine, tmp_path) as client:
        response = client.post("/v1/batches", content='{"prompt": "x", "seed": ' + "7" * 5000 + "}", headers=JSONL)
        assert response.status_code == 400 and "5000 digits" in response.json()["error"]["message"]
        assert nothing_queued(client)


def test_a_job_whose_prompts_are_over_the_text_budget_is_refused_naming_the_line(engine, tmp_path):
    with serve(engine, tmp_path, max_job_text_bytes=2500) as client:
        response = batch(client, [{"prompt": "p" * 1000, **FAST} for _ in range(3)])
        assert response.status_code == 400 and response.json()["error"]["message"].startswith("line 3: ")
        assert nothing_queued(client)


@pytest.mark.slow  # three 2 s expansion budgets run out, one after another
def test_a_slow_template_is_refused_and_online_requests_and_health_do_not_wait_behind_it(engine, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setattr(expansion, "BUDGET_S", 2.0)
    with serve(engine, tmp_path) as client:
        answers: list = []
        hostile = [threading.Thread(target=lambda: answers.append(client.post(
            "/v1/batches", params={"dynamic": "combinatorial"}, content=json.dumps({"prompt": NESTED}),
            headers=JSONL))) for _ in range(3)]
        for thread in hostile:
            thread.start()
        time.sleep(0.5)  # the first is expanding, the others wait their turn on the planning thread
        began = time.monotonic()
        assert client.get("/health").status_code == 200
        online = client.post("/v1/images/generations", json={"prompt": "x", **FAST})
        served_in = time.monotonic() - began
        waiting = sum(thread.is_alive() for thread in hostile)
        for thread in hostile:
            thread.join(60)
        assert online.status_code == 200
        assert waiting >= 2, f"online and /health answered in {served_in:.1f} s, after the templates"
        assert [a.status_code for a in answers] == [400] * 3
        assert all("took longer than 2 s to expand" in a.json()["error"]["message"] for a in answers)
        assert nothing_queued(client)


def test_deleting_a_job_gives_its_disk_back(engine, tmp_path):
    with serve(engine, tmp_path, max_prompt_chars=4000) as client:
        store = client.app.state.server.store
        client.app.state.server.jobs.stop(timeout=1.0)  # keep the job pending: only its rows matter here
        database = store.layout.database
        before = _disk(database)
        job = batch(client, [{"prompt": f"{i} " + "p" * 3000, **FAST} for i in range(600)]).json()
        grown = _disk(database)
        assert client.delete(f"/v1/batches/{job['id']}").json()["deleted"] is True
        after = _disk(database)
        assert grown - before > 1_500_000 and after - before < (grown - before) / 4, (before, grown, after)


def _disk(database) -> int:
    return sum(path.stat().st_size for path in database.parent.glob(database.name + "*"))


def test_racing_deletes_and_cancels_of_one_job_answer_once_and_never_500(engine, tmp_path):
    with serve(engine, tmp_path) as client:
        client.app.state.server.jobs.stop(timeout=1.0)
        for _ in range(5):
            url = f"/v1/batches/{batch(client, [{'prompt': f'p{i}', **FAST} for i in range(20)]).json()['id']}"
            answers: list = []
            calls = [lambda u=url: client.delete(u), lambda u=url: client.delete(u),
                     lambda u=url: client.post(f"{u}/cancel")]
            threads = [threading.Thread(target=lambda c=c, a=answers: a.append(c())) for c in calls]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert all(a.status_code in (200, 404) for a in answers), [a.text for a in answers]
            deleted = [a for a in answers if a.request.method == "DELETE" and a.status_code == 200]
            assert len(deleted) == 1


def test_the_parameters_of_a_png_are_checked_before_a_client_is_offered_them(engine, tmp_path):
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 3, Seed: 1, Cache: deepcache:0_3")
    data = io.BytesIO()
    Image.new("RGB", (8, 8)).save(data, format="PNG", pnginfo=info)
    with serve(engine, tmp_path) as client:
        response = client.post("/v1/images/parameters", files={"image": ("p.png", data.getvalue(), "image/png")})
        assert response.status_code == 400 and "not honoured: Cache: deepcache:0_3" in response.text, response.text


def test_an_access_log_line_keeps_a_short_path():
    import logging

    from diffbatch.server.connections import MAX_LOGGED_PATH, ShortAccessLines

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:1", "GET", "/v1/batches?sweep=" + "x" * 60_000, "1.1", 200), None)
    assert ShortAccessLines().filter(record)
    assert len(record.getMessage()) < MAX_LOGGED_PATH + 100 and "(60018 characters)" in record.getMessage()
