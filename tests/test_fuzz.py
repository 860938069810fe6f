"""The HTTP API against generated input (schemathesis, from the app's own OpenAPI schema, in process): no
answer is a server error, and every error is in OpenAI's shape. Bounded examples, so it runs in seconds.
Every operation is covered, the multipart forms (edits, parameters) and the JSON-lines batch body included."""

from __future__ import annotations

from extras import need

need("fastapi", "httpx", "schemathesis")  # before the imports that need them: a clear skip without the extra

import json

import pytest

from diffbatch import Engine
from diffbatch.server import ServerConfig, create_app

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e .[test])")
from hypothesis import HealthCheck, given, settings  # noqa: E402 - schemathesis brings hypothesis


@schemathesis.serializer("application/jsonl")
def _jsonl(ctx, value) -> bytes:  # noqa: ANN001 - a list of lines, or whatever the generator made
    lines = value if isinstance(value, list) else [value]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@pytest.fixture(scope="module")
def app(tiny_sd_path, tmp_path_factory):
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=4)
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("fuzz"), max_n=2, max_steps=2, max_side=64,
                          max_queue=16)
    return create_app(config, engine)


@pytest.mark.slow  # generated requests against the app
def test_generated_requests_never_meet_a_server_error(app):
    from schemathesis.python import asgi

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case) -> None:
        response = case.call(session=client, timeout=60)
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.path} {case.body!r}: {response.status_code} {response.text[:200]}")
        elif response.status_code >= 400:
            error = response.json().get("error")
            if not (isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)):
                failures.append(f"{case.method} {case.path}: {response.status_code} not in OpenAI's shape: "
                                f"{response.text[:200]}")

    operations = [operation.ok() for operation in schema.get_all_operations()]
    covered = {(op.method.upper(), op.path) for op in operations}
    assert {("POST", "/v1/images/edits"), ("POST", "/v1/images/parameters"), ("POST", "/v1/batches")} <= covered
    with asgi.get_client(app) as client:  # one client, one lifespan: one engine loop for the whole run
        for operation in operations:
            given(operation.as_strategy())(check)()
    assert failures == []

