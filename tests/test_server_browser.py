"""Browsers cannot be turned against the server (issue 20): a foreign or DNS-rebound Host, a cross-origin
state-changing request and a form's content types are refused, in OpenAI's error shape; the server's own page
(/ui) and clients that are not browsers keep working. And slow clients: a connection that trickles a request's
head or body is closed within its deadline while others are served, and connections beyond the cap get 503."""

from __future__ import annotations

from extras import need

need("fastapi", "httpx", "uvicorn")  # before the imports that need them: a clear skip without the extra

import contextlib
import http.server
import json
import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from diffbatch import Engine
from diffbatch.server import ServerConfig, create_app
from server_helpers import LiveServer
from test_gallery import browser  # noqa: F401 - the shared headless Chromium fixture

LINE = json.dumps({"prompt": "x", "num_inference_steps": 1})
GENERATION = {"prompt": "x", "num_inference_steps": 1}


@pytest.fixture(scope="module")
def engine(tiny_sd_path) -> Engine:
    return Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=8)


def serve(engine, tmp_path, **config) -> TestClient:
    return TestClient(create_app(ServerConfig(data_dir=tmp_path / "data", **config), engine))


@pytest.fixture
def client(engine, tmp_path):
    with serve(engine, tmp_path) as client:
        yield client


def jobs(client) -> set[str]:
    return client.app.state.server.store.job_ids()


def refused(response: httpx.Response, status: int, param: str) -> bool:
    error = response.json().get("error", {})
    return response.status_code == status and error.get("param") == param and error.get("message")


# Host -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "attacker.example:8000", "127.0.0.1.nip.io:8000",
                                  "localhost.attacker.example", "testserver.evil.example"])
def test_a_foreign_or_dns_rebound_host_is_refused_before_anything_runs(client, host):
    response = client.post("/v1/batches", content=LINE, headers={"Host": host, "Content-Type": "application/jsonl"})
    assert refused(response, 400, "Host"), response.text
    assert refused(client.get("/v1/models", headers={"Host": host}), 400, "Host")
    assert not jobs(client)


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "192.168.1.20",
                                  "testserver"])
def test_ip_literals_localhost_and_the_servers_own_name_are_served(client, host):
    assert client.get("/health", headers={"Host": host}).status_code == 200


def test_allowed_hosts_admits_the_names_it_lists(engine, tmp_path):
    with serve(engine, tmp_path, allowed_hosts=("images.example.com", "*.corp.example")) as client:
        for host in ("images.example.com", "images.example.com:443", "a.b.corp.example"):
            assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
        for host in ("example.com", "corp.example", "evilcorp.example"):
            assert refused(client.get("/v1/models", headers={"Host": host}), 400, "Host"), host
    with serve(engine, tmp_path, allowed_hosts=("*",)) as client:
        assert client.get("/v1/models", headers={"Host": "anything.example"}).status_code == 200


# Origin -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://testserver:3000", "file://"])
def test_a_cross_origin_post_is_refused(client, origin):
    batch = client.post("/v1/batches", content=LINE, headers={"Origin": origin, "Content-Type": "application/jsonl"})
    assert refused(batch, 403, "Origin"), batch.text
    generation = client.post("/v1/images/generations", json=GENERATION, headers={"Origin": origin})
    assert refused(generation, 403, "Origin")
    assert not jobs(client)


def test_cross_origin_cancel_and_delete_are_refused(client):
    job = client.post("/v1/batches", content=LINE, headers={"Content-Type": "application/jsonl"}).json()
    foreign = {"Origin": "http://evil.example"}
    assert refused(client.post(f"/v1/batches/{job['id']}/cancel", headers=foreign), 403, "Origin")
    assert refused(client.delete(f"/v1/batches/{job['id']}", headers=foreign), 403, "Origin")
    assert jobs(client) == {job["id"]} and client.get(f"/v1/batches/{job['id']}").json()["status"] != "cancelled"


