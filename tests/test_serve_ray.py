"""``diffbatch serve --ray``: the server's engine as a Ray Serve deployment of two CPU replicas of the embedded
model (one torch thread each) behind the same FastAPI ingress. The official openai client works unchanged;
every image equals the single-process engine's bytes; a batch job's images equal ``diffbatch generate``'s;
killing a replica mid-load loses and duplicates nothing; /metrics shows each replica's queue.

Ray runs with this module's own temporary directory and without RAY_ADDRESS (nothing else on the machine
changes what it sees)."""

from __future__ import annotations

from extras import need

need("fastapi", "httpx", "uvicorn", "openai", "ray.serve")  # before the imports that need them

import base64
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from diffbatch import Engine, GenerationSpec
from diffbatch.cli import main
from diffbatch.executors.serve import APP, ReplicaOptions
from diffbatch.io.writer import encode_png
from diffbatch.server import ServerConfig, create_app
from server_helpers import LiveServer, png_pixels

pytestmark = pytest.mark.ray
KEY = "ray-key"
STEPS = 4


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    root = Path(tempfile.mkdtemp(prefix="dbserve", dir="/tmp"))  # short: Ray's socket paths live inside it
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS")}
    os.environ["RAY_TMPDIR"] = str(root)
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:  # the local cluster goes with its driver: Serve's controller and replicas too (no serve.shutdown(),
        ray.shutdown()  # which waited 4-7 s on the replicas' graceful shutdown)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    options = ReplicaOptions(model=None, device="cpu", dtype="float32", backend="torch", lora_dir=None,
                             max_batch_size=8, replicas=2, cpus=1, threads=1)
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("serve-ray"), api_key=KEY, replicas=options)
    with LiveServer(create_app(config), startup_s=300) as live:
        yield live


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(None, device="cpu", dtype="float32")


def test_the_openai_client_gets_the_single_process_bytes(server: LiveServer, engine: Engine) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    response = client.images.generate(prompt="a red circle on the left", n=3, response_format="b64_json",
                                      extra_body={"seed": 11, "num_inference_steps": STEPS})
    for k, item in enumerate(response.data):
        [result] = engine.generate([GenerationSpec(prompt="a red circle on the left", seed=11 + k,
                                                   num_inference_steps=STEPS)])
        assert base64.b64decode(item.b64_json) == encode_png(result)


def test_a_batch_job_equals_generate_and_the_metrics_show_each_replica(
        server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    lines = [{"prompt": f"a {c} square", "num_inference_steps": STEPS} for c in ("red", "blue", "green", "white")]
    body = "\n".join(json.dumps(line) for line in lines)
    job = httpx.post(f"{server.url}/v1/batches", content=body, headers=auth).json()
    final = _wait(server.url, job["id"], auth)
    assert final["request_counts"] == {"total": 4, "completed": 4, "failed": 0, "cancelled": 0}
    rows = [json.loads(x) for x in httpx.get(f"{server.url}/v1/batches/{job['id']}/results", headers=auth).text
            .splitlines()]
    (tmp_path / "lines.jsonl").write_text(body + "\n")
    assert main(["generate", str(tmp_path / "lines.jsonl"), "--out", str(tmp_path / "out"), "--no-gallery"]) == 0
    for row in rows:
        png = httpx.get(row["url"], headers=auth).content
        assert np.array_equal(png_pixels(png), png_pixels((tmp_path / "out" / f"{row['index']:05d}-{row['seed']}.png")
                                                          .read_bytes()))
    metrics = httpx.get(f"{server.url}/metrics", headers=auth).text
    assert metrics.count("diffbatch_replica_queue_length{replica=") >= 1
    assert "diffbatch_replicas " in metrics


def test_killing_a_replica_mid_load_loses_and_duplicates_nothing(server: LiveServer, engine: Engine) -> None:
    """Eight requests spread over the two replicas; when the 2-step one is answered, the replica that answered it
    says how many images it still holds (its queue length on /metrics, step-level batching: the 12-step ones are
    a few steps in), and it is killed then if it holds any, not after a guessed sleep."""
    import ray

    auth = {"Authorization": f"Bearer {KEY}"}
    answers: dict[int, bytes] = {}
    steps = {k: 2 if k == 0 else 12 for k in range(8)}

    def ask(k: int) -> None:
        reply = httpx.post(f"{server.url}/v1/images/generations", headers=auth, timeout=300,
                           json={"prompt": "a blue star", "seed": 100 + k, "num_inference_steps": steps[k]})
        assert reply.status_code == 200, reply.text
        answers[k] = base64.b64decode(reply.json()["data"][0]["b64_json"])

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    while 0 not in answers:  # the replicas are busy with the others
        assert time.monotonic() - began < 120 and any(t.is_alive() for t in threads), answers.keys()
        time.sleep(0.01)
    queues = {m[1]: float(m[2]) for m in re.finditer(r'^diffbatch_replica_queue_length\{replica="([^"]+)"\} (\S+)$',
                                                        httpx.get(f"{server.url}/metrics", headers=auth).text,
                                                        re.MULTILINE)}
    busy = [name for name, queue in queues.items() if queue > 0]
    assert busy, f"no replica held images when the 2-step one was answered ({queues}): nothing to prove"
    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                  if "SERVE_REPLICA" in a["name"] and APP in a["name"] and a["name"].endswith("#" + busy[0]))
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    for thread in threads:
        thread.join(300)
    print(f"answered in {time.monotonic() - began:.1f} s")
    assert sorted(answers) == list(range(8))
    for k, png in answers.items():
        [result] = engine.generate([GenerationSpec(prompt="a blue star", seed=100 + k, num_inference_steps=steps[k])])
        assert png == encode_png(result)
    metrics = httpx.get(f"{server.url}/metrics", headers=auth).text
    retried = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("diffbatch_replica_retries_total"))
    assert retried >= 1  # the killed replica had images in flight: they were sent again, and made once
    assert f'replica="{victim["name"].rsplit("#", 1)[-1]}"' not in metrics  # its series ended with it


def _wait(url: str, job_id: str, headers: dict, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{url}/v1/batches/{job_id}", headers=headers).json()
        if job["status"] != "in_progress":
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.5)


@pytest.mark.parametrize(("argv", "named"), [
    (["--ray", "--replicas", "0"], "--replicas 0 is invalid"),
    (["--replicas", "2"], "--replicas, --min-replicas and --max-replicas need --ray"),
    (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 is over --max-replicas 2"),
    (["--ray", "DEAD"], "no Ray cluster answers at"),
])
def test_bad_serve_ray_flags_are_one_line_exit_2_before_any_model_loads(
        argv: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:  # a local port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["serve", "--data-dir", str(tmp_path / "data"), *(dead if a == "DEAD" else a for a in argv)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and named in err, err
