"""Soak: minutes of mixed traffic at 0.9x capacity against a real `diffbatch serve` (loopback), watching that
memory, open files and the store stay flat.

The server runs as its own process on the embedded model (or --model) with short retention (--keep-files), so
the sweep runs too. Capacity is measured first (closed loop, 8 clients); then Poisson arrivals at
``--load`` x capacity send a mix: b64 generations, URL generations, clients that disconnect mid-request
(their images must leave the queue), small batch jobs (deleted once finished), history and metrics reads.
Every ``--sample`` seconds: the server's RSS, open file descriptors, SQLite size (with WAL), data-dir bytes.

    python benchmarks/soak.py --minutes 10 --out benchmarks/results/soak.json

Target (issue 15): RSS growth < 5% from the end of the first minute (warm-up) to the end; no responses other
than 200, deliberate 4xx (429 when the queue is full) and the disconnects' own.

``--attacks`` (issue 20) mixes in what a red team sent: PNGs with a huge parameters text, LoRA-tag prompts
built to backtrack, a 5 MB negative prompt, batch jobs over every limit, batch jobs cancelled or deleted while
their long images run, cross-site style posts (text/plain, a foreign Origin, a foreign Host), and clients that
trickle their headers (slowloris). A prober reads /health every 0.2 s throughout: its slowest answer is the
longest stall anyone saw (target: under 2 s).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, PngImagePlugin

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_load import free_port, wait_healthy  # noqa: E402

MIX = (("b64", 0.60), ("url", 0.15), ("disconnect", 0.12), ("batch", 0.05), ("read", 0.08))
ATTACKS = (("infotext", 0.03), ("lora-tag", 0.03), ("huge-negative", 0.02), ("over-limits", 0.03),
           ("cancelled-job", 0.02), ("cross-site", 0.03), ("slowloris", 0.02))
JSONL = {"Content-Type": "application/jsonl"}


def png_with_parameters(text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    data = io.BytesIO()
    Image.new("RGB", (1, 1)).save(data, format="PNG", pnginfo=info)
    return data.getvalue()


INFOTEXT_BOMBS = (png_with_parameters("p\n" + "a" * 60000), png_with_parameters("p\n" + "a: " * 300000),
                  png_with_parameters('Steps: "' + "\\" * 400000))


def start(model: str | None, data: Path, keep_files: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "diffbatch", "serve", "--port", str(port), "--data-dir", str(data),
           "--keep-files", keep_files, "--keep-jobs", keep_files, "--max-queue", "64", "--dtype", "float32"]
    if model:
        cmd += ["--model", model]
    log = open(data.parent / "server.log", "wb")  # a file, never a pipe: the server must not block on it
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    return proc, wait_healthy(proc, port, 180.0)


def body(rng: random.Random, k: int) -> dict:
    return {"prompt": f"a {rng.choice(['red', 'blue', 'green', 'pink'])} {rng.choice(['circle', 'square', 'star'])}"
                      f" {rng.randrange(50)}",  # prompts repeat and vary: the prompt cache fills and evicts
            "seed": k, "num_inference_steps": rng.choice((4, 8, 12)), "guidance_scale": rng.choice((1.0, 5.0)),
            "scheduler": rng.choice((None, "euler_a", "dpm++_2m"))}


async def capacity(base: str, seconds: float) -> float:
    """Images per second with 8 clients always waiting on one image each."""
    rng, done, stop = random.Random(0), 0, time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=120) as client:
        async def worker(w: int) -> None:
            nonlocal done
            while time.monotonic() < stop:
                response = await client.post(f"{base}/v1/images/generations", json=body(rng, w))
                done += response.status_code == 200

        began = time.monotonic()
        await asyncio.gather(*(worker(w) for w in range(8)))
        return done / (time.monotonic() - began)


def sample(pid: int, data: Path) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
    db = sum(p.stat().st_size for p in data.glob("diffbatch.sqlite3*"))
    files = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    return {"rss_mb": round(rss_kb / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "sqlite_kb": round(db / 1024, 1), "data_kb": round(files / 1024, 1)}


class Traffic:
    """One soak's clients: sends a request of each kind and counts what came back."""

    def __init__(self, client: httpx.AsyncClient, base: str, began: float) -> None:
        self.client, self.base, self.began = client, base, began
        self.rng = random.Random(1)
        self.statuses: Counter[str] = Counter()
        self.latencies: dict[int, list[float]] = defaultdict(list)

    async def one(self, kind: str, k: int) -> None:
        started = time.monotonic()
        try:
            if kind == "disconnect":  # gives up after 50 ms: the server must drop its images
                await self.client.post(f"{self.base}/v1/images/generations", json=body(self.rng, k), timeout=0.05)
                self.statuses["disconnect:answered"] += 1
            elif kind == "read":
                path = self.rng.choice(("/v1/images/history?limit=20", "/metrics", "/health", "/v1/models"))
                self.statuses[f"read:{(await self.client.get(self.base + path)).status_code}"] += 1
            elif kind == "batch":
                await self.batch_job(k)
            elif kind in dict(ATTACKS):
                await self.attack(kind, k)
            else:
                fmt = "b64_json" if kind == "b64" else "url"
                response = await self.client.post(f"{self.base}/v1/images/generations",
                                                  json={**body(self.rng, k), "response_format": fmt})
                self.statuses[f"{kind}:{response.status_code}"] += 1
                if response.status_code == 200:
                    self.latencies[int((started - self.began) // 60)].append(time.monotonic() - started)
        except httpx.TimeoutException:
            self.statuses[f"{kind}:client-timeout"] += 1
        except httpx.HTTPError as exc:
            self.statuses[f"{kind}:{type(exc).__name__}"] += 1

    async def batch_job(self, k: int) -> None:
        lines = "\n".join(json.dumps(body(self.rng, k * 10 + i)) for i in range(4))
        response = await self.client.post(f"{self.base}/v1/batches", content=lines, headers=JSONL)
        self.statuses[f"batch:{response.status_code}"] += 1
        if response.status_code != 200:
            return
        job = response.json()["id"]
        for _ in range(600):
            await asyncio.sleep(0.5)
            if (await self.client.get(f"{self.base}/v1/batches/{job}")).json()["status"] != "in_progress":
                break
        deleted = await self.client.delete(f"{self.base}/v1/batches/{job}")
        self.statuses[f"batch-delete:{deleted.status_code}"] += 1


    async def attack(self, kind: str, k: int) -> None:
        """One hostile request; what came back is counted under the attack's name."""
        if kind == "slowloris":
            self.statuses[f"{kind}:{await slowloris(self.base)}"] += 1
            return
        if kind == "cancelled-job":
            await self.cancelled_job(k)
            return
        response = await self.hostile_request(kind)
        self.statuses[f"{kind}:{response.status_code}"] += 1

    async def hostile_request(self, kind: str) -> httpx.Response:
        url = f"{self.base}/v1/images/generations"
        if kind == "infotext":
            files = {"image": ("bomb.png", self.rng.choice(INFOTEXT_BOMBS), "image/png")}
            return await self.client.post(f"{self.base}/v1/images/parameters", files=files)
        if kind == "lora-tag":
            return await self.client.post(url, json={"prompt": "<lora:" + " " * 3900 + "x", "num_inference_steps": 2})
        if kind == "huge-negative":
            return await self.client.post(url, json={"prompt": "x", "negative_prompt": "n" * 5_000_000})
        if kind == "over-limits":
            line = {"prompt": "x", "num_inference_steps": 1_000_000, "width": 4096, "height": 4096}
            return await self.client.post(f"{self.base}/v1/batches", content=json.dumps(line), headers=JSONL)
        headers = self.rng.choice(({"Content-Type": "text/plain"}, {**JSONL, "Origin": "http://evil.example"},
                                   {**JSONL, "Host": "rebound.example"}))
        return await self.client.post(f"{self.base}/v1/batches", content='{"prompt": "csrf"}', headers=headers)

    async def cancelled_job(self, k: int) -> None:
        """A job of long images, cancelled (or deleted) once it runs: the engine must be free again at once."""
        lines = "\n".join(json.dumps({**body(self.rng, k * 10 + i), "num_inference_steps": 150}) for i in range(8))
        response = await self.client.post(f"{self.base}/v1/batches", content=lines, headers=JSONL)
        self.statuses[f"cancelled-job:{response.status_code}"] += 1
        if response.status_code != 200:
            return
        await asyncio.sleep(1.0)
        job = response.json()["id"]
        if self.rng.random() < 0.5:
            answer = await self.client.post(f"{self.base}/v1/batches/{job}/cancel")
        else:
            answer = await self.client.delete(f"{self.base}/v1/batches/{job}")
        self.statuses[f"cancelled-job-{answer.request.method.lower()}:{answer.status_code}"] += 1


async def slowloris(base: str, seconds: float = 30.0) -> str:
    """Open a connection and send a header byte a second; how it ended: closed by the server, or still open."""
    host, port = base.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    request = b"GET /health HTTP/1.1\r\nHost: " + host.encode() + b"\r\nX-Slow: " + b"a" * 64
    try:
        for byte in request[: int(seconds)]:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1.0)
        return "open-after-30s"
    except (ConnectionError, OSError):
        return "closed-by-server"
    finally:
        writer.close()


async def prober(client: httpx.AsyncClient, base: str, end: float, waits: list[float]) -> None:
    """/health every 0.2 s: how long anyone waits for the event loop."""
    while time.monotonic() < end:
        started = time.monotonic()
        try:
            await client.get(f"{base}/health", timeout=60)
        except httpx.HTTPError:
            pass
        waits.append(time.monotonic() - started)
        await asyncio.sleep(0.2)


async def soak(base: str, pid: int, data: Path, rate: float, minutes: float, sample_s: float,
               attacks: bool = False) -> dict:
    samples: list[dict] = []
    began = time.monotonic()
    end = began + minutes * 60
    tasks: set[asyncio.Task] = set()
    arrivals = random.Random(2)
    async with httpx.AsyncClient(timeout=300) as client:
        traffic = Traffic(client, base, began)

        async def sampler() -> None:
            while time.monotonic() < end:
                samples.append({"t_s": round(time.monotonic() - began, 1), **sample(pid, data)})
                await asyncio.sleep(sample_s)

        sampling = asyncio.create_task(sampler())
        health: list[float] = []
        probing = asyncio.create_task(prober(client, base, end, health))
        mix = MIX + (ATTACKS if attacks else ())
        k = 0
        while time.monotonic() < end:
            await asyncio.sleep(arrivals.expovariate(rate))
            kind = arrivals.choices([m for m, _ in mix], [w for _, w in mix])[0]
            task = asyncio.create_task(traffic.one(kind, k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        await asyncio.gather(*tasks)
        await sampling
        await probing
        samples.append({"t_s": round(time.monotonic() - began, 1), **sample(pid, data)})
    p99 = {minute: round(float(np.percentile(v, 99)), 3) for minute, v in sorted(traffic.latencies.items())}
    return {"requests": k, "statuses": dict(sorted(traffic.statuses.items())), "p99_s_by_minute": p99,
            "health_probe_s": {"n": len(health), "p99": round(float(np.percentile(health, 99)), 3),
                               "max": round(max(health), 3)},
            "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder (default: the embedded model)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.9, help="arrival rate as a fraction of capacity")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between resource samples")
    parser.add_argument("--keep-files", default="2m", help="the server's --keep-files and --keep-jobs")
    parser.add_argument("--attacks", action="store_true", help="mix in the red team's hostile requests (issue 20)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from diffbatch.hardware import cpu_name

    work = Path(tempfile.mkdtemp(prefix="diffbatch-soak-"))
    proc, base = start(args.model, work / "data", args.keep_files)
    try:
        images_per_s = asyncio.run(capacity(base, 30.0))
        # one request is one image in the mix (batch jobs are 4 images but 5% of requests): about capacity
        rate = args.load * images_per_s
        print(f"capacity {images_per_s:.2f} images/s; soaking at {rate:.2f} requests/s for {args.minutes} min")
        found = asyncio.run(soak(base, proc.pid, work / "data", rate, args.minutes, args.sample, args.attacks))
    finally:
        proc.terminate()
        proc.wait(60)
    warm = next((s for s in found["samples"] if s["t_s"] >= 60), found["samples"][0])
    last = found["samples"][-1]
    report = {"cpu": cpu_name(), "minutes": args.minutes, "attacks": args.attacks,
              "capacity_images_per_s": round(images_per_s, 2),
              "rate_requests_per_s": round(rate, 2), **found,
              "rss_growth_after_warmup": round(last["rss_mb"] / warm["rss_mb"] - 1, 4),
              "fds_warm_vs_end": [warm["fds"], last["fds"]]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
