"""Step caching per request (issue 21), side by side in one run on one model: images/s of ``cache: off`` against
DeepCache every 2/3/5 steps, ``auto``, and a mixed batch (half the requests cached, steps and guidance varying),
and the mean PSNR of each cached image against the same request uncached (same seed, prompt, everything).
Also the cost of the shallow path against a full UNet forward (the cut, adapters/step_cache.py).

    python benchmarks/cache.py                      # the embedded model, 64x64, 30 steps, 16 images a setting

One engine serves every setting (``cache`` is a per-request field); each setting runs after a warm-up, best of
``--repeats``; ``off`` runs first and last, so drift shows. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from resume_check import best_of  # noqa: E402 - the benchmarks' one best-of-N timer

from diffbatch import Engine, GenerationSpec  # noqa: E402
from diffbatch.adapters.step_cache import capture, shallow_forward  # noqa: E402
from diffbatch.hardware import cpu_features, cpu_name  # noqa: E402
from diffbatch.samplers import SAMPLERS  # noqa: E402

PROMPTS = ("a red circle", "a blue star on a white background", "a small green square at the top", "a pink triangle",
           "a yellow circle on a black background", "a purple square")
SETTINGS = ("off", "deepcache:2", "deepcache:3", "deepcache:5", "auto", "mixed", "off (again)")


def workload(setting: str, images: int, steps: int, size: int, scheduler: str | None = None) -> list[GenerationSpec]:
    """The same requests for every setting; ``mixed``: every other one cached (auto), steps and guidance varying."""
    specs = []
    for k in range(images):
        cache, n, guidance = setting.removesuffix(" (again)"), steps, None
        if setting == "mixed":
            cache = "auto" if k % 2 == 0 else "off"
            n, guidance = steps - 5 * (k % 3), (1.0, 3.0, 5.0)[k % 3]  # mixed steps and guidance
        specs.append(GenerationSpec(prompt=PROMPTS[k % len(PROMPTS)], seed=1000 + k, num_inference_steps=n,
                                    guidance_scale=guidance, scheduler=scheduler, height=size, width=size,
                                    cache=cache))
    return specs


def timed(engine: Engine, specs: list[GenerationSpec], repeats: int) -> tuple[float, np.ndarray]:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        made = engine.generate(specs)
        times.append(time.perf_counter() - began)
    return min(times), np.stack([r.pixels for r in made])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(1 / mse) if mse else math.inf


def shallow_share(engine: Engine, rows: int, size: int, repeats: int = 5) -> float:
    """Seconds of the shallow path over seconds of a full UNet forward, ``rows`` rows, random inputs."""
    adapter = engine.adapter
    unet, f = adapter.denoiser, adapter.vae_scale_factor
    sample = torch.randn(rows, unet.config.in_channels, size // f, size // f)
    t = torch.full((rows,), 500.0)
    hidden = torch.randn(rows, 77, unet.config.cross_attention_dim)  # [N, L, D]
    deep: list[torch.Tensor] = []
    with torch.inference_mode():
        with capture(unet, deep, rows):
            unet(sample, t, encoder_hidden_states=hidden)
        full = _best(lambda: unet(sample, t, encoder_hidden_states=hidden), repeats)
        short = _best(lambda: shallow_forward(unet, sample, t, deep[0], hidden), repeats)
    return short / full


def _best(fn, repeats: int) -> float:
    fn()  # warm-up, not timed
    return best_of(repeats, fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--scheduler", default=None, help="a sampler name (default: the model's own)")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()
    engine = Engine.from_pretrained(None, device="cpu", max_batch_size=args.batch_size)
    share = shallow_share(engine, 2 * args.batch_size, args.size)
    print(f"shallow path: {share:.1%} of a forward", file=sys.stderr, flush=True)
    engine.generate(workload("auto", 2, 6, args.size) + workload("off", 2, 6, args.size))  # warm-up
    results, pixels = {}, {}
    for setting in SETTINGS:
        specs = workload(setting, args.images, args.steps, args.size, args.scheduler)
        seconds, pixels[setting] = timed(engine, specs, args.repeats)
        results[setting] = {"cache": engine.resolve(specs[0]).cache, "seconds": round(seconds, 2),
                            "images_per_s": round(len(specs) / seconds, 3)}
        print(setting, results[setting], file=sys.stderr, flush=True)
    results["mixed"]["cache"] = f"half {results['mixed']['cache']}, half off"
    _quality(engine, results, pixels, args)
    base = max(results["off"]["images_per_s"], results["off (again)"]["images_per_s"])
    for res in results.values():
        res["ratio_vs_off"] = round(res["images_per_s"] / base, 2)
    record = {"model": "embedded shapes", "images": args.images, "steps": args.steps, "size": args.size,
              "batch_size": args.batch_size, "repeats": args.repeats, "cpu": f"{cpu_name()}; {cpu_features()}",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": str(engine.adapter.dtype),
              "scheduler": args.scheduler or engine.adapter.default_scheduler_class.__name__,
              "load_average": os.getloadavg(), "shallow_share": round(share, 3), "results": results}
    name = f"cache-shapes-{args.scheduler}" if args.scheduler else "cache-shapes"
    (ROOT / "benchmarks" / "results" / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    if not args.no_markdown:
        write_markdown(record)
    print(json.dumps(record, indent=2))


def _quality(engine: Engine, results: dict, pixels: dict, args: argparse.Namespace) -> None:
    """PSNR of each cached image against the same request uncached; the mixed batch's uncached images must be
    the uncached run's bytes (the contract), its cached ones compared with those requests run uncached."""
    reference = pixels["off"]
    for setting in SETTINGS[1:5]:
        results[setting]["mean_psnr_db"] = round(float(np.mean([psnr(a, b) for a, b in
                                                               zip(pixels[setting], reference, strict=True)])), 1)
    mixed_specs = workload("mixed", args.images, args.steps, args.size, args.scheduler)
    plain = np.stack([r.pixels for r in engine.generate([dataclasses.replace(s, cache="off") for s in mixed_specs])])
    cached = [k for k, s in enumerate(mixed_specs) if s.cache != "off"]
    others = [k for k, s in enumerate(mixed_specs) if s.cache == "off"]
    results["mixed"]["mean_psnr_db"] = round(float(np.mean([psnr(pixels["mixed"][k], plain[k]) for k in cached])), 1)
    results["mixed"]["uncached_identical"] = bool(np.array_equal(pixels["mixed"][others], plain[others]))
    results["off (again)"]["identical_to_off"] = bool(np.array_equal(pixels["off (again)"], reference))


