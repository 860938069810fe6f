"""Step caching per request (issue 21), side by side in one run on one model: images/s of ``cache: off`` against
DeepCache every 2/3/5 steps, ``auto``, and a mixed batch (half the requests cached, steps and guidance varying);
the same mixed requests through the anchor (diffusers' pipeline in list batches grouped by setting, the DeepCache
package on the cached groups); on the embedded model also the quality: PSNR and SSIM of each cached image against
the same request uncached, and ``eval-shapes`` accuracy per setting. Also the cost of the shallow path against a
full UNet forward (the cut, adapters/step_cache.py).

    python benchmarks/cache.py                      # the embedded model, 64x64, 30 steps, 16 images a setting
    python benchmarks/cache.py --model sd15 --images 4 --steps 10   # SD-1.5 architecture, random weights, 256x256

The anchor needs the DeepCache package (``pip install DeepCache==0.1.1``; without it the anchor row is left out).
One engine serves every setting (``cache`` is a per-request field); each setting runs after a warm-up, best of
``--repeats``; ``off`` runs first and last, so drift shows. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from resume_check import best_of  # noqa: E402 - the benchmarks' one best-of-N timer
from throughput import save_sd15_random  # noqa: E402

from diffbatch import Engine, GenerationSpec  # noqa: E402
from diffbatch.adapters.step_cache import capture, shallow_forward  # noqa: E402
from diffbatch.hardware import cpu_features, cpu_name  # noqa: E402
from diffbatch.samplers import SAMPLERS  # noqa: E402

PROMPTS = ("a red circle", "a blue star on a white background", "a small green square at the top", "a pink triangle",
           "a yellow circle on a black background", "a purple square")
SETTINGS = ("off", "deepcache:2", "deepcache:3", "deepcache:5", "auto", "mixed", "off (again)")
ANCHOR = "mixed, grouped: diffusers + DeepCache"


def workload(setting: str, images: int, steps: int, size: int, scheduler: str | None = None) -> list[GenerationSpec]:
    """The same requests for every setting; ``mixed``: every other one cached (auto), steps and guidance varying."""
    specs = []
    for k in range(images):
        cache, n, guidance = setting.removesuffix(" (again)"), steps, None
        if setting == "mixed":
            cache = "auto" if k % 2 == 0 else "off"
            n, guidance = steps - steps // 6 * (k % 3), (1.0, 3.0, 5.0)[k % 3]  # mixed steps and guidance
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
        with capture(unet, deep):
            unet(sample, t, encoder_hidden_states=hidden)
        full = _best(lambda: unet(sample, t, encoder_hidden_states=hidden), repeats)
        short = _best(lambda: shallow_forward(unet, sample, t, deep[0], hidden), repeats)
    return short / full


def _best(fn, repeats: int) -> float:
    fn()  # warm-up, not timed
    return best_of(repeats, fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("shapes", "sd15"), default="shapes",
                        help="the embedded model, or the SD-1.5 architecture with random weights (speed only)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, help="pixels (default 64 for shapes, 256 for sd15)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--scheduler", default=None, help="a sampler name (default: the model's own)")
    parser.add_argument("--eval-seeds", type=int, default=4, help="eval-shapes seeds per setting (0: no eval)")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()
    args.size = args.size or (64 if args.model == "shapes" else 256)
    with tempfile.TemporaryDirectory() as scratch:
        model = None if args.model == "shapes" else str(save_sd15_random(Path(scratch) / "sd15"))
        record = measure(model, args)
    name = f"cache-{args.model}" + (f"-{args.scheduler}" if args.scheduler else "")
    (ROOT / "benchmarks" / "results" / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    if not args.no_markdown:
        write_markdown(record)
    print(json.dumps(record, indent=2))


def measure(model: str | None, args: argparse.Namespace) -> dict:
    engine = Engine.from_pretrained(model, device="cpu", max_batch_size=args.batch_size)
    rows = 2 * args.batch_size if model is None else 4  # an SD-1.5 forward of 16 rows takes ~30 s here
    share = shallow_share(engine, rows, args.size, 5 if model is None else 2)
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
    anchor = anchor_mixed(engine, workload("mixed", args.images, args.steps, args.size, args.scheduler), args.repeats)
    if anchor is not None:
        results[ANCHOR], pixels[ANCHOR] = anchor
        results["mixed"]["vs_anchor"] = round(results["mixed"]["images_per_s"] / anchor[0]["images_per_s"], 2)
    contract(engine, results, pixels, args)
    if model is None:  # quality means something only with trained weights
        quality(engine, results, pixels, args)
    base = max(results["off"]["images_per_s"], results["off (again)"]["images_per_s"])
    for res in results.values():
        res["ratio_vs_off"] = round(res["images_per_s"] / base, 2)
    return {"model": "embedded shapes" if model is None else "SD-1.5 architecture, random weights",
            "images": args.images, "steps": args.steps, "size": args.size, "batch_size": args.batch_size,
            "repeats": args.repeats, "cpu": f"{cpu_name()}; {cpu_features()}", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "dtype": str(engine.adapter.dtype),
            "scheduler": args.scheduler or engine.adapter.default_scheduler_class.__name__,
            "load_average": os.getloadavg(), "shallow_share": round(share, 3), "shallow_rows": rows,
            "results": results}


def anchor_mixed(engine: Engine, specs: list[GenerationSpec], repeats: int) -> tuple[dict, np.ndarray] | None:
    """The mixed requests as diffusers runs them: one list batch per group of equal settings (steps, guidance,
    sampler, cache), the DeepCache package's helper (uniform interval, its default branch) on the cached groups;
    the timing and the images (in the specs' order)."""
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        print("DeepCache is not installed: no anchor row (pip install DeepCache==0.1.1)", file=sys.stderr)
        return None
    from diffusers import StableDiffusionPipeline

    resolved = [engine.resolve(s) for s in specs]
    pipe = StableDiffusionPipeline(**engine.adapter.pipe.components)  # the same modules, diffusers' own loop
    pipe.set_progress_bar_config(disable=True)
    helper = DeepCacheSDHelper(pipe=pipe)
    groups: dict[tuple, list[GenerationSpec]] = {}
    for s in resolved:
        groups.setdefault((s.cache, s.num_inference_steps, s.guidance_scale, s.scheduler), []).append(s)

    made: dict[int, np.ndarray] = {}

    def run() -> None:
        for (cache, steps, guidance, scheduler), group in groups.items():
            pipe.scheduler = engine.resolver.make_sampler(scheduler)
            if cache != "off":
                helper.set_params(cache_interval=int(cache.split(":")[1]), cache_branch_id=0)
                helper.enable()
            try:
                images = pipe(prompt=[s.prompt for s in group], num_inference_steps=steps, guidance_scale=guidance,
                              height=group[0].height, width=group[0].width, output_type="np",
                              generator=[torch.Generator("cpu").manual_seed(s.seed) for s in group]).images
                made.update((id(s), image) for s, image in zip(group, images, strict=True))
            finally:
                if cache != "off":
                    helper.disable()

    with _plain_modules(pipe):
        run()  # warm-up
        seconds = best_of(repeats, run)
    return ({"cache": f"{len(groups)} list batches, DeepCache package (uniform) on the cached ones",
             "seconds": round(seconds, 2), "images_per_s": round(len(specs) / seconds, 3)},
            np.stack([made[id(s)] for s in resolved]))


@contextlib.contextmanager
def _plain_modules(pipe):
    """diffusers' modules as diffusers runs them: without the batch-invariance patches (instance ``forward``
    attributes; adapters/invariance.py), put back afterwards."""
    saved = []
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):
        for module in component.modules():
            for name in ("forward", "gelu"):
                if name in vars(module):
                    saved.append((module, name, vars(module).pop(name)))
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def contract(engine: Engine, results: dict, pixels: dict, args: argparse.Namespace) -> None:
    """The mixed batch's uncached images must be the bytes of those requests run without cached company; ``off``
    the same bytes in both runs."""
    mixed_specs = workload("mixed", args.images, args.steps, args.size, args.scheduler)
    others = [k for k, s in enumerate(mixed_specs) if s.cache == "off"]
    plain = np.stack([r.pixels for r in engine.generate([mixed_specs[k] for k in others])])
    results["mixed"]["uncached_identical"] = bool(np.array_equal(pixels["mixed"][others], plain))
    results["off (again)"]["identical_to_off"] = bool(np.array_equal(pixels["off (again)"], pixels["off"]))


