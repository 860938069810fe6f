"""Images/s of diffbatch vs diffusers, side by side in one process on one machine.

Strategies: (a) diffusers called once per image; (b) diffusers with list batches of identical parameters (the
best a diffusers user can do, chunked at the same max batch size); (c) diffbatch's step-level engine.
Workloads: uniform (every image the same parameters), mixed (steps, guidance, img2img strength vary) and img2img
(every image img2img at one strength).
Models: a tiny random SD pipeline, and the SD-1.5 UNet/VAE/CLIP architecture with random weights (no download).

    python benchmarks/throughput.py --model tiny --images 48
    python benchmarks/throughput.py --model sd15 --images 12 --steps-scale 0.5
    python benchmarks/throughput.py --model sd15 --invariance   # the cost of batch invariance (issue 10)

``--invariance`` compares diffbatch's default (invariant kernels, any batch size) with the same engine without
them (``batch_invariant=False``: dynamic shapes, stock kernels) and with fixed-shape execution instead (stock
kernels, every denoiser call padded to ``FIXED_ROWS`` rows, as on CUDA), at the machine's default threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from diffbatch import Engine, GenerationSpec  # noqa: E402
from diffbatch.adapters.invariance import CallShape  # noqa: E402
from tiny import save_tiny_sd, write_byte_level_clip_tokenizer  # noqa: E402


def save_sd15_random(folder: Path) -> Path:
    """The SD-1.5 architecture (UNet 320-640-1280-1280, VAE 128-256-512-512, CLIP ViT-L text encoder)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, cross_attention_dim=768)  # defaults are SD-1.5's blocks
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    tokenizer = write_byte_level_clip_tokenizer(folder.with_name(folder.name + "-tok"), max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513,
                                        hidden_size=768, intermediate_size=3072, num_attention_heads=12))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def workloads(n: int, size: int, steps_scale: float) -> dict[str, list[GenerationSpec]]:
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    steps = [max(1, round(s * steps_scale)) for s in (10, 20, 30)]
    uniform = [GenerationSpec(prompt=f"prompt {k}", seed=k, num_inference_steps=steps[1], guidance_scale=7.5)
               for k in range(n)]
    combos = list(itertools.product(steps, (1.0, 5.0, 7.5), (None, 0.3, None, 0.6, None, 0.9)))
    combos = itertools.cycle([combos[i] for i in rng.permutation(len(combos))])  # any n sees every kind
    mixed = [GenerationSpec(prompt=f"prompt {k}", seed=k, num_inference_steps=at_least_one_step(st, s),
                            guidance_scale=g, image=init if s else None, strength=s)
             for k, (st, g, s) in zip(range(n), combos, strict=False)]
    rng.shuffle(mixed)  # arrival order should not favour any strategy
    img2img = [GenerationSpec(prompt=f"prompt {k}", seed=k, num_inference_steps=steps[1], guidance_scale=7.5,
                              image=init, strength=0.6) for k in range(n)]
    return {"uniform": uniform, "mixed": mixed, "img2img": img2img}


def at_least_one_step(steps: int, strength: float | None) -> int:
    """With scaled-down step counts, img2img needs steps * strength >= 1 (as diffusers requires)."""
    return steps if strength is None else max(steps, math.ceil(1 / strength))


def diffusers_call(pipes: dict, specs: list[GenerationSpec]) -> None:
    spec = specs[0]
    kwargs = dict(prompt=[s.prompt for s in specs], num_inference_steps=spec.num_inference_steps,
                  guidance_scale=spec.guidance_scale, output_type="np",
                  generator=[torch.Generator("cpu").manual_seed(s.seed) for s in specs])
    if spec.image is None:
        pipes["txt2img"](height=spec.height, width=spec.width, **kwargs)
    else:
        pipes["img2img"](image=[s.image for s in specs], strength=spec.strength, **kwargs)


def per_image(pipes: dict, specs: list[GenerationSpec], batch: int) -> None:
    for spec in specs:
        diffusers_call(pipes, [spec])