def write_markdown(record: dict) -> None:
    from results_md import replace_section, table

    rows = [[name, r["cache"], f"{r['seconds']:.1f}", f"{r['images_per_s']:.3f}", f"**{r['ratio_vs_off']:.2f}x**",
             f"{r['mean_psnr_db']:.1f}" if "mean_psnr_db" in r else "-"] for name, r in record["results"].items()]
    mixed = record["results"]["mixed"]
    flag = f" --scheduler {record['scheduler']}" if record["scheduler"] in SAMPLERS else ""
    body = (f"`python benchmarks/cache.py --images {record['images']} --steps {record['steps']}{flag}` on "
            f"{record['cpu']}, torch {record['torch']}, {record['threads']} thread(s) (the default), "
            f"{record['dtype']}, embedded model at {record['size']}x{record['size']}, {record['steps']} steps of "
            f"{record['scheduler']}, max batch {record['batch_size']} images, "
            f"{record['images']} images a setting, one engine, best of {record['repeats']}. PSNR: mean over the cached "
            "images against the same requests uncached (pixels in [0, 1]). Mixed: every other request cached "
            "(auto), steps and guidance varying; its uncached images were "
            f"{'byte-identical' if mixed['uncached_identical'] else 'NOT identical'} to the same requests run "
            f"without cached company. The shallow path (adapters/step_cache.py) took {record['shallow_share']:.0%} "
            f"of a full UNet forward at {2 * record['batch_size']} rows. Load average during the run: "
            f"{', '.join(f'{x:.1f}' for x in record['load_average'])} (other processes ran on the machine).\n\n"
            + table(["setting", "ran as", "seconds", "images/s", "vs off", "PSNR dB"], rows))
    suffix = f", {record['scheduler']}" if record["scheduler"] in SAMPLERS else ""
    replace_section(f"Step caching per request: shapes model{suffix} (issue 21)", body)


if __name__ == "__main__":
    main()
