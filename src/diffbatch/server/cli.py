"""``diffbatch serve``: run the HTTP server (uvicorn) over one engine."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..cli import BACKEND_HELP, DTYPE_HELP
from ..options import AUTO_DTYPE, BACKENDS, DTYPE_NAMES
from .config import POLICIES, ServerConfig


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve an OpenAI-compatible image API with continuous batching")
    p.add_argument("--model", help="diffusers pipeline folder or hub id (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: env DIFFBATCH_API_KEY)")
    p.add_argument("--max-batch-size", type=int, default=8, help="images per denoiser call")
    p.add_argument("--max-queue", type=int, default=256, help="images waiting or running; beyond: HTTP 429")
    p.add_argument("--data-dir", type=Path, default=Path("diffbatch-data"), help="job store and images")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=AUTO_DTYPE, help=DTYPE_HELP)
    p.add_argument("--backend", choices=BACKENDS, default="torch", help=BACKEND_HELP)
    p.add_argument("--lora-dir", type=Path, metavar="DIR", help="LoRA files (NAME.safetensors) requests may name")
    p.add_argument("--batching", choices=POLICIES, default="continuous",
                   help="continuous (default); window / none reproduce peers' policies for benchmarks")
    p.add_argument("--max-n", type=int, default=10)
    p.add_argument("--max-side", type=int, default=2048)
    p.add_argument("--max-steps", type=int, default=150)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    config = ServerConfig(
        model=args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("DIFFBATCH_API_KEY"),
        data_dir=args.data_dir, device=args.device, dtype=args.dtype, backend=args.backend, lora_dir=args.lora_dir,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, batching=args.batching, max_n=args.max_n, max_side=args.max_side,
        max_steps=args.max_steps)
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info",
                timeout_graceful_shutdown=int(config.drain_seconds))
    return 0
