"""``diffbatch serve``: run the HTTP server (uvicorn) over one engine."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

from ..cli import BACKEND_HELP, DTYPE_HELP, UsageError
from ..options import AUTO_DTYPE, BACKENDS, DTYPE_NAMES
from .config import POLICIES, ServerConfig, parse_duration
from .layout import DEFAULT_DATA_DIR
from .retention import Retention


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve an OpenAI-compatible image API with continuous batching")
    p.add_argument("--model", help="diffusers pipeline folder or hub id (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allowed-hosts", type=_names, default=(), metavar="NAMES",
                   help="host names the server answers to besides its IP addresses and localhost, comma-separated "
                        "(*.example.com; * for any, only behind a proxy that checks Host)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: env DIFFBATCH_API_KEY)")
    p.add_argument("--api-keys", type=Path, metavar="FILE",
                   help="more keys, one per line, each with optional limits: KEY rpm=60 images=16 name=alice")
    p.add_argument("--max-batch-size", type=int, default=8, help="images per denoiser call")
    p.add_argument("--max-queue", type=int, default=256, help="images waiting or running; beyond: HTTP 429")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="job store and images")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=AUTO_DTYPE, help=DTYPE_HELP)
    p.add_argument("--backend", choices=BACKENDS, default="torch", help=BACKEND_HELP)
    p.add_argument("--lora-dir", type=Path, metavar="DIR", help="LoRA files (NAME.safetensors) requests may name")
    p.add_argument("--embeddings-dir", type=Path, metavar="DIR",
                   help="textual-inversion embeddings (NAME.pt, NAME.safetensors) used where a prompt names one")
    p.add_argument("--batching", choices=POLICIES, default="continuous",
                   help="continuous (default); window / none reproduce peers' policies for benchmarks")
    p.add_argument("--max-n", type=int, default=10)
    p.add_argument("--max-side", type=int, default=2048)
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--max-prompt-chars", type=_positive_int, default=ServerConfig.max_prompt_chars,
                   metavar="N", help="characters in a prompt or negative prompt, anywhere (default %(default)s)")
    p.add_argument("--max-job-cost", type=_positive_float, default=ServerConfig.max_job_cost,
                   metavar="COST", help="a batch job's images x steps x megapixels (default %(default)s: ~31k images "
                                        "of 1024x1024 at 30 steps)")
    p.add_argument("--max-job-text-mb", type=_positive_float, default=ServerConfig.max_job_text_bytes / 2**20,
                   metavar="MB", help="a batch job's prompts and negative prompts, all its images together "
                                      "(default %(default)g)")
    p.add_argument("--keep-files", type=_duration, default="1d", metavar="DURATION",
                   help="how long images served by URL are kept: 90s, 30m, 12h, 7d or forever (default 1d)")
    p.add_argument("--max-data-gb", type=_positive_float, metavar="GB",
                   help="cap on images served by URL; the oldest are deleted first (default: no cap)")
    p.add_argument("--keep-jobs", type=_duration, default="30d", metavar="DURATION",
                   help="how long a finished batch job and its images are kept (default 30d; or forever)")
    p.add_argument("--header-timeout", type=_positive_float, default=10.0, metavar="SECONDS",
                   help="a request's line and headers must arrive within it, or the connection is closed (default 10)")
    p.add_argument("--body-timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                   help="a request's whole body must arrive within it once its headers have, or 408 (default 60)")
    p.add_argument("--max-connections", type=_positive_int, default=500, metavar="N",
                   help="open connections; beyond: 503 and closed (default 500)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the engine as a Ray Serve deployment of --replicas engines behind this server (a local "
                        "cluster without ADDRESS, or RAY_ADDRESS, or a running `ray start` one); needs diffbatch[ray]")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="--ray: engine replicas (default 1)")
    p.add_argument("--min-replicas", type=int, metavar="N", help="--ray: autoscale on ongoing requests, from N")
    p.add_argument("--max-replicas", type=int, metavar="N", help="--ray: autoscale up to N replicas")
    p.set_defaults(func=run_serve)


def _duration(text: str) -> float | None:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no host: give names separated by commas")
    return names


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .connections import uvicorn_config
    from .keys import load_keys
    from .store import check_data_dir

    if args.api_keys is not None:
        load_keys(args.api_keys)  # a bad file is a one-line error before the model loads
    check_data_dir(args.data_dir)
    if args.ray is None and (args.replicas != 1 or args.min_replicas is not None or args.max_replicas is not None):
        raise UsageError("--replicas, --min-replicas and --max-replicas need --ray")
    if args.ray is not None and args.embeddings_dir is not None:
        raise UsageError("--embeddings-dir is not available with --ray yet (the replicas load no embeddings)")
    replicas = None if args.ray is None else start_replicas(args)  # checked and connected before any model loads

    config = ServerConfig(
        model=args.model, host=args.host, port=args.port, allowed_hosts=args.allowed_hosts,
        api_key=args.api_key or os.environ.get("DIFFBATCH_API_KEY"), api_keys=args.api_keys,
        data_dir=args.data_dir, device=args.device, dtype=args.dtype, backend=args.backend, lora_dir=args.lora_dir,
        embeddings_dir=args.embeddings_dir, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, batching=args.batching, max_n=args.max_n, max_side=args.max_side,
        max_steps=args.max_steps, max_prompt_chars=args.max_prompt_chars, max_job_cost=args.max_job_cost,
        max_job_text_bytes=int(args.max_job_text_mb * 2**20),
        header_timeout=args.header_timeout, body_timeout=args.body_timeout,
        max_connections=args.max_connections, replicas=replicas,
        retention=Retention(keep_files=args.keep_files, keep_jobs=args.keep_jobs,
                            max_data_bytes=None if args.max_data_gb is None else int(args.max_data_gb * 1e9)))
    server = uvicorn.Server(uvicorn_config(create_app(config), config, log_level="info"))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 1


def start_replicas(args: argparse.Namespace) -> Any:
    """``--ray``: check the replica flags, join or start the Ray cluster (executors/ray.py chooses it, as for
    ``generate --ray``), check its GPUs; the engine replicas start with the app (replicas.py)."""
    from ..executors.serve import ReplicaOptions, check_cluster_gpus, check_options

    cores = os.cpu_count() or 1
    options = ReplicaOptions(model=args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                             lora_dir=None if args.lora_dir is None else str(args.lora_dir),
                             max_batch_size=args.max_batch_size, replicas=args.replicas,
                             min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                             cpus=max(1, cores // max(1, args.replicas)))
    check_options(options)
    ray = _import_serve()
    from ..executors.ray import connect_cluster

    connect_cluster(ray, args.ray or None, cpus=max(cores, options.replicas * int(options.cpus)))
    gpus = ray.cluster_resources().get("GPU", 0)
    wants_gpu = (args.device or "").startswith("cuda") or (args.device is None and gpus > 0)
    options = dataclasses.replace(options, gpus=1.0 if wants_gpu else 0.0, threads=None if wants_gpu else options.cpus)
    check_cluster_gpus(options, gpus)
    return options


def _import_serve() -> Any:
    from ..errors import InputError

    try:
        import ray
        from ray import serve  # noqa: F401 - Ray Serve's own dependencies (grpc, aiohttp) are checked here
    except ImportError:
        raise InputError("--ray needs Ray Serve: pip install 'diffbatch[ray]'") from None
    return ray