def quality(engine: Engine, results: dict, pixels: dict, args: argparse.Namespace) -> None:
    """PSNR and SSIM of each cached image against the same request uncached (the mixed batch's cached ones against
    those requests run uncached); eval-shapes accuracy per setting."""
    reference = pixels["off"]
    for setting in SETTINGS[1:5]:
        pairs = list(zip(pixels[setting], reference, strict=True))
        results[setting]["mean_psnr_db"] = round(float(np.mean([psnr(a, b) for a, b in pairs])), 1)
        results[setting]["mean_ssim"] = round(float(np.mean([ssim(a, b) for a, b in pairs])), 3)
    mixed_specs = workload("mixed", args.images, args.steps, args.size, args.scheduler)
    cached = [k for k, s in enumerate(mixed_specs) if s.cache != "off"]
    plain = np.stack([r.pixels for r in engine.generate([dataclasses.replace(mixed_specs[k], cache="off")
                                                          for k in cached])])
    for setting in ("mixed", ANCHOR) if ANCHOR in pixels else ("mixed",):
        pairs = list(zip(pixels[setting][cached], plain, strict=True))
        results[setting]["mean_psnr_db"] = round(float(np.mean([psnr(a, b) for a, b in pairs])), 1)
        results[setting]["mean_ssim"] = round(float(np.mean([ssim(a, b) for a, b in pairs])), 3)
    if args.eval_seeds:
        from diffbatch_shapes.evaluation.shapes import evaluate

        scores: dict[str, dict] = {}
        for setting in SETTINGS[:5]:
            ran = results[setting]["cache"]
            if ran not in scores:
                scores[ran] = evaluate(_generate_fn(engine, ran, args), seeds=range(args.eval_seeds))[0].accuracy
                print("eval-shapes", ran, scores[ran], file=sys.stderr, flush=True)
            results[setting]["eval_shapes"] = {k: round(v, 3) for k, v in scores[ran].items()}


