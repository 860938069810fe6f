"""The HTTP API through the app factory (FastAPI's TestClient): OpenAI images API, batches, files, metrics."""

from __future__ import annotations

from extras import need

need("fastapi", "httpx", "uvicorn")  # before the imports that need them: a clear skip without the extra

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from diffbatch import Engine
from diffbatch.server import ServerConfig, create_app
from helpers import noise_image
from server_helpers import b64_pixels, offline, png_pixels

FAST = {"num_inference_steps": 3}


@pytest.fixture(scope="module")
def engine(tiny_sd_path) -> Engine:
    return Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=8)


@pytest.fixture(scope="module")
def reference(tiny_sd_path) -> Engine:
    return Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=8)


@pytest.fixture
def client(engine, tmp_path):
    config = ServerConfig(data_dir=tmp_path / "data", max_queue=64, max_steps=50)
    with TestClient(create_app(config, engine)) as client:
        yield client


def test_generation_returns_openai_shape_and_the_offline_image(client, reference):
    response = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 5, **FAST})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["created"], int) and [d["seed"] for d in body["data"]] == [5, 6]
    assert "revised_prompt" not in body["data"][0]
    for item in body["data"]:
        expected = offline(reference, prompt="a red circle", seed=item["seed"], **FAST)
        assert np.array_equal(b64_pixels(item), expected)


def test_url_response_serves_the_stored_png_with_its_parameters(client):
    body = client.post("/v1/images/generations", json={"prompt": "a cat", "response_format": "url", "seed": 1,
                                                       "size": "16x24", **FAST}).json()
    url = body["data"][0]["url"]
    assert url.startswith("http") and "/files/" in url
    png = client.get(url)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (16, 24) and "Seed: 1" in image.text["parameters"]


def test_edit_is_image_to_image_and_equals_offline(client, reference, tmp_path):
    init = noise_image(size=32, seed=3)
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    fields = {"prompt": "blue", "strength": "0.6", "seed": "9", "num_inference_steps": "4"}
    response = client.post("/v1/images/edits", data=fields, files={"image": ("init.png", buffer.getvalue())})
    assert response.status_code == 200, response.text
    expected = offline(reference, prompt="blue", image=init, strength=0.6, seed=9, num_inference_steps=4)
    assert np.array_equal(b64_pixels(response.json()["data"][0]), expected)


def test_many_simultaneous_requests_with_different_parameters_all_match_offline(client, reference):
    requests = [{"prompt": f"p{i}", "seed": i, "num_inference_steps": 2 + i % 3, "guidance_scale": float(i % 3) * 3,
                 "scheduler": ("euler_a", "ddim", None)[i % 3], "cache": ("off", "deepcache:2", "auto", "off")[i % 4]}
                for i in range(8)]  # cached and uncached requests share the engine's calls
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda r: client.post("/v1/images/generations", json=r), requests))
    for request, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        assert np.array_equal(b64_pixels(response.json()["data"][0]), offline(reference, **request))
    metrics = client.get("/metrics").text
    calls = float(next(line.split()[1] for line in metrics.splitlines()
                       if line.startswith("diffbatch_denoiser_calls_total")))
    denoised = float(next(line.split()[1] for line in metrics.splitlines()
                          if line.startswith("diffbatch_denoised_images_total")))
    assert denoised / calls > 1  # requests shared denoiser calls


def test_models_health_and_metrics(client, engine):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/v1/models").json()["data"][0]["id"] == engine.model_name
    text = client.get("/metrics").text
    for series in ("diffbatch_queue_length", "diffbatch_running_batch_size", "diffbatch_images_per_second",
                   "diffbatch_request_latency_seconds_bucket", "diffbatch_denoiser_batch_size_bucket",
                   "process_resident_memory_bytes"):
        assert series in text


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "4096x4096"}, "size"),
    ({"prompt": "x", "size": "33x32"}, "width"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 500}, "num_inference_steps"),
    ({"prompt": "x", "scheduler": "warp"}, "scheduler"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "model": "dall-e-3"}, "model"),
    ({"prompt": "x", "colour": "red"}, "colour"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"n": 1}, "prompt"),
])
def test_bad_generation_input_is_400_naming_the_field(client, body, param):
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_bad_edit_input_is_400_naming_the_field(client):
    assert client.post("/v1/images/edits", data={"prompt": "x"}).json()["error"]["param"] == "image"
    response = client.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", b"not a png")})
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"
    big = io.BytesIO()
    Image.new("RGB", (5000, 4000)).save(big, format="PNG")
    response = client.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", big.getvalue())})
    assert response.status_code == 400 and "pixels" in response.json()["error"]["message"]


def test_body_over_the_limit_is_413(engine, tmp_path):
    with TestClient(create_app(ServerConfig(data_dir=tmp_path, max_body_bytes=1000), engine)) as client:
        response = client.post("/v1/images/generations", json={"prompt": "x" * 2000})
    assert response.status_code == 413


def test_full_queue_is_429_with_retry_after(engine, tmp_path):
    with TestClient(create_app(ServerConfig(data_dir=tmp_path, max_queue=2), engine)) as client:
        response = client.post("/v1/images/generations", json={"prompt": "x", "n": 3})
    assert response.status_code == 429 and response.headers["retry-after"]


