"""What exactness costs on the bfloat16 path of a CPU (issue 33), side by side in one process, SD-1.5 architecture
(random weights): bfloat16 as diffbatch runs it on this CPU (AMX: every stage at a fixed row count and the load-time
thread count; AVX512_BF16 alone: the invariant kernels, adapters/invariance.py), the AMX design forced on this CPU
(what it would cost here), stock bfloat16 (invariance off: calls as large as the batch), and float32 as shipped.

    python benchmarks/bf16_exactness.py --steps 5 --size 256

Writes results/bf16_exactness.json and its section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_md import replace_section, table  # noqa: E402
from throughput import cpu_model, save_sd15_random, timed  # noqa: E402

from diffbatch import Engine, GenerationSpec  # noqa: E402
from diffbatch.adapters.invariance import cpu_bf16_shapes  # noqa: E402
from diffbatch.hardware import native_bfloat16  # noqa: E402

ENGINES = {"bfloat16 as shipped": ("bfloat16", True), "bfloat16 stock": ("bfloat16", False),
           "float32 as shipped": ("float32", True)}
FIXED = "bfloat16 fixed shapes (AMX design)"  # the shipped bfloat16 engine with cpu_bf16_shapes forced
PATHS = (*ENGINES, FIXED)
WORKLOADS = {"1 guided image": (1, 7.5), "1 unguided image": (1, 1.0), "4 guided images": (4, 7.5),
             "8 guided images": (8, 7.5)}


def specs(images: int, guidance: float, steps: int, size: int) -> list[GenerationSpec]:
    return [GenerationSpec(prompt=f"a photo of object {k}", seed=k, num_inference_steps=steps,
                           guidance_scale=guidance, height=size, width=size) for k in range(images)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args()
    if not native_bfloat16():
        sys.exit("bf16_exactness: this CPU has no AVX512_BF16 or AMX (bfloat16 would be emulated)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = save_sd15_random(Path(tmp) / "sd15")
        engines = {name: Engine.from_pretrained(str(model), device="cpu", dtype=dtype, max_batch_size=8,
                                                batch_invariant=exact) for name, (dtype, exact) in ENGINES.items()}
        for workload in args.workloads:
            batch = specs(*WORKLOADS[workload], args.steps, args.size)
            seconds = {}
            for name in PATHS:
                engine = engines["bfloat16 as shipped" if name == FIXED else name]
                shipped = engine.adapter.call_shapes
                if name == FIXED:
                    engine.adapter.call_shapes = cpu_bf16_shapes(torch.get_num_threads())
                engine.generate(batch[:1])  # warm: the first call of a shape builds its kernels
                seconds[name] = timed(lambda e=engine, b=batch: e.generate(b))
                engine.adapter.call_shapes = shipped
            rows.append({"workload": workload, "images": len(batch), **{k: round(v, 2) for k, v in seconds.items()}})
            print(rows[-1], flush=True)
    record = {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "steps": args.steps, "size": args.size, "rows": rows}
    (ROOT / "benchmarks" / "results" / "bf16_exactness.json").write_text(json.dumps(record, indent=2) + "\n")
    write_markdown(record)


def write_markdown(record: dict) -> None:
    body = (f"`python benchmarks/bf16_exactness.py --steps {record['steps']} --size {record['size']}` on "
            f"{record['cpu']}, torch {record['torch']}, {record['threads']} threads, SD-1.5 architecture (random "
            "weights), max batch 8 images, seconds for the whole workload (prompt encoding, every step, decoding). "
            "*as shipped*: what diffbatch runs on this CPU (exact); *fixed shapes (AMX design)*: every stage at a "
            "fixed row count (8 denoiser rows, 4 prompts, 1 VAE image a call) at the load-time thread count, what "
            "an AMX CPU runs, forced here; *stock*: invariance off (not exact where kernels move rows).\n\n")
    header = ["workload", *PATHS, "time: fixed shapes / stock", "speed: shipped bfloat16 / float32",
              "speed: fixed-shape bfloat16 / float32"]
    lines = [[r["workload"], *(r[name] for name in PATHS), f"{r[FIXED] / r['bfloat16 stock']:.2f}x",
              f"{r['float32 as shipped'] / r['bfloat16 as shipped']:.2f}x",
              f"{r['float32 as shipped'] / r[FIXED]:.2f}x"] for r in record["rows"]]
    rows = {r["workload"]: r for r in record["rows"]}
    lone, full = rows.get("1 guided image"), rows.get("8 guided images")
    summary = ""
    if lone and full:
        shipped = "bfloat16 as shipped"
        summary = (f"\n\nThe fixed shapes cost a lone guided image {lone[FIXED] / lone[shipped]:.2f}x the "
                   f"time of this CPU's exact path, and 8 guided images {full[FIXED] / full[shipped]:.2f}x "
                   "(full calls: no padding). No AMX CPU was at hand: there the lone image's padding should cost less "
                   "(batching gains ~2x from 2 to 8 rows with AMX, 355 -> 710 GFLOP/s, against ~1.25x here), which "
                   "is unmeasured.")
    replace_section("bfloat16 on a CPU: the cost of exactness (issue 33)", body + table(header, lines) + summary)


if __name__ == "__main__":
    main()
