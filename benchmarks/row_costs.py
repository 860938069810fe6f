"""The engine's own cost per row-step (issue 22): what the runner spends around the denoiser, per image and step,
measured here, and how many aten ops (a GPU's kernel launches) each part issues.

    python benchmarks/row_costs.py                   # the embedded model, 16 guided images x 20 steps

Parts, per request and step: the sampler's ``step`` (its own scheduler), ``scale_model_input``, the CFG
combination, and the batch assembly in ``Runner._call`` (inputs, padding, conditioning; the model call itself
timed apart). Each part's aten ops are counted with the PyTorch profiler on one step of one request: on a GPU each
is a kernel launch (~5-10 us of CPU each, whatever the tensor size), so the count is what the per-row cost
becomes there. Writes ``benchmarks/results/row_costs.json`` and a RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from diffbatch import Engine, GenerationSpec  # noqa: E402
from diffbatch import runner as runner_module  # noqa: E402
from diffbatch.hardware import cpu_features, cpu_name  # noqa: E402
from diffbatch.runner import _step_params  # noqa: E402 - the runner's own reading of step()'s parameters

SAMPLERS = ("ddim", "euler_a", "dpm++_2m")


def timed_parts(engine: Engine, specs: list[GenerationSpec]) -> dict[str, float]:
    """Seconds spent in each part over one ``generate`` of ``specs``."""
    spent: dict[str, float] = defaultdict(float)
    runner, adapter = engine.runner, engine.adapter
    originals = {"step": runner._step, "call": runner._call, "denoise": adapter.denoise}
    guide, scale = runner_module._guide, runner_module._scale_model_input

    def wrap(name, fn):
        def run(*args, **kwargs):
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - began
        return run

    runner._step, runner._call = wrap("sampler step", originals["step"]), wrap("call", originals["call"])
    adapter.denoise = wrap("denoiser", originals["denoise"])
    runner_module._guide, runner_module._scale_model_input = wrap("cfg", guide), wrap("scale input", scale)
    try:
        began = time.perf_counter()
        engine.generate(specs)
        spent["total"] = time.perf_counter() - began
    finally:
        runner._step, runner._call, adapter.denoise = originals["step"], originals["call"], originals["denoise"]
        runner_module._guide, runner_module._scale_model_input = guide, scale
    spent["assembly"] = spent.pop("call") - spent["denoiser"] - spent["scale input"]
    return dict(spent)


def aten_ops(sampler_name: str, engine: Engine) -> int:
    """aten ops of one sampler step of one request (a GPU's kernel launches for it)."""
    sampler = engine.resolver.make_sampler(sampler_name)
    sampler.set_timesteps(20)
    latents, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    generator = torch.Generator().manual_seed(0)
    t = sampler.timesteps[5]
    if hasattr(sampler, "_step_index"):
        sampler._step_index = 5  # mid-schedule, as the runner's requests are
    kwargs = {"generator": generator} if "generator" in _step_params(type(sampler)) else {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        sampler.step(eps, t, latents, **kwargs, return_dict=False)
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()
    engine = Engine.from_pretrained(None, device="cpu", max_batch_size=args.batch_size)
    rows = []
    for name in SAMPLERS:
        specs = [GenerationSpec(prompt=f"a red circle {k}", seed=k, num_inference_steps=args.steps, scheduler=name,
                                guidance_scale=5.0) for k in range(args.images)]
        engine.generate(specs[:2])  # warm-up
        parts = timed_parts(engine, specs)
        row_steps = args.images * args.steps
        per = {k: round(1e6 * v / row_steps, 1) for k, v in parts.items()}
        rows.append({"sampler": name, "us_per_image_step": per, "aten_ops_per_sampler_step": aten_ops(name, engine)})
        print(rows[-1], file=sys.stderr, flush=True)
    record = {"cpu": f"{cpu_name()}; {cpu_features()}", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "images": args.images, "steps": args.steps, "batch_size": args.batch_size, "rows": rows}
    (ROOT / "benchmarks" / "results" / "row_costs.json").write_text(json.dumps(record, indent=2) + "\n")
    if not args.no_markdown:
        write_markdown(record)
    print(json.dumps(record, indent=2))


def write_markdown(record: dict) -> None:
    from results_md import replace_section, table

    parts = ("sampler step", "scale input", "cfg", "assembly", "denoiser", "total")
    body = (f"`python benchmarks/row_costs.py` on {record['cpu']}, torch {record['torch']}, {record['threads']} "
            f"thread(s) (the default), embedded model, {record['images']} guided images x {record['steps']} steps, "
            f"max batch {record['batch_size']}: microseconds per image-step in each part of the runner (the "
            "denoiser and total included for scale), and the aten ops of one sampler step of one request.\n\n"
            + table(["sampler", *parts, "aten ops / sampler step"],
                    [[r["sampler"], *(r["us_per_image_step"].get(p, "-") for p in parts),
                      r["aten_ops_per_sampler_step"]] for r in record["rows"]]))
    replace_section("Engine cost per row: the parts (issue 22)", body)


if __name__ == "__main__":
    main()
