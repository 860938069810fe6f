"""Shared pieces of the server tests: a live uvicorn server on a free port, PNG decoding, offline references."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from dataclasses import replace

import numpy as np
import uvicorn
from PIL import Image

from diffbatch import Engine, GenerationSpec
from diffbatch.server import ServerConfig
from diffbatch.server.connections import uvicorn_config


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def b64_pixels(item: dict) -> np.ndarray:
    return png_pixels(base64.b64decode(item["b64_json"]))


def offline(engine: Engine, **fields) -> np.ndarray:
    """The same spec run offline through a fresh call: the server must give these exact pixels."""
    return np.asarray(engine.generate([GenerationSpec(**fields)])[0].image)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """An app served by a real uvicorn on a free loopback port, in a thread: up when constructed, down on
    ``stop()`` or at the end of a ``with`` block. uvicorn is configured as ``serve`` configures it, with the
    connection limits of ``config`` (default: ``serve``'s)."""

    def __init__(self, app, config: ServerConfig | None = None,  # noqa: ANN001 - a FastAPI app
                 startup_s: float = 30.0) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = replace(config or ServerConfig(), host="127.0.0.1", port=port)
        self.server = uvicorn.Server(uvicorn_config(app, config, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + startup_s  # serve --ray: replicas load the model before the app starts
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
