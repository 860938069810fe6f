"""A server more than one person can use (issue 20): one admission policy for every entry point, cancellation
that frees the engine, and tenants (with --api-keys, each key sees and touches only its own work)."""

from __future__ import annotations

from extras import need

need("fastapi", "httpx")  # before the imports that need them: a clear skip without the extra

import io
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from diffbatch import Engine
from diffbatch.server import ServerConfig, create_app
from helpers import noise_image

FAST = {"num_inference_steps": 2}
JSONL = {"Content-Type": "application/jsonl"}


@pytest.fixture(scope="module")
def engine(tiny_sd_path) -> Engine:
    return Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=8)


def serve(engine, tmp_path, **config) -> TestClient:
    return TestClient(create_app(ServerConfig(data_dir=tmp_path / "data", **config), engine))


def batch(client, lines: list[dict], headers: dict | None = None):
    return client.post("/v1/batches", content="\n".join(json.dumps(x) for x in lines),
                       headers={**JSONL, **(headers or {})})


def nothing_queued(client) -> bool:
    s = client.app.state.server
    return s.loop.queue_length() == 0 and not s.store.job_ids()


def png_upload(size: int) -> dict:
    data = io.BytesIO()
    noise_image(size).save(data, format="PNG")
    return {"image": ("init.png", data.getvalue(), "image/png")}


# Admission: the same limits for every entry point ---------------------------------------------------------
@pytest.mark.parametrize(("line", "field"), [
    ({"prompt": "x", "num_inference_steps": 1_000_000}, "num_inference_steps"),
    ({"prompt": "x", "width": 128, "height": 32, **FAST}, "width"),
    ({"prompt": "x", "negative_prompt": "n" * 101}, "negative_prompt"),
    ({"prompt": "p" * 101}, "prompt"),
    ({"prompt": "x", "hires_scale": 4, **FAST}, "hires_scale"),  # 32x32 upscaled to 128x128: over the side
    ({"prompt": "x", "hires_scale": 1.5, "hires_steps": 9, **FAST}, "hires_steps"),
])
def test_a_batch_line_over_the_servers_limits_is_refused_naming_the_line(engine, tmp_path, line, field):
    with serve(engine, tmp_path, max_side=64, max_steps=3, max_prompt_chars=100) as client:
        response = batch(client, [{"prompt": "fine", **FAST}, line])
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["message"].startswith("line 2: ") and error["param"] == field
        assert nothing_queued(client)


def test_a_batch_over_the_job_cost_budget_is_refused_naming_the_line(engine, tmp_path):
    # each line: 2 steps x 32 x 32 pixels = 0.002048 image-step-megapixels; the budget holds 3 lines, not 4
    with serve(engine, tmp_path, max_job_cost=0.0062) as client:
        response = batch(client, [{"prompt": f"p{i}", "width": 32, "height": 32, **FAST} for i in range(4)])
        assert response.status_code == 400 and response.json()["error"]["message"].startswith("line 4: ")
        assert nothing_queued(client)
        assert batch(client, [{"prompt": f"p{i}", "width": 32, "height": 32, **FAST} for i in range(3)]).is_success
        # hires fix counts its second pass: 2 more steps at 40 x 40 on each line, so two lines are over
        hires = [{"prompt": f"h{i}", "width": 32, "height": 32, "hires_scale": 1.25, **FAST} for i in range(2)]
        response = batch(client, hires)
        assert response.status_code == 400 and response.json()["error"]["message"].startswith("line 2: ")


def test_online_negative_prompt_and_edit_size_follow_the_same_limits(engine, tmp_path):
    with serve(engine, tmp_path, max_side=64, max_prompt_chars=100) as client:
        long_negative = client.post("/v1/images/generations",
                                    json={"prompt": "x", "negative_prompt": "n" * 101, **FAST})
        assert long_negative.status_code == 400 and long_negative.json()["error"]["param"] == "negative_prompt"
        # an edit's size comes from its upload when no size is sent: that size is bounded too
        edit = client.post("/v1/images/edits", files=png_upload(128), data={"prompt": "x", "strength": "0.5"})
        assert edit.status_code == 400 and edit.json()["error"]["param"] == "image", edit.text
        assert "128x128" in edit.json()["error"]["message"]
        assert nothing_queued(client)
        small = client.post("/v1/images/edits", files=png_upload(32), data={"prompt": "x", "strength": "0.5"})
        assert small.status_code == 200, small.text


