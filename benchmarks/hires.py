"""Hires fix: a job of 64 requests, half with hires fix (scale 2), as one diffbatch job vs the AUTOMATIC1111 way
(issue 35), side by side in one process on the embedded model.

- diffbatch: all 64 requests in one engine (``Engine.generate``): first passes batch together, and each hires
  request's second pass joins the running batch at the larger size as its first pass ends;
- the A1111 way: one request after another (A1111 runs one at a time), a hires request's two passes one after
  the other: diffusers' text-to-image (latents), the latent upscale, diffusers' image-to-image.

Every image of the two ways is the same picture (tests/test_hires.py checks diffbatch against these calls).

    python benchmarks/hires.py [--repeats 2] [--requests 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_md import interleaved_best, rates  # noqa: E402
from throughput import cpu_model  # noqa: E402

from diffbatch import Engine, GenerationSpec  # noqa: E402
from diffbatch.adapters.loading import default_model  # noqa: E402
from diffbatch.hires import second_pass_steps, upscale_latents  # noqa: E402

PROMPTS = ["a red circle on the left", "a blue square on a white background", "a green triangle at the top",
           "a yellow star on the right"]


def specs(n: int, steps: int) -> list[GenerationSpec]:
    """Every other request with hires fix at scale 2 (A1111's defaults: Latent, 0.7, the first pass's steps)."""
    return [GenerationSpec(prompt=PROMPTS[k % len(PROMPTS)], seed=k, num_inference_steps=steps,
                           hires_scale=2.0 if k % 2 else None) for k in range(n)]


def a1111_way(txt2img: StableDiffusionPipeline, img2img: StableDiffusionImg2ImgPipeline, resolved: list,
              factor: int) -> None:
    for spec in resolved:
        common = dict(prompt=spec.prompt, guidance_scale=spec.guidance_scale, output_type="np")
        latent = spec.hires_scale is not None
        first = txt2img(**{**common, "output_type": "latent" if latent else "np"}, height=spec.height,
                        width=spec.width, num_inference_steps=spec.num_inference_steps,
                        generator=torch.Generator().manual_seed(spec.seed)).images
        if latent:  # A1111's hires steps (hires.py): the same diffusers call the engine's second pass is
            steps, strength = second_pass_steps(spec)
            img2img(**common, image=upscale_latents(first, spec, factor), strength=strength,
                    num_inference_steps=steps, generator=torch.Generator().manual_seed(spec.seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)  # A1111's default sampling steps
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    model = Path(default_model())
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32", max_batch_size="auto")  # the CLI's default
    txt2img = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    txt2img.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**txt2img.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    resolved = [engine.resolve(s) for s in specs(args.requests, args.steps)]
    factor = engine.adapter.vae_scale_factor
    engine.generate(resolved[:2], resolved=True)  # warm-up: first calls allocate
    a1111_way(txt2img, img2img, resolved[:2], factor)
    strategies = {"a1111_way_one_request_at_a_time": lambda: a1111_way(txt2img, img2img, resolved, factor),
                  "diffbatch_one_job": lambda: engine.generate(resolved, resolved=True)}
    best = interleaved_best(strategies, args.repeats)
    n = len(resolved)
    record = {"images": n, "hires": sum(1 for s in resolved if s.hires_scale), "steps": args.steps,
              "size": f"{resolved[0].width}x{resolved[0].height}", "repeats": args.repeats, "cpu": cpu_model(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": "auto",
              "results": rates(best, n),
              "ratio": round(best["a1111_way_one_request_at_a_time"] / best["diffbatch_one_job"], 3)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hires.json").write_text(json.dumps(record, indent=2))
    write_markdown(record)
    print(json.dumps(record, indent=2))


def write_markdown(record: dict) -> None:
    from results_md import replace_section, table

    rows = [[k, f"{v['seconds']:.2f}", f"{v['images_per_s']:.3f}"] for k, v in record["results"].items()]
    rows.append(["**diffbatch / the A1111 way**", "", f"**{record['ratio']:.2f}x**"])
    body = (f"`python benchmarks/hires.py --repeats {record['repeats']} --requests {record['images']} --steps "
            f"{record['steps']}` on {record['cpu']}, torch {record['torch']}, {record['threads']} thread(s) (the "
            f"default), float32, best of {record['repeats']}, interleaved. Embedded model, {record['images']} "
            f"requests at {record['size']}, {record['hires']} of them with hires fix (scale 2, Latent, denoising "
            f"0.7, {record['steps']} + {record['steps']} steps: A1111's hires steps, all run, at 2x). "
            "The A1111 way: one request at a time, a hires request's two diffusers calls one after the other; "
            "diffbatch: one job, one engine "
            f"(max batch: {record['batch_size']}), second passes joining the running batch.\n\n"
            + table(["strategy", "seconds", "images/s"], rows))
    replace_section("Hires fix: one job vs one request at a time (issue 35)", body)


if __name__ == "__main__":
    main()
