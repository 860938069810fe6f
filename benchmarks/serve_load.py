"""Open-loop load on `diffbatch serve`: continuous batching vs identical-parameter batching vs one at a time.

Each policy runs as its own server process (loopback only) over the same model; a Poisson arrival process
(bounded count and time) sends a mixed-parameter workload (steps, guidance, sampler vary per request), at
rates set relative to the one-at-a-time capacity measured first. Reports throughput and p50/p95/p99 latency.

    python benchmarks/serve_load.py --requests 40 --rates 0.5 0.9 1.3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
POLICIES = ("continuous", "window", "none")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, policy: str, data: Path, batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "diffbatch", "serve", "--model", str(model), "--port", str(port),
           "--data-dir", str(data / policy), "--batching", policy, "--max-batch-size", str(batch),
           "--device", "cpu", "--dtype", "float32", "--max-queue", "10000"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, wait_healthy(proc, port, 120.0)


def wait_healthy(proc: subprocess.Popen, port: int, seconds: float) -> str:
    """The server's base URL once /health answers; the process is killed if it does not within ``seconds``."""
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server on port {port} did not start")


def workload(n: int, seed: int, steps_scale: float) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"a {rng.choice(['red', 'blue', 'green'])} {rng.choice(['circle', 'square', 'star'])}",
             "seed": k, "num_inference_steps": max(1, round(rng.choice((10, 20, 30)) * steps_scale)),
             "guidance_scale": rng.choice((1.0, 5.0, 7.5)), "scheduler": rng.choice((None, "euler_a", "dpm++_2m"))}
            for k in range(n)]


async def run_load(base: str, bodies: list[dict], rate: float, time_limit: float) -> dict:
    """Poisson arrivals at ``rate`` req/s; returns latencies of completed requests and the wall time."""
    rng = random.Random(1)
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(timeout=time_limit) as client:
        async def one(body: dict) -> None:
            nonlocal errors
            began = time.monotonic()
            response = await client.post(f"{base}/v1/images/generations", json=body)
            if response.status_code == 200:
                latencies.append(time.monotonic() - began)
            else:
                errors += 1

        began = time.monotonic()
        tasks = []
        for body in bodies:
            tasks.append(asyncio.create_task(one(body)))
            await asyncio.sleep(rng.expovariate(rate))
            if time.monotonic() - began > time_limit:
                break
        await asyncio.wait(tasks, timeout=max(1.0, time_limit - (time.monotonic() - began)))
        wall = time.monotonic() - began
    return {"completed": len(latencies), "errors": errors, "sent": len(tasks), "wall_s": wall,
            "throughput": len(latencies) / wall, **percentiles(latencies)}


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50": None, "p95": None, "p99": None}
    p = np.percentile(latencies, [50, 95, 99])
    return {"p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2])}


def service_time(base: str, bodies: list[dict]) -> float:
    """Mean time of one request alone (sequential, nothing else running): 1 / one-at-a-time capacity."""
    times = []
    with httpx.Client(timeout=300) as client:
        client.post(f"{base}/v1/images/generations", json=bodies[0])  # warm-up
        for body in bodies[:10]:
            began = time.monotonic()
            client.post(f"{base}/v1/images/generations", json=body).raise_for_status()
            times.append(time.monotonic() - began)
    return float(np.mean(times))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in POLICIES:
        rows = results["runs"][policy]
        rates = [r["rate_x_capacity"] for r in rows]
        ax1.plot(rates, [r["p99"] for r in rows], marker="o", label=policy)
        ax2.plot(rates, [r["throughput"] for r in rows], marker="o", label=policy)
    ax1.set(xlabel="arrival rate / one-at-a-time capacity", ylabel="p99 latency (s)", yscale="log")
    ax2.set(xlabel="arrival rate / one-at-a-time capacity", ylabel="throughput (req/s)")
    ax1.legend()
    fig.suptitle(f"diffbatch serve, {results['model']} model, mixed parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (random, made here) or a pipeline folder")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.9, 1.3], help="x one-at-a-time capacity")
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per load run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model)
        if args.model == "tiny":
            from tiny import save_tiny_sd

            model = save_tiny_sd(Path(tmp) / "tiny")
        bodies = workload(args.requests, 0, args.steps_scale)
        proc, base = start(model, "none", Path(tmp), args.batch_size)
        mean_service = service_time(base, bodies)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        capacity = 1 / mean_service
        print(f"one-at-a-time service time {mean_service:.3f} s -> capacity {capacity:.2f} req/s", file=sys.stderr)
        results = {"model": args.model, "requests": args.requests, "mean_service_s": mean_service,
                   "capacity_req_s": capacity, "runs": {p: [] for p in POLICIES}}
        for factor in args.rates:
            for policy in POLICIES:  # side by side at each rate
                proc, base = start(model, policy, Path(tmp), args.batch_size)
                try:
                    row = asyncio.run(run_load(base, bodies, factor * capacity, args.time_limit))
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
                row["rate_x_capacity"] = factor
                results["runs"][policy].append(row)
                print(f"  rate {factor:.1f}x {policy:10s} {json.dumps(row)}", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "serve_load.png")
    write_markdown(results)
    print(json.dumps(results, indent=2))


def write_markdown(results: dict) -> None:
    from results_md import replace_section, table

    rows = []
    for i, factor in enumerate(sorted({r["rate_x_capacity"] for r in results["runs"]["none"]})):
        runs = {p: results["runs"][p][i] for p in POLICIES}
        for policy, r in runs.items():
            rows.append([f"{factor:.1f}x", policy, f"{r['completed']}/{r['sent']}", f"{r['throughput']:.2f}",
                         *(f"{r[q]:.2f}" if r[q] is not None else "-" for q in ("p50", "p95", "p99"))])
        c = runs["continuous"]["p99"]
        rows.append([f"{factor:.1f}x", "**p99 continuous / none, / window**", "", "",
                     "", "", f"**{c / runs['none']['p99']:.2f} / {c / runs['window']['p99']:.2f}**"])
    body = (f"`python benchmarks/serve_load.py --requests {results['requests']}` on the {results['model']} model: "
            f"one server process per policy, Poisson arrivals on loopback, mixed steps/guidance/sampler. "
            f"One-at-a-time capacity measured first: {results['capacity_req_s']:.2f} req/s "
            f"(mean service {results['mean_service_s']:.3f} s). Policies: continuous = diffbatch (joins the "
            "running batch at the next step); window = identical-parameter batching after a 100 ms window "
            "(what peers do); none = one request at a time. Plot: `results/serve_load.png`.\n\n"
            + table(["rate / capacity", "policy", "completed", "throughput req/s", "p50 s", "p95 s", "p99 s"],
                    rows))
    replace_section("Serving under load (issue 5)", body)


if __name__ == "__main__":
    main()