def _generate_fn(engine: Engine, cache: str, args: argparse.Namespace):
    def generate(prompts, seeds):
        specs = [GenerationSpec(prompt=p, seed=s, num_inference_steps=args.steps, scheduler=args.scheduler,
                                cache=cache) for p, s in zip(prompts, seeds, strict=True)]
        return [r.image for r in engine.generate(specs)]

    return generate


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean SSIM of two ``[H, W, 3]`` images in [0, 1], as scikit-image's ``structural_similarity`` computes it by
    default (7x7 uniform window, sample covariance, K1 0.01, K2 0.03, borders cropped), averaged over channels."""
    values = []
    n = window * window
    for c in range(a.shape[-1]):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        mx, my = _box(x, window), _box(y, window)
        vx = (_box(x * x, window) - mx * mx) * n / (n - 1)
        vy = (_box(y * y, window) - my * my) * n / (n - 1)
        vxy = (_box(x * y, window) - mx * my) * n / (n - 1)
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        values.append(float(np.mean((2 * mx * my + c1) * (2 * vxy + c2)
                                    / ((mx * mx + my * my + c1) * (vx + vy + c2)))))
    return float(np.mean(values))


def _box(x: np.ndarray, w: int) -> np.ndarray:
    """Mean over each full ``w x w`` window (the window centres away from the border)."""
    s = np.pad(x, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return (s[w:, w:] - s[:-w, w:] - s[w:, :-w] + s[:-w, :-w]) / (w * w)


def write_markdown(record: dict) -> None:
    from results_md import replace_section, table

    def cells(r: dict) -> list[str]:
        score = r.get("eval_shapes")
        return [r["cache"], f"{r['seconds']:.1f}", f"{r['images_per_s']:.3f}", f"**{r['ratio_vs_off']:.2f}x**",
                f"{r['mean_psnr_db']:.1f}" if "mean_psnr_db" in r else "-",
                f"{r['mean_ssim']:.3f}" if "mean_ssim" in r else "-",
                " / ".join(f"{100 * score[k]:.0f}" for k in ("background", "colour", "shape", "position"))
                if score else "-"]

    rows = [[name, *cells(r)] for name, r in record["results"].items()]
    mixed = record["results"]["mixed"]
    flags = "" if record["model"] == "embedded shapes" else " --model sd15"
    flags += f" --scheduler {record['scheduler']}" if record["scheduler"] in SAMPLERS else ""
    anchor = (f" The mixed batch ran **{mixed['vs_anchor']:.2f}x** the images/s of the anchor (the same requests "
              "through diffusers' pipeline, one list batch per equal setting, the DeepCache package's uniform "
              "schedule and shorter default branch on the cached ones)." if "vs_anchor" in mixed else "")
    body = (f"`python benchmarks/cache.py --images {record['images']} --steps {record['steps']}{flags}` on "
            f"{record['cpu']}, torch {record['torch']}, {record['threads']} thread(s) (the default), "
            f"{record['dtype']}, {record['model']} at {record['size']}x{record['size']}, {record['steps']} steps of "
            f"{record['scheduler']}, max batch {record['batch_size']} images, "
            f"{record['images']} images a setting, one engine, best of {record['repeats']}. PSNR and SSIM: means over "
            "the cached images against the same requests uncached (pixels in [0, 1]); eval-shapes: accuracy in % "
            "(background / colour / shape / position) of the 24 prompts x seeds at that setting. Mixed: every "
            "other request cached (auto), steps and guidance varying; its uncached images were "
            f"{'byte-identical' if mixed['uncached_identical'] else 'NOT identical'} to the same requests run "
            f"without cached company.{anchor} The shallow path (adapters/step_cache.py) took "
            f"{record['shallow_share']:.0%} of a full UNet forward at {record['shallow_rows']} rows. Load average "
            f"at the end: {', '.join(f'{x:.1f}' for x in record['load_average'])}.\n\n"
            + table(["setting", "ran as", "seconds", "images/s", "vs off", "PSNR dB", "SSIM", "eval-shapes %"], rows))
    model = "shapes model" if record["model"] == "embedded shapes" else "SD-1.5 architecture"
    suffix = f", {record['scheduler']}" if record["scheduler"] in SAMPLERS else ""
    replace_section(f"Step caching per request: {model}{suffix} (issue 21)", body)


if __name__ == "__main__":
    main()
