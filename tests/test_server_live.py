"""The server on a real socket (127.0.0.1): the official openai client, and a crash in the middle of a job."""

from __future__ import annotations

from extras import need

need("fastapi", "httpx", "uvicorn", "openai")  # before the imports that need them: a clear skip without the extra

import base64
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from diffbatch import Engine
from diffbatch.server import ServerConfig, create_app
from forked import start_cli
from helpers import noise_image
from server_helpers import LiveServer, free_port, offline, png_pixels


@pytest.fixture(scope="module")
def engine(tiny_sd_path) -> Engine:
    return Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def live_server(tiny_sd_path, tmp_path_factory):
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("live"), api_key="test-key")
    served = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")  # not shared with `engine`
    with LiveServer(create_app(config, served)) as live:
        yield live.url


def test_official_openai_client_generates_and_edits(live_server, engine, tmp_path):
    client = openai.OpenAI(base_url=f"{live_server}/v1", api_key="test-key")
    response = client.images.generate(model=engine.model_name, prompt="a red circle", n=2, size="32x32",
                                      response_format="b64_json", extra_body={"seed": 3, "num_inference_steps": 3})
    assert len(response.data) == 2
    pixels = png_pixels(base64.b64decode(response.data[1].b64_json))
    assert np.array_equal(pixels, offline(engine, prompt="a red circle", seed=4, num_inference_steps=3))

    path = tmp_path / "init.png"
    noise_image(seed=5).save(path)
    with open(path, "rb") as image:
        edited = client.images.edit(image=image, prompt="blue", response_format="url",
                                    extra_body={"strength": 0.5, "seed": 8, "num_inference_steps": 4})
    png = httpx.get(edited.data[0].url, headers={"Authorization": "Bearer test-key"}).content
    expected = offline(engine, prompt="blue", image=noise_image(seed=5), strength=0.5, seed=8, num_inference_steps=4)
    assert np.array_equal(png_pixels(png), expected)


def test_official_openai_client_sees_auth_and_input_errors(live_server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_server}/v1", api_key="wrong").images.generate(prompt="x")
    client = openai.OpenAI(base_url=f"{live_server}/v1", api_key="test-key")
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="x", size="huge")


def start_server(model: Path, data_dir: Path, port: int, log: Path) -> multiprocessing.Process:
    """``diffbatch serve`` in a process of its own (forked, torch already imported: tests/forked.py), once it
    answers /health."""
    process = start_cli(["serve", "--model", model, "--data-dir", data_dir, "--port", port, "--device", "cpu",
                         "--dtype", "float32", "--max-batch-size", "4"], stderr=log)  # a file: logs never block
    deadline = time.monotonic() + 90
    while True:
        assert process.exitcode is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "server did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)


def wait_done(base: str, job_id: str, at_least: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{base}/v1/batches/{job_id}").json()
        if job["request_counts"]["completed"] >= at_least:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


@pytest.mark.slow  # a server process of its own, killed and restarted
def test_batch_job_survives_sigkill_with_no_lost_and_no_duplicated_image(tiny_sd_path, engine, tmp_path):
    port, data = free_port(), tmp_path / "data"
    base = f"http://127.0.0.1:{port}"
    lines = [{"prompt": f"crash {i}", "num_inference_steps": 6, "guidance_scale": float(i % 2) * 4}
             for i in range(12)]
    log = tmp_path / "server.log"
    server = start_server(tiny_sd_path, data, port, log)
    try:
        job = httpx.post(f"{base}/v1/batches", content="\n".join(map(json.dumps, lines))).json()
        before = wait_done(base, job["id"], at_least=2)["request_counts"]["completed"]
        os.kill(server.pid, signal.SIGKILL)
        server.join(10)
        assert before < len(lines), "the job finished before the crash; the test proves nothing"
        server = start_server(tiny_sd_path, data, port, log)
        final = wait_done(base, job["id"], at_least=len(lines))
        assert final["status"] == "completed" and final["request_counts"]["failed"] == 0
        rows = [json.loads(x) for x in httpx.get(f"{base}/v1/batches/{job['id']}/results").text.splitlines()]
        os.kill(server.pid, signal.SIGTERM)
        server.join(30)  # uvicorn shuts down gracefully, then re-raises the signal (exit code -15)
        assert log.read_text().rstrip().endswith(f"Finished server process [{server.pid}]")
    finally:
        if server.exitcode is None:
            server.kill()
            server.join(10)
    assert [r["index"] for r in rows] == list(range(len(lines)))
    files = sorted((data / "batches" / job["id"]).iterdir())
    assert [f.name for f in files] == [f"{i:05d}-{i}.png" for i in range(len(lines))]  # no extra, no tmp
    for i, path in enumerate(files):
        expected = offline(engine, **lines[i], seed=i)
        assert np.array_equal(png_pixels(path.read_bytes()), expected), path.name


def test_a_client_that_disconnects_has_its_images_dropped_and_others_are_unaffected(tiny_sd_path, tmp_path, engine):
    served = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")
    config = ServerConfig(data_dir=tmp_path / "data", max_steps=1000)
    with LiveServer(create_app(config, served)) as live:
        url = live.url
        slow = {"prompt": "a slow circle", "n": 6, "seed": 1, "num_inference_steps": 999}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/images/generations", json=slow, timeout=1.0)  # gives up, closes the socket
        deadline = time.monotonic() + 10
        while served.num_unfinished():  # dropped within a poll interval and a step, not run to the end
            assert time.monotonic() < deadline, "the disconnected client's images are still running"
            time.sleep(0.05)
        fine = httpx.post(f"{url}/v1/images/generations", timeout=60,
                          json={"prompt": "a red circle", "seed": 2, "num_inference_steps": 3}).json()
        assert np.array_equal(png_pixels(base64.b64decode(fine["data"][0]["b64_json"])),
                              offline(engine, prompt="a red circle", seed=2, num_inference_steps=3))
        metrics = httpx.get(f"{url}/metrics").text
        assert 'diffbatch_images_cancelled_total{reason="disconnect"} 6.0' in metrics