def list_batches(pipes: dict, specs: list[GenerationSpec], batch: int) -> None:
    groups: dict[tuple, list[GenerationSpec]] = {}
    for s in specs:
        groups.setdefault((s.num_inference_steps, s.guidance_scale, s.strength, s.height, s.width), []).append(s)
    for group in groups.values():
        for i in range(0, len(group), batch):
            diffusers_call(pipes, group[i : i + batch])


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


DEFAULT_WORKLOADS = ("uniform", "mixed", "img2img")
FIXED_ROWS = 16  # the fixed-shape alternative: rows per denoiser call (8 images with CFG), as on CUDA


def engines(model: Path, batch: int, invariance: bool) -> dict[str, Engine]:
    """diffbatch as shipped; with ``invariance``, also without invariance (stock kernels, which the
    fixed-shape strategy shares: SD-1.5 weights are 4 GB per copy)."""
    found = {"diffbatch": Engine.from_pretrained(model, device="cpu", dtype="float32", max_batch_size=batch)}
    if invariance:
        found["diffbatch_not_invariant"] = Engine.from_pretrained(model, device="cpu", dtype="float32",
                                                                  max_batch_size=batch, batch_invariant=False)
    return found


def generate(engine: Engine, specs: list[GenerationSpec], fixed_rows: int | None = None) -> None:
    """``engine.generate``; with ``fixed_rows``, every denoiser call padded to that many rows (stock kernels)."""
    adapter = engine.adapter
    shapes = adapter.call_shapes
    if fixed_rows:
        adapter.call_shapes = dataclasses.replace(shapes, denoiser=CallShape(1, fixed_rows))
    try:
        engine.generate(specs)
    finally:
        adapter.call_shapes = shapes


def diffusers_pipes(model: Path, ours: dict[str, Engine]) -> dict:
    plain = ours.get("diffbatch_not_invariant")
    if plain is not None:  # diffusers runs on the stock modules of the non-invariant engine (no third copy)
        txt = StableDiffusionPipeline(**plain.adapter.pipe.components, requires_safety_checker=False)
    else:
        txt = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    txt.set_progress_bar_config(disable=True)
    pipes = {"txt2img": txt, "img2img": StableDiffusionImg2ImgPipeline(**txt.components)}
    pipes["img2img"].set_progress_bar_config(disable=True)
    return pipes


def strategies_for(pipes: dict, ours: dict[str, Engine], specs: list[GenerationSpec], batch: int
                   ) -> dict[str, Callable[[], object]]:
    found: dict[str, Callable[[], object]] = {
        "diffusers_per_image": lambda: per_image(pipes, specs, batch),
        "diffusers_list_batches": lambda: list_batches(pipes, specs, batch),
        **{key: lambda e=e: generate(e, specs) for key, e in ours.items()},
    }
    plain = ours.get("diffbatch_not_invariant")
    if plain is not None:  # the question is diffbatch against itself; per-image diffusers adds nothing
        found["diffbatch_fixed_shape"] = lambda: generate(plain, specs, FIXED_ROWS)
        del found["diffusers_per_image"]
    return found