def test_a_same_origin_post_is_accepted(client):
    same = {"Origin": "http://testserver"}
    assert client.post("/v1/images/generations", json=GENERATION, headers=same).status_code == 200
    response = client.post("/v1/batches", content=LINE, headers={**same, "Content-Type": "application/jsonl"})
    assert response.status_code == 200 and jobs(client) == {response.json()["id"]}


def test_a_get_from_a_foreign_origin_is_answered_without_cors_headers(client):
    response = client.get("/health", headers={"Origin": "http://evil.example"})
    assert response.status_code == 200
    assert not [name for name in response.headers if name.lower().startswith("access-control-")]
    preflight = client.options("/v1/batches", headers={"Origin": "http://evil.example",
                                                       "Access-Control-Request-Method": "POST"})
    assert preflight.status_code >= 400 and "access-control-allow-origin" not in preflight.headers


# Content types ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_form_content_types_are_refused_by_json_endpoints(client, content_type):
    body = json.dumps(GENERATION)
    for path in ("/v1/images/generations", "/v1/batches"):
        response = client.post(path, content=body, headers={"Content-Type": content_type})
        assert refused(response, 415, "Content-Type"), (path, response.text)
    assert not jobs(client) and client.get("/v1/images/history").json()["data"] == []


def test_multipart_endpoints_refuse_other_bodies_and_forms_without_the_image(client):
    for path in ("/v1/images/edits", "/v1/images/parameters"):
        for content_type in ("text/plain", "application/json"):
            response = client.post(path, content=b'{"prompt": "x"}', headers={"Content-Type": content_type})
            assert refused(response, 415, "Content-Type"), (path, response.text)
        assert refused(client.post(path, data={"prompt": "x"}), 400, "image")  # form-urlencoded holds no file
    assert client.get("/v1/images/history").json()["data"] == []


def test_a_json_body_needs_its_content_type(client):
    response = client.post("/v1/images/generations", content=json.dumps(GENERATION))
    assert refused(response, 415, "Content-Type") and "application/json" in response.json()["error"]["message"]


@pytest.mark.parametrize("content_type", ["application/jsonl", "application/x-ndjson", "application/json",
                                          "application/jsonl; charset=utf-8", None])
