"""Large batch jobs (issue 6): images/s of one local engine vs Ray with one and two workers on a CPU-bound job,
and the cost of resume bookkeeping (the manifest check) per image.

Every engine gets one torch thread, so two Ray workers use the machine's two cores and one worker uses one.
Ray is started once, before the timed runs (its start-up is reported on its own). Each run's time includes
loading the model (in each Ray actor: starting it too); the *marginal* rate excludes those fixed costs: each
setup also runs a small job of ``--small`` images, and marginal images/s = (N - small) / (T_N - T_small).

    python benchmarks/jobs.py --images 96 --size 64 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from resume_check import job as resume_job  # noqa: E402
from resume_check import time_plan, write_folder  # noqa: E402

from diffbatch import Engine, GenerationSpec  # noqa: E402
from diffbatch.executors.base import run_job  # noqa: E402
from diffbatch.executors.local import EngineLoop  # noqa: E402
from diffbatch.io.writer import OutputWriter  # noqa: E402
from tiny import save_tiny_sd  # noqa: E402


def job(n: int, size: int, steps: int) -> list[GenerationSpec]:
    return [GenerationSpec(prompt=f"prompt {k % 7}", seed=k, num_inference_steps=steps, height=size, width=size,
                           guidance_scale=7.5 if k % 3 else 1.0) for k in range(n)]


def time_local(model: Path, specs: list[GenerationSpec], batch: int, out: Path) -> float:
    began = time.perf_counter()
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32", max_batch_size=batch)
    resolved = [engine.resolve(s) for s in specs]
    out.mkdir()
    with OutputWriter(out, engine.model_name) as writer:
        run_job(EngineLoop(engine), resolved, range(len(resolved)), writer)
    return time.perf_counter() - began


def time_ray(model: Path, specs: list[GenerationSpec], batch: int, workers: int, out: Path, driver: Engine
             ) -> float:
    from diffbatch.executors.ray import RayDataExecutor, RayOptions

    resolved = [driver.resolve(s) for s in specs]
    options = RayOptions(model=str(model), device="cpu", dtype="float32", batch_size=batch, address=None,
                         workers=workers, model_name=driver.model_name)
    out.mkdir()
    began = time.perf_counter()
    with OutputWriter(out, driver.model_name) as writer:
        run_job(RayDataExecutor(options, writer.image_hash), resolved, range(len(resolved)), writer)
    return time.perf_counter() - began


def summary(n: int, seconds: float, small: int, small_seconds: float) -> dict:
    return {"seconds": seconds, "images_per_s": n / seconds, "small_job_seconds": small_seconds,
            "marginal_images_per_s": (n - small) / (seconds - small_seconds)}


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("0*.png"))
    return names == sorted(p.name for p in b.glob("0*.png")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def resume_overhead(n: int, folder: Path) -> dict:
    """Seconds per image of ``plan_resume`` over a folder holding all ``n`` images of the job (so every
    image is checked: manifest line parsed and compared, PNG read and hashed; resume_check.py's folder)."""
    specs = resume_job(n)
    write_folder(folder, specs, with_hash=True)
    seconds = time_plan(folder, specs, 3)
    return {"images": n, "seconds": seconds, "us_per_image": seconds / n * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (tiny model: VAE factor 2)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--small", type=int, default=16, help="images of the small job (fixed costs)")
    parser.add_argument("--resume-images", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import ray

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model = save_tiny_sd(tmp_path / "tiny")
        specs = job(args.images, args.size, args.steps)
        resume = resume_overhead(args.resume_images, tmp_path / "resume")
        print(f"resume check: {resume}", file=sys.stderr, flush=True)
        small = specs[: args.small]
        runs = {"local": summary(len(specs), time_local(model, specs, args.batch_size, tmp_path / "local"),
                                 len(small), time_local(model, small, args.batch_size, tmp_path / "local-s"))}
        print(f"local: {runs['local']}", file=sys.stderr, flush=True)
        began = time.perf_counter()
        ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
        ray_start = time.perf_counter() - began
        driver = Engine.from_pretrained(model, device="cpu", dtype="float32")
        for w in (1, 2):
            big = time_ray(model, specs, args.batch_size, w, tmp_path / f"ray{w}", driver)
            runs[f"ray_{w}"] = summary(len(specs), big, len(small),
                                       time_ray(model, small, args.batch_size, w, tmp_path / f"ray{w}-s", driver))
            print(f"ray {w}: {runs[f'ray_{w}']}", file=sys.stderr, flush=True)
        identical = all(same_files(tmp_path / "local", tmp_path / f"ray{w}") for w in (1, 2))
        ray.shutdown()
    record = {"model": "tiny", "images": args.images, "size": args.size, "steps": args.steps,
              "batch_size": args.batch_size, "torch": torch.__version__, "ray": ray.__version__,
              "cpu_count": os.cpu_count(), "threads_per_engine": 1, "ray_start_s": ray_start, "runs": runs,
              "ray_files_identical_to_local": identical, "resume_check": resume,
              "small": args.small, "load_average_1min": [load_before, os.getloadavg()[0]],
              "speedup_2_workers_vs_1": runs["ray_2"]["marginal_images_per_s"] / runs["ray_1"]["marginal_images_per_s"],
              "speedup_2_workers_vs_local": runs["ray_2"]["marginal_images_per_s"]
              / runs["local"]["marginal_images_per_s"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "jobs.json").write_text(json.dumps(record, indent=2))
    write_markdown(record)
    print(json.dumps(record, indent=2))


def write_markdown(record: dict) -> None:
    from results_md import replace_section, table

    rows = [[name, f"{r['seconds']:.2f}", f"{r['images_per_s']:.2f}", f"{r['small_job_seconds']:.2f}",
             f"{r['marginal_images_per_s']:.2f}"] for name, r in record["runs"].items()]
    resume = record["resume_check"]
    load = record["load_average_1min"]
    body = (
        f"`python benchmarks/jobs.py --images {record['images']} --size {record['size']} --steps {record['steps']}` "
        f"(tiny random SD pipeline, {record['size']}x{record['size']}, {record['steps']} steps, CFG on 2 of 3 "
        f"images, batch {record['batch_size']}, torch {record['torch']}, Ray {record['ray']}, one torch thread per "
        f"engine, {record['cpu_count']} cores; 1-minute load average {load[0]:.1f} before, {load[1]:.1f} after: "
        "other jobs shared the cores, so two workers did not get two free cores). "
        "Ray's own start-up, before the timed runs: "
        f"{record['ray_start_s']:.1f} s. A run's seconds include loading the model (each Ray run also starts "
        f"its actors); *marginal* images/s = (N - {record['small']}) / (T_N - T_{record['small']}) leaves those "
        "fixed costs out.\n\n"
        + table(["run", "seconds", "images/s", f"seconds for {record['small']} images", "marginal images/s"], rows)
        + f"\n\nMarginal rate, two Ray workers vs one: **{record['speedup_2_workers_vs_1']:.2f}x**; vs the local "
        f"engine: {record['speedup_2_workers_vs_local']:.2f}x. Ray's files equal the local run's byte for byte: "
        f"{record['ray_files_identical_to_local']}.\n\n"
        f"Resume bookkeeping: checking a folder that holds {resume['images']} images of the job (parse and compare "
        f"each manifest line, read and hash each 64x64 PNG) takes {resume['seconds']:.3f} s, "
        f"**{resume['us_per_image']:.0f} µs per image**: next to the image itself, nothing."
    )
    replace_section("Large batch jobs (issue 6)", body)


if __name__ == "__main__":
    main()
