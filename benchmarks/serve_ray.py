"""``diffbatch serve --ray`` (issue 24): one engine replica vs two, and what the ingress itself costs.

1. Load: ``diffbatch serve --ray local --replicas N`` (N = 1, 2; a fresh local Ray cluster each, its own Ray
   temporary directory) under Poisson arrivals of serve_load.py's mixed workload, at rates relative to the
   one-at-a-time capacity of one replica (measured first), side by side at each rate. Two replicas on a
   2-core machine are bounded by 2x, and each replica gets cores // N torch threads.
2. The ingress's routing cost per image: ``ReplicaLoop`` over a no-op deployment (it answers at once), one
   image at a time and 64 in flight, against the same calls to the no-op object in-process.
3. SQLite on the ingress: jobs created per second (one line each) and batch items claimed and finished per
   second (``Store``, as the job runner drives it).

    python benchmarks/serve_ray.py [--requests 30] [--rates 0.9 1.8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from serve_load import free_port, run_load, service_time, wait_healthy, workload  # noqa: E402
from throughput import cpu_model  # noqa: E402


def start_ray_server(model: Path, replicas: int, data: Path, batch: int) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="dbsr", dir="/tmp"))
    cmd = [sys.executable, "-m", "diffbatch", "serve", "--model", str(model), "--port", str(port),
           "--data-dir", str(data / f"r{replicas}"), "--max-batch-size", str(batch), "--device", "cpu",
           "--dtype", "float32", "--max-queue", "10000", "--ray", "local", "--replicas", str(replicas)]
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, wait_healthy(proc, port, 300.0), ray_tmp


def stop(proc: subprocess.Popen, ray_tmp: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    shutil.rmtree(ray_tmp, ignore_errors=True)


class NoOp:
    """A replica that answers at once: what is left is the ingress's and Ray Serve's own cost."""

    async def generate(self, spec):  # noqa: ANN001, ANN201
        return spec, {"replica": "noop", "queue": 0, "stats": None, "pid": os.getpid()}


def routing_overhead(images: int = 300) -> dict:
    import ray
    from ray import serve

    from diffbatch import GenerationSpec
    from diffbatch.executors.serve import ReplicaLoop

    ray_tmp = Path(tempfile.mkdtemp(prefix="dbsr", dir="/tmp"))
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"location": "NoServer"})
        handle = serve.run(serve.deployment(NoOp, max_ongoing_requests=1000).bind(), name="noop", route_prefix=None)

        class Facade:
            stats = None

        loop = ReplicaLoop(Facade(), handle, max_queue=100_000)
        loop._record = lambda facts: None  # no engine stats to sum
        loop.start()
        spec = GenerationSpec(prompt="x", seed=0)
        for future in loop.submit([spec] * 20):  # warm-up
            future.result(60)
        began = time.perf_counter()
        for _ in range(images):
            loop.submit([spec])[0].result(60)
        sequential = (time.perf_counter() - began) / images
        began = time.perf_counter()
        for start in range(0, images, 64):
            for future in loop.submit([spec] * min(64, images - start)):
                future.result(60)
        concurrent = (time.perf_counter() - began) / images
        began = time.perf_counter()
        for _ in range(images):
            asyncio.run(NoOp().generate(spec))
        local = (time.perf_counter() - began) / images
        loop.stop(5)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"sequential_ms": sequential * 1e3, "in_flight_64_ms": concurrent * 1e3, "in_process_ms": local * 1e3}


def sqlite_rates(tmp: Path, jobs: int = 300, items: int = 5000) -> dict:
    from diffbatch.server.store import Store

    store = Store(tmp / "sqlite")
    spec = {"prompt": "a red circle", "seed": 0, "num_inference_steps": 20}
    began = time.perf_counter()
    for _ in range(jobs):
        store.create_job([spec], "hash")
    jobs_per_s = jobs / (time.perf_counter() - began)
    store.create_job([{**spec, "seed": k} for k in range(items)], "hash")
    began = time.perf_counter()
    done = 0
    while True:
        claimed = store.claim_items("bench", 16)
        if not claimed:
            break
        for item in claimed:
            store.finish_item(item, None, None)
            done += 1
    items_per_s = done / (time.perf_counter() - began)
    store.close()
    return {"jobs_per_s": jobs_per_s, "items_claimed_and_finished_per_s": items_per_s, "items": done}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (random, made here) or a pipeline folder")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.9, 1.8], help="x one replica's capacity")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=240.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    record: dict = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        record["sqlite"] = sqlite_rates(Path(tmp))
        record["routing"] = routing_overhead()
        print(json.dumps({k: record[k] for k in ("sqlite", "routing")}), file=sys.stderr, flush=True)
        model = Path(args.model)
        if args.model == "tiny":
            from tiny import save_tiny_sd

            model = save_tiny_sd(Path(tmp) / "tiny")
        bodies = workload(args.requests, 0, 1.0)
        proc, base, ray_tmp = start_ray_server(model, 1, Path(tmp), args.batch_size)
        try:
            mean_service = service_time(base, bodies)
        finally:
            stop(proc, ray_tmp)
        record.update(model=args.model, requests=args.requests, mean_service_s=mean_service,
                      capacity_req_s=1 / mean_service, runs={"1": [], "2": []})
        for factor in args.rates:
            for replicas in (1, 2):
                proc, base, ray_tmp = start_ray_server(model, replicas, Path(tmp), args.batch_size)
                try:
                    row = asyncio.run(run_load(base, bodies, factor / mean_service, args.time_limit))
                finally:
                    stop(proc, ray_tmp)
                row["rate_x_capacity"] = factor
                record["runs"][str(replicas)].append(row)
                print(f"  rate {factor:.1f}x replicas {replicas} {json.dumps(row)}", file=sys.stderr, flush=True)
    record["load_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_ray.json").write_text(json.dumps(record, indent=2))
    write_markdown(record)
    print(json.dumps(record, indent=2))


def write_markdown(record: dict) -> None:
    from results_md import replace_section, table

    rows = []
    for i, factor in enumerate(args_rates(record)):
        for replicas in ("1", "2"):
            r = record["runs"][replicas][i]
            rows.append([f"{factor:.1f}x", replicas, f"{r['completed']}/{r['sent']}", f"{r['throughput']:.2f}",
                         *(f"{r[q]:.2f}" if r[q] is not None else "-" for q in ("p50", "p99"))])
    routing, sqlite = record["routing"], record["sqlite"]
    body = (f"`python benchmarks/serve_ray.py --requests {record['requests']}` on {record['cpu']}, "
            f"{record['cores']} cores (load average before/after: {record['load_before'][0]:.2f} / "
            f"{record['load_after'][0]:.2f}), {record['model']} model. `diffbatch serve --ray local --replicas N`, "
            "a fresh local Ray cluster per run, Poisson arrivals of serve_load.py's mixed workload at rates "
            f"relative to one replica's one-at-a-time capacity ({record['capacity_req_s']:.2f} req/s). Two "
            "replicas on two cores are bounded by 2x (each gets one torch thread where one replica gets two).\n\n"
            + table(["rate / capacity", "replicas", "completed", "throughput req/s", "p50 s", "p99 s"], rows)
            + f"\n\nThe ingress's own cost per image (`ReplicaLoop` over a no-op deployment): "
            f"**{routing['sequential_ms']:.2f} ms** one at a time, **{routing['in_flight_64_ms']:.2f} ms** with 64 "
            f"in flight (the same call in-process: {routing['in_process_ms']:.3f} ms). SQLite on the ingress: "
            f"**{sqlite['jobs_per_s']:.0f} jobs/s** created (one line each), "
            f"**{sqlite['items_claimed_and_finished_per_s']:.0f} items/s** claimed and finished (16 per claim, as the "
            "job runner does).")
    replace_section("Serving on Ray: replicas (issue 24)", body)


def args_rates(record: dict) -> list[float]:
    return [r["rate_x_capacity"] for r in record["runs"]["1"]]


if __name__ == "__main__":
    main()
