"""``throughput.py --workloads loras`` (issue 14): 5 LoRAs over N images, side by side in one process.

- diffbatch: every image with its own LoRA set, all in one engine (mixed batches, one denoiser call per step);
- diffusers: grouped by LoRA set, each group a list batch after ``set_adapters`` (the best a diffusers user
  can do: ``set_adapters`` is pipeline-wide), chunked at the same batch size;
- diffbatch without LoRAs: the same images plain, for the cost of LoRA rows over plain rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from diffbatch import Engine, GenerationSpec

LORAS = 5
SETS = [{"l0": 1.0}, {"l1": 0.8}, {"l2": 0.6, "l3": 0.4}, {"l3": 1.0}, {"l4": 0.7}, {"l0": 0.5, "l4": 0.5}]


def make_loras(model: Path, folder: Path) -> Path:
    from tiny_lora import save_random_lora  # tests/, on sys.path via throughput.py

    for k in range(LORAS):
        save_random_lora(StableDiffusionPipeline, model, folder / f"l{k}.safetensors", seed=k)
    return folder


def specs(n: int, steps: int) -> list[GenerationSpec]:
    sets = itertools.cycle(SETS)
    return [GenerationSpec(prompt=f"prompt {k}", seed=k, num_inference_steps=steps, guidance_scale=7.5,
                           loras=next(sets)) for k in range(n)]


def diffusers_grouped(pipe, jobs: list[GenerationSpec], batch: int, size: int) -> None:
    groups: dict[tuple, list[GenerationSpec]] = {}
    for spec in jobs:
        groups.setdefault(spec.loras, []).append(spec)
    for loras, group in groups.items():
        pipe.set_adapters([n for n, _ in loras], [w for _, w in loras])
        for i in range(0, len(group), batch):
            chunk = group[i : i + batch]
            pipe([s.prompt for s in chunk], num_inference_steps=chunk[0].num_inference_steps, height=size,
                 width=size, guidance_scale=chunk[0].guidance_scale, output_type="np",
                 generator=[torch.Generator("cpu").manual_seed(s.seed) for s in chunk])


def run(model: Path, loras: Path, n: int, batch: int, steps: int, repeats: int) -> dict:
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32", max_batch_size=batch, lora_dir=loras)
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for k in range(LORAS):
        pipe.load_lora_weights(str(loras / f"l{k}.safetensors"), adapter_name=f"l{k}")
    size = engine.defaults.height
    jobs = [engine.resolve(s) for s in specs(n, steps)]
    plain = [dataclasses.replace(s, loras=()) for s in jobs]
    engine.generate(jobs[: len(SETS)])  # loads every LoRA once (diffusers' pipe has them loaded already)
    strategies = {"diffusers_grouped_by_lora_set": lambda: diffusers_grouped(pipe, jobs, batch, size),
                  "diffbatch_mixed": lambda: engine.generate(jobs, resolved=True),
                  "diffbatch_without_loras": lambda: engine.generate(plain, resolved=True)}
    times = {k: [] for k in strategies}
    for _ in range(repeats):  # interleaved
        for key, fn in strategies.items():
            began = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - began)
    best = {k: min(v) for k, v in times.items()}
    found = {k: {"seconds": round(t, 2), "images_per_s": round(n / t, 3)} for k, t in best.items()}
    found["ratio_vs_diffusers_grouped"] = round(best["diffusers_grouped_by_lora_set"] / best["diffbatch_mixed"], 3)
    found["lora_cost_vs_plain"] = round(best["diffbatch_mixed"] / best["diffbatch_without_loras"], 3)
    return found
