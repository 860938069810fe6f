"""Images/s of diffbatch's execution paths on this CPU, side by side in one run (issue 12): torch float32,
torch bfloat16 (where native), OpenVINO float32, OpenVINO bfloat16 (where native), and optionally torch.compile
of the denoiser; the engine's mixed workload (steps, guidance, img2img strength vary) on one model.

    python benchmarks/backends.py --model shapes --images 32 --steps-scale 0.5
    python benchmarks/backends.py --model sd15 --images 8 --steps-scale 0.25
    python benchmarks/backends.py --model shapes --compile

Configurations run one after another (SD-1.5 weights are 4 GB per copy, too many to hold together), each
warmed up first (an OpenVINO conversion, or a compilation, happens there and is reported separately), then
timed ``--repeats`` times; torch float32 runs first and last, so drift shows. Pixels are compared with torch
float32 (max abs difference on [0, 1] pixels).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from throughput import save_sd15_random, workloads  # noqa: E402

from diffbatch import Engine, GenerationSpec  # noqa: E402
from diffbatch.hardware import cpu_features, cpu_name, native_bfloat16  # noqa: E402


def configurations(compile_: bool) -> list[tuple[str, dict]]:
    found = [("torch float32", dict(dtype="float32")), ("openvino float32", dict(dtype="float32", backend="openvino"))]
    if native_bfloat16():
        found += [("torch bfloat16", dict(dtype="bfloat16")),
                  ("openvino bfloat16", dict(dtype="bfloat16", backend="openvino"))]
    if compile_:
        found.append(("torch float32 + compile", dict(dtype="float32", compile=True)))
    found.append(("torch float32 (again)", dict(dtype="float32")))
    return found


def build(model: str | None, batch: int, settings: dict) -> Engine:
    settings = dict(settings)
    compile_ = settings.pop("compile", False)
    engine = Engine.from_pretrained(model, device="cpu", max_batch_size=batch, **settings,
                                    batch_invariant=not compile_)  # compile: stock kernels, nothing patched
    if compile_:
        engine.adapter.denoiser = torch.compile(engine.adapter.denoiser)
    return engine


def measure(model: str | None, specs: list[GenerationSpec], warm: list[GenerationSpec], batch: int, repeats: int,
            settings: dict) -> tuple[dict, np.ndarray]:
    began = time.perf_counter()
    engine = build(model, batch, settings)
    engine.generate(warm)
    ready = time.perf_counter() - began
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        made = engine.generate(specs)
        times.append(time.perf_counter() - began)
    pixels = np.stack([r.pixels for r in made])
    del engine, made
    gc.collect()
    best = min(times)
    return {"load_and_warm_s": round(ready, 1), "seconds": round(best, 2), "all_seconds": [round(t, 2) for t in times],
            "images_per_s": round(len(specs) / best, 3)}, pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("shapes", "sd15"), default="shapes")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps-scale", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the denoiser (inductor)")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["DIFFBATCH_CACHE"] = str(Path(scratch) / "cache")  # cold: the conversion shows in load+warm
        model = None if args.model == "shapes" else str(save_sd15_random(Path(scratch) / "sd15"))
        size = 64 if args.model == "shapes" else 256
        specs = workloads(args.images, size, args.steps_scale)["mixed"]
        warm = specs[:4]
        results, reference = {}, None
        for name, settings in configurations(args.compile):
            print(f"{name} ...", file=sys.stderr, flush=True)
            results[name], pixels = measure(model, specs, warm, args.batch_size, args.repeats, settings)
            if reference is None:
                reference = pixels
            results[name]["max_abs_diff_vs_torch_float32"] = float(np.abs(pixels - reference).max())
    base = max(results["torch float32"]["images_per_s"], results["torch float32 (again)"]["images_per_s"])
    for res in results.values():
        res["ratio_vs_torch_float32"] = round(res["images_per_s"] / base, 3)
    record = {"model": args.model, "images": args.images, "steps_scale": args.steps_scale,
              "batch_size": args.batch_size, "repeats": args.repeats, "cpu": f"{cpu_name()}; {cpu_features()}",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "results": results}
    (ROOT / "benchmarks" / "results" / f"backends-{args.model}.json").write_text(json.dumps(record, indent=2) + "\n")
    if not args.no_markdown:
        write_markdown(record)
    print(json.dumps(record, indent=2))


def write_markdown(record: dict) -> None:
    from results_md import replace_section, table

    rows = [[name, f"{r['seconds']:.2f}", f"{r['images_per_s']:.3f}", f"**{r['ratio_vs_torch_float32']:.2f}x**",
             f"{r['max_abs_diff_vs_torch_float32']:.1e}", f"{r['load_and_warm_s']:.0f}"]
            for name, r in record["results"].items()]
    body = (f"`python benchmarks/backends.py --model {record['model']} --images {record['images']} "
            f"--steps-scale {record['steps_scale']} --repeats {record['repeats']}` on {record['cpu']}, torch "
            f"{record['torch']}, {record['threads']} thread(s) (the default), max batch {record['batch_size']} images, "
            "mixed workload, best of the repeats. Ratio: against the faster of the two torch float32 runs. "
            "Difference: max abs on [0, 1] pixels against torch float32. Load and warm-up: model load plus a "
            "4-image warm-up run (an OpenVINO conversion on a cold cache, or a compilation, happens there).\n\n"
            + table(["configuration", "seconds", "images/s", "vs torch float32", "max diff", "load+warm s"], rows))
    replace_section(f"Backends and dtypes: {record['model']} model (issue 12)", body)


if __name__ == "__main__":
    main()