def test_api_key_guards_every_endpoint_but_health(engine, tmp_path):
    with TestClient(create_app(ServerConfig(data_dir=tmp_path, api_key="s3cret"), engine)) as client:
        assert client.get("/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/v1/batches/batch_x", "/files/x.png"):
            assert client.get(path).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/images/generations", json={"prompt": "x"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_batch_job_runs_to_completion_and_lists_results(client, reference):
    lines = [{"prompt": f"job {i}", "num_inference_steps": 2 + i} for i in range(3)] + [{"prompt": "s", "seed": 77}]
    job = client.post("/v1/batches", content="\n".join(json.dumps(x) for x in lines)).json()
    assert job["status"] == "in_progress" and job["request_counts"]["total"] == 4
    deadline = time.monotonic() + 60
    while client.get(f"/v1/batches/{job['id']}").json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    rows = [json.loads(line) for line in client.get(f"/v1/batches/{job['id']}/results").text.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and [r["seed"] for r in rows] == [0, 1, 2, 77]
    png = client.get(rows[1]["url"]).content
    assert np.array_equal(png_pixels(png), offline(reference, prompt="job 1", seed=1, num_inference_steps=3))


def test_bad_batch_line_is_refused_naming_the_line(client):
    body = '{"prompt": "ok"}\n{"prompt": "bad", "num_inference_steps": 0}\n'
    response = client.post("/v1/batches", content=body)
    assert response.status_code == 400 and "line 2" in response.json()["error"]["message"]
    assert client.post("/v1/batches", content='{"prompt": "x"}\nnot json').status_code == 400
    assert client.post("/v1/batches", content='{"prompt": "x", "image": "/etc/passwd"}').status_code == 400


def test_cancel_stops_pending_items(client):
    job = client.post("/v1/batches", content="\n".join(['{"prompt": "c", "num_inference_steps": 30}'] * 40)).json()
    cancelled = client.post(f"/v1/batches/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["request_counts"]["cancelled"] > 0


def test_unknown_batch_and_file_are_404_and_paths_are_not_followed(client):
    assert client.get("/v1/batches/batch_nope").status_code == 404
    assert client.get("/files/..%2F..%2Fdiffbatch.sqlite3").status_code == 404
    assert client.get("/files/diffbatch.sqlite3").status_code == 404


def test_variation_fields_make_the_offline_variation(client, reference):
    fields = {"prompt": "a red circle", "seed": 5, "variation_seed": 9, "variation_strength": 0.5, **FAST}
    response = client.post("/v1/images/generations", json=fields)
    assert response.status_code == 200, response.text
    expected = offline(reference, **fields)
    assert np.array_equal(b64_pixels(response.json()["data"][0]), expected)
    missing = client.post("/v1/images/generations", json={**fields, "variation_strength": None})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "variation_strength"


def test_cancel_drops_waiting_and_running_images_and_answers_409(client, engine):
    body = {"prompt": "a slow circle", "n": 3, "seed": 1, "num_inference_steps": 50, "request_id": "job-1"}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/v1/images/generations", json=body)
        deadline = time.monotonic() + 30
        while engine.num_unfinished() == 0:  # running on the engine now
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cancelled = client.post("/v1/images/cancel", json={"request_id": "job-1"})
        response = pending.result(timeout=60)
    assert cancelled.status_code == 200 and cancelled.json()["cancelled"] == 3
    assert response.status_code == 409 and response.json()["error"]["param"] == "request_id"
    deadline = time.monotonic() + 10
    while engine.num_unfinished():  # aborted before its next step, not run to the end
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert client.post("/v1/images/cancel", json={"request_id": "job-1"}).json()["cancelled"] == 0
    assert client.post("/v1/images/cancel", json={"request_id": "../x"}).status_code == 400


def test_history_lists_stored_images_newest_first_with_their_settings(client):
    for seed in (3, 4):
        client.post("/v1/images/generations", json={"prompt": f"seed {seed}", "seed": seed, "response_format": "url",
                                                    **FAST})
    client.post("/v1/images/generations", json={"prompt": "inline", "seed": 9, **FAST})  # b64: not stored
    items = client.get("/v1/images/history").json()["data"]
    assert [(i["prompt"], i["seed"]) for i in items] == [("seed 4", 4), ("seed 3", 3)]
    assert items[0]["num_inference_steps"] == FAST["num_inference_steps"] and items[0]["sampler"]
    assert client.get(items[0]["url"]).status_code == 200
    assert len(client.get("/v1/images/history?limit=1").json()["data"]) == 1


def test_parameters_reads_back_a_served_png(client):
    item = client.post("/v1/images/generations", json={"prompt": "a, b: c", "seed": 5, "negative_prompt": "blur",
                                                       "response_format": "url", **FAST}).json()["data"][0]
    png = client.get(item["url"]).content
    found = client.post("/v1/images/parameters", files={"image": ("x.png", png, "image/png")}).json()
    assert found["fields"]["prompt"] == "a, b: c" and found["fields"]["seed"] == 5
    assert found["fields"]["negative_prompt"] == "blur" and found["sampler"] == item["settings"]["sampler"]
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    bad = client.post("/v1/images/parameters", files={"image": ("x.png", plain.getvalue(), "image/png")})
    assert bad.status_code == 400 and "no 'parameters' text" in bad.json()["error"]["message"]
