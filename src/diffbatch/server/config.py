"""Server settings: one frozen dataclass, filled from the command line or by tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .layout import DEFAULT_DATA_DIR
from .retention import Retention

POLICIES = ("continuous", "window", "none")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
FOREVER = "forever"


def parse_duration(text: str) -> float | None:
    """``90s``, ``30m``, ``12h``, ``7d`` or plain seconds; ``forever``: None (kept until deleted)."""
    text = text.strip().lower()
    if text == FOREVER:
        return None
    number, unit = (text[:-1], text[-1]) if text[-1:] in UNITS else (text, "s")
    try:
        seconds = float(number) * UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a duration: use e.g. 90s, 30m, 12h, 7d or {FOREVER}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{text!r} is not a duration: it must be positive (or {FOREVER})")
    return seconds


@dataclass(frozen=True)
class ServerConfig:
    model: str | None = None  # pipeline folder or hub id; None: the embedded model
    host: str = "127.0.0.1"  # loopback unless asked otherwise
    port: int = 8000
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides IP literals and localhost ("*.example.com",
    # or "*" for any: only behind a proxy that checks Host itself); keeps DNS-rebound names out (browsers.py)
    api_key: str | None = None  # when set, every endpoint but /health needs "Authorization: Bearer KEY"
    api_keys: Path | None = None  # more keys, each with its own limits (keys.py); they also need auth
    data_dir: Path = DEFAULT_DATA_DIR  # SQLite job store and generated images (layout.py)
    device: str | None = None
    dtype: str | None = None
    backend: str = "torch"  # what runs the models: torch or openvino
    lora_dir: Path | None = None  # LoRA files (NAME.safetensors) that requests may name
    embeddings_dir: Path | None = None  # textual-inversion embeddings used where a prompt names one
    max_batch_size: int = 8  # images per denoiser call
    max_queue: int = 256  # images admitted but unfinished; beyond it requests get 429
    batching: str = "continuous"  # continuous | window (identical parameters, 100 ms) | none (one at a time)
    window_ms: int = 100  # the "window" policy's wait
    max_n: int = 10  # images per request
    max_side: int = 2048  # pixels, height and width
    max_steps: int = 150
    max_prompt_chars: int = 4000
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096  # uploaded init images
    max_batch_lines: int = 100_000  # lines in one /v1/batches body
    max_job_cost: float = 1_000_000.0  # a batch job's images x steps x megapixels (30 steps of 1024x1024: 31.5k images)
    max_job_text_bytes: int = 64 * 1024 * 1024  # a batch job's prompts and negative prompts, UTF-8, all images
    header_timeout: float = 10.0  # seconds for a request's head (line and headers) to arrive (connections.py)
    body_timeout: float = 60.0  # seconds for a request's whole body to arrive once its head has
    max_connections: int = 500  # open connections (half the usual 1024 open files); beyond, a new one replaces
    # the one waiting longest for a request's head, or gets 503 when all are busy (connections.py)
    drain_seconds: float = 30.0  # on shutdown, how long running images may take to finish
    retention: Retention = Retention()  # how long images and finished batch jobs are kept (retention.py)
    # serve --ray: the engine as a Ray Serve deployment (executors/serve.py ReplicaOptions; Ray already initialised);
    # None: the engine in this process
    replicas: Any = None

    def __post_init__(self) -> None:
        if self.batching not in POLICIES:
            raise ValueError(f"batching={self.batching!r} is invalid: must be one of {', '.join(POLICIES)}")