def test_the_models_default_steps_are_checked_too(engine, tmp_path):
    # a request that names no step count gets the model's default; the server's limit bounds that as well
    default = engine.defaults.num_inference_steps
    with serve(engine, tmp_path, max_steps=default - 1) as client:
        response = client.post("/v1/images/generations", json={"prompt": "x"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "num_inference_steps"


# Cancellation frees the engine ----------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["cancel", "delete"])
def test_cancelling_a_job_aborts_its_running_images_and_online_work_runs_at_once(tiny_sd_path, tmp_path, how):
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=2)
    long = 900  # steps: far more than the test waits for
    with serve(engine, tmp_path, max_steps=long) as client:
        job = batch(client, [{"prompt": f"long {i}", "num_inference_steps": long} for i in range(6)]).json()
        deadline = time.monotonic() + 30
        while engine.num_unfinished() < 2:  # the batch (2 rows) is full of the job's images
            assert time.monotonic() < deadline
            time.sleep(0.02)
        steps_before = engine.stats.steps
        if how == "cancel":
            assert client.post(f"/v1/batches/{job['id']}/cancel").json()["status"] == "cancelled"
        else:
            assert client.delete(f"/v1/batches/{job['id']}").status_code == 200
        answer = client.post("/v1/images/generations", json={"prompt": "now", **FAST})
        assert answer.status_code == 200
        # the online image ran right after the cancel, not after the job's 900-step images
        assert engine.stats.steps - steps_before < 50
        time.sleep(0.3)
        assert engine.num_unfinished() == 0 and client.app.state.server.loop.queue_length() == 0
        if how == "cancel":
            counts = client.get(f"/v1/batches/{job['id']}").json()["request_counts"]
            assert counts == {"total": 6, "completed": 0, "failed": 0, "cancelled": 6}


# Tenants -------------------------------------------------------------------------------------------------
@pytest.fixture
def tenants(engine, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-alice name=alice\nsk-bob name=bob\n")
    with serve(engine, tmp_path, api_key="operator", api_keys=keys) as client:
        yield client


ALICE, BOB, OPERATOR = ({"Authorization": f"Bearer {key}"} for key in ("sk-alice", "sk-bob", "operator"))


def test_a_keys_history_files_and_jobs_are_its_own(tenants):
    client = tenants
    made = client.post("/v1/images/generations", headers=ALICE,
                       json={"prompt": "alice's secret", "response_format": "url", **FAST}).json()
    url = made["data"][0]["url"]
    job_id = batch(client, [{"prompt": "alice's job", **FAST}], ALICE).json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/batches/{job_id}", headers=ALICE).json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job_file = json.loads(client.get(f"/v1/batches/{job_id}/results", headers=ALICE).text)["url"]

    assert [i["prompt"] for i in client.get("/v1/images/history", headers=ALICE).json()["data"]] == ["alice's secret"]
    assert client.get("/v1/images/history", headers=BOB).json()["data"] == []
    for path in (url, job_file):
        assert client.get(path, headers=ALICE).status_code == 200
        assert client.get(path, headers=BOB).status_code == 404
        assert client.get(path, headers=OPERATOR).status_code == 200  # the operator sees all
    for method, path in (("get", f"/v1/batches/{job_id}"), ("get", f"/v1/batches/{job_id}/results"),
                         ("post", f"/v1/batches/{job_id}/cancel"), ("delete", f"/v1/batches/{job_id}")):
        refused = getattr(client, method)(path, headers=BOB)
        assert refused.status_code == 404 and "alice" not in refused.text, (method, path)
    assert client.get(f"/v1/batches/{job_id}", headers=ALICE).json()["status"] == "completed"  # untouched
    assert len(client.get("/v1/images/history", headers=OPERATOR).json()["data"]) == 1
    assert client.delete(f"/v1/batches/{job_id}", headers=OPERATOR).status_code == 200


def test_another_key_cannot_cancel_a_request_by_its_id(tenants):
    client = tenants
    answers: dict[str, object] = {}

    def alice_request() -> None:
        answers["alice"] = client.post("/v1/images/generations", headers=ALICE,
                                       json={"prompt": "slow", "num_inference_steps": 40, "request_id": "r1"})

    thread = threading.Thread(target=alice_request)
    thread.start()
    deadline = time.monotonic() + 30
    while not client.app.state.server.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert client.post("/v1/images/cancel", headers=BOB, json={"request_id": "r1"}).json()["cancelled"] == 0
    thread.join(60)
    assert answers["alice"].status_code == 200


def test_an_upload_over_the_pixel_limit_is_refused_and_nothing_queued(engine, tmp_path):
    # an image over the upload pixel limit is refused from its header (nothing queued)
    with serve(engine, tmp_path, max_image_pixels=32 * 32) as client:
        big = io.BytesIO()
        Image.new("RGB", (64, 64)).save(big, format="PNG")
        response = client.post("/v1/images/edits", files={"image": ("x.png", big.getvalue(), "image/png")},
                               data={"prompt": "x"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "image"
        assert nothing_queued(client)


def test_a_long_prompt_is_not_quoted_in_the_servers_log(engine, tmp_path, capfd):
    # CLIP truncates past 77 tokens, and diffusers' warning about it quotes the cut text: a user's prompt
    with serve(engine, tmp_path) as client:
        response = client.post("/v1/images/generations",
                               json={"prompt": "x", "negative_prompt": "secretword " * 300, **FAST})
        assert response.status_code == 200
    assert "secretword" not in capfd.readouterr().err


def test_deeply_nested_json_in_a_batch_line_or_an_edit_field_is_a_400(engine, tmp_path):
    with serve(engine, tmp_path) as client:
        line = client.post("/v1/batches", content="[" * 100_000, headers=JSONL)
        assert line.status_code == 400 and line.json()["error"]["message"].startswith("line 1: ")
        edit = client.post("/v1/images/edits", files=png_upload(32),
                           data={"prompt": "x", "loras": "[" * 100_000})
        assert edit.status_code == 400 and edit.json()["error"]["param"] == "loras"
        assert len(edit.text) < 1000  # the value is not echoed back whole
        assert client.get("/v1/batches/batch_x%0A").status_code == 404


def test_an_uploaded_image_is_read_as_the_cli_reads_a_file(engine, tmp_path):
    # one decoder for every init image: transparent pixels are refused, not silently dropped (io/images.py)
    half_clear = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    half_clear.paste((0, 0, 0, 0), (0, 0, 16, 32))
    data = io.BytesIO()
    half_clear.save(data, format="PNG")
    with serve(engine, tmp_path) as client:
        response = client.post("/v1/images/edits", files={"image": ("a.png", data.getvalue(), "image/png")},
                               data={"prompt": "x", "strength": "0.5", **{k: str(v) for k, v in FAST.items()}})
        assert response.status_code == 400 and "transparent" in response.json()["error"]["message"]
        assert nothing_queued(client)
