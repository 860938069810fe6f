"""A parameter sweep as one diffbatch job vs the AUTOMATIC1111 way (issue 23), side by side in one process.

The job: a guidance x steps x sampler sweep (3 x 3 x 3 cells) of 4 prompts on the embedded model, 108 images,
planned by diffbatch's own sweep planner (io/sweep.py: every cell of a prompt shares its seed).

- diffbatch: all 108 requests in one engine (``Engine.generate``): each step's denoiser calls mix cells of
  every guidance, step count and sampler;
- the A1111 way (its X/Y/Z plot script): one diffusers call per cell, a list batch of the cell's 4 prompts
  with their seeds, the pipeline's scheduler swapped to the cell's sampler (as the script runs each cell as a
  batch of identical parameters).

    python benchmarks/sweep.py [--repeats 2] [--prompts 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import diffusers
import torch
from diffusers import StableDiffusionPipeline

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_md import interleaved_best, rates  # noqa: E402
from throughput import cpu_model  # noqa: E402

from diffbatch import Engine  # noqa: E402
from diffbatch.adapters.loading import default_model  # noqa: E402
from diffbatch.io.prompts import JobSource, read_job  # noqa: E402
from diffbatch.io.sweep import parse_sweep  # noqa: E402
from diffbatch.samplers import SAMPLERS  # noqa: E402

AXES = ["guidance=1,4,7.5", "steps=10,20,30", "sampler=euler_a,ddim,dpm++_2m"]
PROMPTS = ["a red circle on the left", "a blue square on a white background", "a green triangle at the top",
           "a yellow star on the right"]


def a1111_way(pipe: StableDiffusionPipeline, specs: list, size: int) -> None:
    """One list batch per cell: the cell's prompts with their seeds, the cell's sampler set on the pipeline."""
    cells: dict[tuple, list] = {}
    for spec in specs:
        cells.setdefault((spec.guidance_scale, spec.num_inference_steps, spec.scheduler), []).append(spec)
    base = dict(pipe.scheduler.config)
    for (guidance, steps, sampler), group in cells.items():
        found = SAMPLERS[sampler]
        pipe.scheduler = getattr(diffusers, found.class_name).from_config(base, **found.options)
        pipe([s.prompt for s in group], num_inference_steps=steps, guidance_scale=guidance, height=size,
             width=size, output_type="np", generator=[torch.Generator("cpu").manual_seed(s.seed) for s in group])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    model = Path(default_model())
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32", max_batch_size="auto")  # the CLI's default
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    items = read_job(JobSource(prompts=tuple(PROMPTS[: args.prompts]), sweep=parse_sweep(AXES)))
    specs = [engine.resolve(item.spec) for item in items]
    size = engine.defaults.height
    engine.generate(specs[:4])  # warm-up: first calls allocate
    strategies = {"a1111_way_list_batch_per_cell": lambda: a1111_way(pipe, specs, size),
                  "diffbatch_one_job": lambda: engine.generate(specs, resolved=True)}
    best = interleaved_best(strategies, args.repeats)
    n = len(specs)
    record = {"images": n, "axes": AXES, "prompts": args.prompts, "repeats": args.repeats, "cpu": cpu_model(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": "auto",
              "results": rates(best, n),
              "ratio": round(best["a1111_way_list_batch_per_cell"] / best["diffbatch_one_job"], 3)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(record, indent=2))
    write_markdown(record)
    print(json.dumps(record, indent=2))


def write_markdown(record: dict) -> None:
    from results_md import replace_section, table

    rows = [[k, f"{v['seconds']:.2f}", f"{v['images_per_s']:.3f}"] for k, v in record["results"].items()]
    rows.append(["**diffbatch / the A1111 way**", "", f"**{record['ratio']:.2f}x**"])
    body = (f"`python benchmarks/sweep.py --repeats {record['repeats']} --prompts {record['prompts']}` on "
            f"{record['cpu']}, torch {record['torch']}, {record['threads']} thread(s) (the default), float32, "
            f"best of {record['repeats']}, interleaved. Embedded model, {record['images']} images: "
            f"{record['prompts']} prompts x the sweep {' x '.join(record['axes'])} (every cell of a prompt on its "
            "seed). The A1111 way: one diffusers list batch per cell (the cell's prompts), the cell's sampler set "
            "on the pipeline, as the X/Y/Z plot script runs a grid; diffbatch: one job, one engine "
            f"(max batch: {record['batch_size']}).\n\n" + table(["strategy", "seconds", "images/s"], rows))
    replace_section("Sweeps: one job vs one batch per cell (issue 23)", body)


if __name__ == "__main__":
    main()