def test_batches_take_jsonl_content_types_or_none(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/v1/batches", content=LINE, headers=headers)
    assert response.status_code == 200, response.text


# In a real browser ------------------------------------------------------------------------------------------
@pytest.fixture
def live(engine, tmp_path):
    app = create_app(ServerConfig(data_dir=tmp_path / "data"), engine)
    with LiveServer(app) as server:
        yield server, app


ATTACK = """<script>
fetch("{url}/v1/batches", {{method: "POST", mode: "no-cors", body: '{line}'}});
fetch("{url}/v1/images/generations", {{method: "POST", mode: "no-cors", body: '{{"prompt": "x"}}'}});
</script>"""


@contextlib.contextmanager
def page_server(html: str) -> Iterator[str]:
    """Another origin on this machine (Chromium lets a local page, not a public one, reach loopback): its URL."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html.encode())

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        yield f"http://localhost:{httpd.server_address[1]}/"
        httpd.shutdown()


def test_a_page_on_another_origin_cannot_post_through_the_browser(browser, live):  # noqa: F811
    server, app = live
    page = browser.new_page()
    answers = []
    page.on("response", lambda response: answers.append(response.status) if server.url in response.url else None)
    with page_server(ATTACK.format(url=server.url, line=LINE)) as attacker:
        page.goto(attacker)
        deadline = time.monotonic() + 10
        while len(answers) < 2 and time.monotonic() < deadline:
            page.wait_for_timeout(50)
    assert answers == [403, 403] and not app.state.server.store.job_ids()


POST = "([path, type, body]) => fetch(path, {method: 'POST', headers: {'Content-Type': type}, body})" \
       ".then(r => r.status)"


def test_the_ui_page_still_posts_to_its_own_server(browser, live):  # noqa: F811
    server, app = live
    page = browser.new_page()
    page.goto(f"{server.url}/ui")
    batch = page.evaluate(POST, ["/v1/batches", "application/jsonl", LINE])
    generation = page.evaluate(POST, ["/v1/images/generations", "application/json", json.dumps(GENERATION)])
    assert (batch, generation) == (200, 200) and len(app.state.server.store.job_ids()) == 1


# Slow clients -----------------------------------------------------------------------------------------------
SLOW = {"header_timeout": 1.0, "body_timeout": 1.5, "max_connections": 40}
HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
BODY_HEAD = (b"POST /v1/batches HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/jsonl\r\n"
             b"Content-Length: 10000\r\n\r\n")


def connect(url: str, count: int, first: bytes = b"") -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    sockets = [socket.create_connection((host, int(port))) for _ in range(count)]
    for s in sockets:
        s.sendall(first)
    return sockets


def trickle(sockets: list[socket.socket], interval: float, limit: float) -> tuple[list[float], list[bytes]]:
    """Send one more byte on every socket each ``interval`` until the server closes it: the seconds each
    stayed open (inf: still open after ``limit``) and what the server sent on each."""
    start, closed, received = time.monotonic(), {}, {s: b"" for s in sockets}
    while len(closed) < len(sockets) and time.monotonic() - start < limit:
        for s in (s for s in sockets if s not in closed):
            try:
                while select.select([s], [], [], 0)[0]:
                    data = s.recv(4096)
                    if not data:
                        raise ConnectionResetError
                    received[s] += data
                s.send(b"a")
            except OSError:
                closed[s] = time.monotonic() - start
        time.sleep(interval)
    for s in sockets:
        s.close()
    return [closed.get(s, float("inf")) for s in sockets], [received[s] for s in sockets]


def test_trickled_heads_are_closed_at_the_header_timeout_while_others_are_served(engine, tmp_path):
    config = ServerConfig(data_dir=tmp_path / "data", **SLOW)
    with LiveServer(create_app(config, engine), config) as server:
        sockets = connect(server.url, 30, HEAD)
        started = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=2).status_code == 200
        assert time.monotonic() - started < 1.0
        open_for, _ = trickle(sockets, 0.1, 5.0)
    assert max(open_for) < SLOW["header_timeout"] + 0.5, open_for


def test_a_trickled_body_is_answered_408_at_the_body_timeout(engine, tmp_path):
    config = ServerConfig(data_dir=tmp_path / "data", **SLOW)
    with LiveServer(create_app(config, engine), config) as server:
        open_for, received = trickle(connect(server.url, 5, BODY_HEAD), 0.1, 5.0)
        assert httpx.get(f"{server.url}/health", timeout=2).status_code == 200
    assert max(open_for) < SLOW["body_timeout"] + 0.5, open_for
    assert all(r.startswith(b"HTTP/1.1 408 ") and b'"param": null' in r for r in received), received


def test_beyond_the_cap_a_new_connection_replaces_a_trickler_and_gets_503_only_when_all_are_busy(engine, tmp_path):
    config = ServerConfig(data_dir=tmp_path / "data", **SLOW)
    cap = SLOW["max_connections"]
    with LiveServer(create_app(config, engine), config) as server:
        heads = connect(server.url, cap, HEAD)
        time.sleep(0.2)  # the server has accepted them all
        assert httpx.get(f"{server.url}/health", timeout=2).status_code == 200
        bodies = connect(server.url, cap, BODY_HEAD)  # each takes the place of a head trickler
        time.sleep(0.2)
        busy = httpx.get(f"{server.url}/health", timeout=2)
        assert busy.status_code == 503 and busy.json()["error"]["type"] == "server_error"
        assert max(trickle(heads, 0.05, 1.0)[0]) < 0.1  # all replaced already, before their header timeout
        time.sleep(SLOW["body_timeout"])
        assert httpx.get(f"{server.url}/health", timeout=2).status_code == 200
        for s in bodies:
            s.close()
