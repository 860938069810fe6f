"""The API attacked as an adversarial client would: malformed and oversized bodies, image bombs, odd text,
path tricks, non-finite numbers, huge batch bodies, bursts past the queue. Every answer is a 4xx in OpenAI's
error shape (never a 5xx), and the server keeps serving."""

from __future__ import annotations

from extras import need

need("fastapi", "httpx")  # before the imports that need them: a clear skip without the extra

import io
import json
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from diffbatch import Engine
from diffbatch.server import ServerConfig, create_app

FAST = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def engine(tiny_sd_path) -> Engine:
    return Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=8)


@pytest.fixture
def client(engine, tmp_path):
    with TestClient(create_app(ServerConfig(data_dir=tmp_path / "data", max_queue=8), engine)) as client:
        yield client


def assert_refused(response, status: int = 400, mentions: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert mentions in error["message"] or mentions == error["param"], error
    return error


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and carries one tiny compressed row: a bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def edit(client, image: bytes, **fields):
    data = {"prompt": "x", "num_inference_steps": "2", **fields}
    return client.post("/v1/images/edits", data=data, files={"image": ("in.png", image)})


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    return buffer.getvalue()


# Bodies --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"{", b"not json", b"[]", b'"prompt"', b"\xff\xfe", b"[" * 100_000,
                                  b'{"prompt": ' * 50_000])
def test_malformed_json_bodies_are_400(client, body):
    assert_refused(client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"}))


@pytest.mark.parametrize("field, value", [("guidance_scale", "NaN"), ("guidance_scale", "Infinity"),
                                          ("strength", "-Infinity"), ("n", "1e309"), ("seed", "1e400"),
                                          ("num_inference_steps", "1.5"), ("seed", "-1"),
                                          ("seed", str(2**64)), ("n", "true")])
def test_non_finite_and_out_of_range_numbers_are_400_naming_the_field(client, field, value):
    body = f'{{"prompt": "x", "{field}": {value}}}'
    assert_refused(client.post("/v1/images/generations", content=body,
                               headers={"content-type": "application/json"}), mentions=field)


def test_chunked_and_oversized_bodies_are_refused_before_reading(engine, tmp_path):
    config = ServerConfig(data_dir=tmp_path / "data", max_body_bytes=10_000)
    with TestClient(create_app(config, engine)) as client:
        assert_refused(client.post("/v1/images/generations", json={"prompt": "x" * 20_000}), 413)
        big = b"\0" * 20_000
        assert_refused(client.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", big)}), 413)
        assert_refused(client.post("/v1/batches", content=(line for line in [b"{}"] * 3)), 411)


def test_multipart_with_extra_files_or_fields_is_400(client):
    png = small_png()
    two = client.post("/v1/images/edits", data={"prompt": "x"}, files=[("image", ("a.png", png)),
                                                                        ("image", ("b.png", png))])
    assert_refused(two)
    many = client.post("/v1/images/edits", data={f"f{i}": "x" for i in range(500)}, files={"image": ("a.png", png)})
    assert_refused(many)
    assert_refused(client.post("/v1/images/edits", data={"prompt": "x", "image": "not a file"}), mentions="image")
    assert_refused(edit(client, png, n="three"), mentions="n")


# Images -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width, height", [(5000, 5000), (60_000, 60_000), (1, 20_000_000)])
def test_image_bombs_are_refused_from_the_header_without_decoding(client, width, height):
    began = time.monotonic()
    assert_refused(edit(client, png_header(width, height)), mentions="image")
    print(f"{width}x{height} refused in {time.monotonic() - began:.3f} s")


@pytest.mark.parametrize("cut", [8, 40, 100])
def test_truncated_and_garbage_images_are_400(client, cut):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="PNG")
    assert_refused(edit(client, buffer.getvalue()[:cut]), mentions="image")
    assert_refused(edit(client, b"GIF89a" + b"\0" * 50), mentions="image")


# Text ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["a\x00b", "nul at the end\x00"])
def test_nul_bytes_in_prompts_are_400(client, prompt):
    assert_refused(client.post("/v1/images/generations", json={"prompt": prompt, **FAST}), mentions="prompt")
    assert_refused(client.post("/v1/images/generations", json={"prompt": "x", "negative_prompt": prompt, **FAST}),
                   mentions="negative_prompt")
    assert_refused(client.post("/v1/batches", content=json.dumps({"prompt": prompt})), mentions="prompt")


def test_lone_surrogates_are_400(client):
    body = '{"prompt": "broken \\ud800 half", "num_inference_steps": 2}'
    assert_refused(client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"}),
                   mentions="prompt")


@pytest.mark.parametrize("prompt", ["\u202eevil right-to-left", "emoji 🐈‍⬛ cat", "zero\u200bwidth",
                                    "tab\tand\nnewline", "日本語のプロンプト", "Ω≈ç√∫"])
def test_odd_but_valid_unicode_makes_images_whose_png_says_the_prompt(client, prompt):
    response = client.post("/v1/images/generations", json={"prompt": prompt, "seed": 3, **FAST})
    assert response.status_code == 200, response.text
    settings = response.json()["data"][0]["settings"]
    assert settings["prompt"] == prompt


# Paths --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..%2Fdiffbatch.sqlite3", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%5C..%5Cx.png",
                                  "x.png%00.png", "%2Fetc%2Fpasswd.png", "a" * 300 + ".png", "diffbatch.sqlite3",
                                  ".png", "..png", "%20.png"])
def test_file_names_never_reach_the_file_system(client, name):
    response = client.get(f"/files/{name}")
    assert response.status_code == 404 and response.headers["content-type"].startswith("application/json")


def test_batch_ids_are_not_paths(client):
    for job_id in ("..%2F..%2Fdiffbatch.sqlite3", "batch_x%00", "." * 5):
        for method in (client.get, client.delete):
            assert method(f"/v1/batches/{job_id}").status_code == 404


# Volume -------------------------------------------------------------------------------------------------
def test_a_ten_thousand_line_batch_is_accepted_and_cancellable(client):
    body = "\n".join(json.dumps({"prompt": f"line {i}", "num_inference_steps": 2}) for i in range(10_000))
    began = time.monotonic()
    job = client.post("/v1/batches", content=body)
    print(f"10,000-line batch accepted in {time.monotonic() - began:.2f} s")
    assert job.status_code == 200 and job.json()["request_counts"]["total"] == 10_000
    cancelled = client.post(f"/v1/batches/{job.json()['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["request_counts"]["cancelled"] > 9_000
    assert client.delete(f"/v1/batches/{job.json()['id']}").status_code == 200


def test_a_burst_past_the_queue_is_429_with_retry_after_and_nothing_else(client):
    s = client.app.state.server
    seen = []

    def one(i):
        seen.append(s.loop.queue_length())
        return client.post("/v1/images/generations", json={"prompt": f"burst {i}", "n": 3, "num_inference_steps": 6})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(24)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, statuses
    assert all(r.headers.get("retry-after") for r in responses if r.status_code == 429)
    assert max(seen) <= s.config.max_queue
    assert s.loop.queue_length() == 0 and client.get("/health").status_code == 200