def run(model: Path, n: int, batch: int, steps_scale: float, repeats: int, only: list[str],
        invariance: bool = False, per_image: bool = True) -> dict:
    ours = engines(model, batch, invariance)
    engine = ours["diffbatch"]
    pipes = diffusers_pipes(model, ours)
    size = engine.defaults.height
    results = {}
    for name, specs in workloads(n, size, steps_scale).items():
        if name not in only:
            continue
        specs = [engine.resolve(s) for s in specs]
        strategies = strategies_for(pipes, ours, specs, batch)
        if not per_image:
            strategies.pop("diffusers_per_image", None)
        times = {k: [] for k in strategies}
        for _ in range(repeats):  # interleaved, so machine noise hits every strategy alike
            for key, fn in strategies.items():
                times[key].append(timed(fn))
                print(f"  {name:8s} {key:24s} {times[key][-1]:8.2f} s", file=sys.stderr, flush=True)
        best = {k: min(v) for k, v in times.items()}
        results[name] = {k: {"seconds": t, "images_per_s": n / t} for k, t in best.items()}
        results[name]["ratio_vs_list_batches"] = best["diffusers_list_batches"] / best["diffbatch"]
        if "diffusers_per_image" in best:
            results[name]["ratio_vs_per_image"] = best["diffusers_per_image"] / best["diffbatch"]
        for other in ("diffbatch_not_invariant", "diffbatch_fixed_shape"):
            if other in best:  # > 1: the invariant default is faster than that alternative
                results[name][f"ratio_vs_{other}"] = best[other] / best["diffbatch"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "shapes", "sd15"), default="tiny",
                        help="tiny random SD, the embedded shapes model, or the SD-1.5 architecture (random weights)")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale the 10/20/30 step counts")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workloads", nargs="+", choices=(*DEFAULT_WORKLOADS, "loras"),
                        default=list(DEFAULT_WORKLOADS),
                        help="loras: 5 LoRAs over the images, diffbatch mixed vs diffusers grouped (alone)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-per-image", action="store_true",
                        help="skip diffusers one call per image (the slowest strategy; for the SD-1.5 architecture)")
    parser.add_argument("--invariance", action="store_true",
                        help="compare invariant kernels with no invariance and with fixed shapes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "loras" in args.workloads:
        return run_loras(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.model
        model = model_folder(args.model, folder)
        results = run(model, args.images, args.batch_size, args.steps_scale, args.repeats, args.workloads,
                      args.invariance, not args.no_per_image)
    record = {"model": args.model, "workloads": args.workloads, "images": args.images, "batch_size": args.batch_size,
              "steps_scale": args.steps_scale, "repeats": args.repeats, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu": cpu_model(), "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("" if len(args.workloads) > 1 else "-" + args.workloads[0]) + ("-invariance" if args.invariance else "")
    path = args.out / f"throughput-{args.model}{suffix}.json"
    path.write_text(json.dumps(record, indent=2))
    if args.invariance:
        write_invariance_markdown(record)
    else:
        write_markdown(record)
    print(json.dumps(record, indent=2))


def model_folder(name: str, folder: Path) -> Path:
    """The benchmark's model: written into ``folder`` (tiny, sd15), or the embedded model's own folder."""
    if name == "shapes":
        from diffbatch.adapters.loading import default_model

        return Path(default_model())
    return save_tiny_sd(folder) if name == "tiny" else save_sd15_random(folder)


def run_loras(args: argparse.Namespace) -> None:
    import lora_workload

    steps = max(1, round(20 * args.steps_scale))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.model
        model = model_folder(args.model, folder)
        loras = lora_workload.make_loras(model, Path(tmp) / "loras")
        results = lora_workload.run(model, loras, args.images, args.batch_size, steps, args.repeats)
    record = {"model": args.model, "workload": "loras", "images": args.images, "batch_size": args.batch_size,
              "steps": steps, "repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": cpu_model(), "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"throughput-{args.model}-loras.json").write_text(json.dumps(record, indent=2))
    write_lora_markdown(record)
    print(json.dumps(record, indent=2))


def write_lora_markdown(record: dict) -> None:
    from results_md import replace_section, table

    res = record["results"]
    rows = [[key, f"{res[key]['seconds']:.2f}", f"{res[key]['images_per_s']:.3f}"]
            for key in ("diffusers_grouped_by_lora_set", "diffbatch_mixed", "diffbatch_without_loras")]
    rows += [["**diffbatch mixed / diffusers grouped**", "", f"**{res['ratio_vs_diffusers_grouped']:.2f}x**"],
             ["LoRA rows' cost (mixed time / plain time)", "", f"{res['lora_cost_vs_plain']:.2f}x"]]
    body = (f"`python benchmarks/throughput.py --model {record['model']} --workloads loras --images "
            f"{record['images']} --steps-scale ...` ({record['steps']} steps) on {record['cpu']}, torch "
            f"{record['torch']}, {record['threads']} thread(s), max batch {record['batch_size']} images, float32, "
            f"best of {record['repeats']}, interleaved. 5 random LoRAs (rank 4, attention projections) in 6 sets "
            "(one LoRA at various weights, or two) cycled over the images; diffusers runs each set as list batches "
            "after set_adapters (pipeline-wide), diffbatch runs them all mixed.\n\n"
            + table(["strategy", "seconds", "images/s"], rows))
    replace_section(f"LoRAs per request: {record['model']} model (issue 14)", body)


def cpu_model() -> str:
    """``lscpu``'s model name and whether the CPU has AVX-512, native bfloat16 and AMX (they decide kernels)."""
    flags, name = set(), "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    has = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(has) or 'no AVX2'})"


def write_invariance_markdown(record: dict) -> None:
    from results_md import replace_section, table

    keys = ("diffusers_list_batches", "diffbatch", "diffbatch_not_invariant", "diffbatch_fixed_shape")
    rows = []
    for workload, res in record["results"].items():
        rows += [[workload, key, f"{res[key]['seconds']:.2f}", f"{res[key]['images_per_s']:.3f}"] for key in keys]
        rows.append([workload, "**invariant kernels / not invariant**", "",
                     f"**{res['ratio_vs_diffbatch_not_invariant']:.3f}x**"])
        rows.append([workload, "invariant kernels / fixed shapes", "", f"{res['ratio_vs_diffbatch_fixed_shape']:.3f}x"])
    body = (f"`python benchmarks/throughput.py --model {record['model']} --images {record['images']} "
            f"--steps-scale {record['steps_scale']} --repeats {record['repeats']} --invariance` on {record['cpu']}, "
            f"torch {record['torch']}, {record['threads']} thread(s) (the default), max batch {record['batch_size']} "
            f"images, float32, best of {record['repeats']}, interleaved. `diffbatch`: the default (invariant "
            "kernels); `not_invariant`: stock kernels, any batch size; `fixed_shape`: stock kernels, every denoiser "
            f"call padded to {FIXED_ROWS} rows (the CUDA design). A ratio below 1 is what invariance costs.\n\n"
            + table(["workload", "strategy", "seconds", "images/s"], rows))
    replace_section(f"Batch invariance: its cost, {record['model']} model (issue 10)", body)


def write_markdown(record: dict) -> None:
    from results_md import replace_section, table

    rows = []
    for workload, res in record["results"].items():
        for key in (k for k in ("diffusers_per_image", "diffusers_list_batches", "diffbatch") if k in res):
            rows.append([workload, key, f"{res[key]['seconds']:.2f}", f"{res[key]['images_per_s']:.3f}"])
        rows.append([workload, "**diffbatch / list batches**", "", f"**{res['ratio_vs_list_batches']:.2f}x**"])
        if "ratio_vs_per_image" in res:
            rows.append([workload, "diffbatch / per image", "", f"{res['ratio_vs_per_image']:.2f}x"])
    steps = [max(1, round(s * record["steps_scale"])) for s in (10, 20, 30)]
    body = (f"`python benchmarks/throughput.py --model {record['model']} --images {record['images']} "
            f"--steps-scale {record['steps_scale']} --repeats {record['repeats']}` "
            f"on {record['cpu']} (torch {record['torch']}, {record['threads']} thread(s), "
            f"max batch {record['batch_size']} images, "
            f"float32, best of {record['repeats']}). Mixed workload: steps in {steps}, guidance in {{1, 5, 7.5}}, "
            "half the images img2img with strength in {0.3, 0.6, 0.9}; uniform: every image the same parameters; "
            f"img2img: every image img2img at strength 0.6, {steps[1]} steps.\n\n"
            + table(["workload", "strategy", "seconds", "images/s"], rows))
    which = "" if len(record.get("workloads", [])) > 1 else f", {record['workloads'][0]} workload"
    replace_section(f"Throughput: {record['model']} model{which} (issue 2)", body)


if __name__ == "__main__":
    main()
