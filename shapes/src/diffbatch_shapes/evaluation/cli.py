"""``diffbatch eval-shapes``: prompt adherence of a shapes model, judged by the deterministic analyser."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from diffbatch.caching import RULE as CACHE_RULE
from diffbatch.caching import cache_ok
from diffbatch.errors import SpecError
from diffbatch.io.gallery import contact_sheet
from diffbatch.options import DTYPE_NAMES

from .shapes import ATTRIBUTES, EVAL_PROMPTS, EvalResult, evaluate

TARGETS = {"background": 0.95, "colour": 0.90, "shape": 0.80, "position": 0.80}  # issue 3


def register(subparsers) -> None:
    """Add ``diffbatch eval-shapes`` to a ``diffbatch`` argument parser."""
    p = subparsers.add_parser(
        "eval-shapes", help="score a shapes model's prompt adherence with the deterministic analyser",
        description="Generate a fixed prompt list x N seeds and report per-attribute accuracy "
                    "(background colour, shape colour, shape class, position).")
    p.add_argument("--model", help="diffusers pipeline folder (default: the embedded shapes model)")
    p.add_argument("--seeds", type=int, default=4, metavar="N", help="seeds 0..N-1 per prompt (default 4)")
    p.add_argument("--steps", type=int, metavar="N", help="inference steps (default: the model's)")
    p.add_argument("--guidance-scale", type=float, metavar="G", help="CFG scale (default: the model's)")
    p.add_argument("--scheduler", metavar="NAME", help="sampler name, e.g. euler_a (default: the model's)")
    p.add_argument("--cache", default="off", metavar="SETTING",
                   help="step cache of every image: off (default), auto or METHOD:VALUE, e.g. deepcache:3")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="engine max batch size")
    p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                   help="model dtype (default float32, the dtype of the published scores)")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="one prompt per line (default: built-in list)")
    p.add_argument("--out", type=Path, metavar="DIR", help="write eval.json and grid.png here")
    p.set_defaults(func=run_eval_shapes)


def run_eval_shapes(args: argparse.Namespace) -> int:
    """Run the evaluation; print the table; exit 0 (the scores are the output, not a pass/fail)."""
    if not cache_ok(args.cache):  # before the model loads
        raise SpecError(field="cache", value=args.cache, reason=CACHE_RULE)
    prompts = _read_prompts(args.prompts) if args.prompts else list(EVAL_PROMPTS)
    generate = engine_generate_fn(args.model, args.steps, args.guidance_scale, args.scheduler, args.batch_size,
                                  args.device, args.dtype, args.cache)
    result, images = evaluate(generate, prompts, range(args.seeds))
    settings = {"model": args.model or "default", "dtype": args.dtype, "steps": args.steps,
                "guidance_scale": args.guidance_scale,
                "scheduler": args.scheduler, "cache": args.cache, "seeds": args.seeds, "prompts": len(prompts)}
    print(format_table(result, settings))
    if args.out:
        write_outputs(args.out, result, images, settings)
    return 0


def engine_generate_fn(model: str | None, steps: int | None, guidance: float | None, scheduler: str | None,
                       batch_size: int, device: str = "cpu", dtype: str = "float32", cache: str = "off"):
    """A ``generate_fn`` over diffbatch's Engine (seeds drawn on the CPU, so any device draws the same
    noise); every image with the step cache ``cache``."""
    from diffbatch import Engine, GenerationSpec

    engine = Engine.from_pretrained(model, device=device, dtype=dtype, max_batch_size=batch_size)

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        specs = [GenerationSpec(prompt=p, seed=s, num_inference_steps=steps, guidance_scale=guidance,
                                scheduler=scheduler, cache=cache) for p, s in zip(prompts, seeds, strict=True)]
        return [r.image for r in engine.generate(specs)]

    return generate


def format_table(result: EvalResult, settings: dict) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None)
    lines = [f"eval-shapes ({shown}); {len(result.records)} images", "attribute   accuracy  target"]
    for attribute in ATTRIBUTES:
        if attribute in result.accuracy:
            lines.append(f"{attribute:<11} {result.accuracy[attribute]:>7.1%}  {TARGETS[attribute]:>6.0%}")
    return "\n".join(lines)


def write_outputs(out: Path, result: EvalResult, images: list[Image.Image], settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"settings": settings, **result.to_dict()}, indent=1))
    captions = [r["prompt"] for r in result.records]
    contact_sheet(images, captions, cell=3 * images[0].width, columns=6, resample=Image.Resampling.NEAREST).save(
        out / "grid.png")


def _read_prompts(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
