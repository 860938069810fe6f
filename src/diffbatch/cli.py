"""The ``diffbatch`` command line. Subcommands come from ``register(subparsers)`` functions: each adds its
parser and sets ``func`` (``args -> exit code``). Bad input of any kind is one line on stderr and exit 2,
raised before anything is written."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import DiffbatchError, InputError, SpecError
from .io.progress import Progress
from .io.prompts import JobItem, JobSource, read_job
from .io.writer import MANIFEST, OutputWriter
from .samplers import SAMPLERS
from .spec import GenerationSpec, check_size

if TYPE_CHECKING:
    from .engine import Engine, Result

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_BAD_INPUT = 2
DTYPES = ("float32", "float16", "bfloat16")

# flag dest -> (flag as the user typed it, GenerationSpec field it sets)
SPEC_FLAGS: dict[str, tuple[str, str]] = {
    "steps": ("--steps", "num_inference_steps"),
    "guidance_scale": ("--guidance-scale", "guidance_scale"),
    "negative_prompt": ("--negative-prompt", "negative_prompt"),
    "scheduler": ("--scheduler", "scheduler"),
    "strength": ("--strength", "strength"),
}

GENERATE_HELP = """\
PROMPTS is a text file (one prompt per line; blank lines and lines starting with # are skipped),
a .jsonl file (one JSON object per line with any of the fields prompt, negative_prompt, seed,
num_inference_steps, guidance_scale, height, width, image, strength, scheduler; a line's fields
override the flags), or - for stdin (read as JSON lines when its first line starts with '{').
Image k of the job (0-based, in order) gets seed BASE + k unless its line sets a seed S (then its
-n copies get S, S+1, ...). Writes DIR/{k:05d}-{seed}.png and DIR/manifest.jsonl."""


class UsageError(DiffbatchError):
    """A command line argparse rejected (unknown flag, missing value, bad number)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)  # main prints it as one line (argparse would print usage too)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffbatch`` command; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except DiffbatchError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"diffbatch: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="diffbatch", description="Step-level batch inference for diffusion models.")
    parser.add_argument("--version", action="version", version=f"diffbatch {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(subparsers)
    _register_optional(subparsers, "diffbatch.server.cli", ("diffbatch.server", "fastapi", "uvicorn"))
    _register_optional(subparsers, "diffbatch.evaluation.cli", ("diffbatch.evaluation",))
    return parser


def _register_optional(subparsers: Subparsers, module: str, optional: tuple[str, ...]) -> None:
    """Subcommands of optional parts (the server, the evaluation): skipped when their module or an optional
    dependency is missing; a module that is there but broken still raises."""
    try:
        feature = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module or (exc.name or "").split(".")[0] in optional or exc.name in optional:
            return
        raise
    feature.register(subparsers)


def register(subparsers: Subparsers) -> None:
    """Add ``diffbatch generate``."""
    p = subparsers.add_parser("generate", help="generate a batch of images into a folder",
                              description=GENERATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts_file", nargs="?", metavar="PROMPTS", help="prompts file (.txt or .jsonl), or -")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--model", help="diffusers pipeline folder or hub id (default: the embedded model)")
    p.add_argument("-n", "--images-per-prompt", type=int, default=1, metavar="N")
    p.add_argument("--seed", type=int, default=0, metavar="BASE", help="image k gets BASE + k (default 0)")
    p.add_argument("--steps", type=int, metavar="N", help="inference steps (default: the model's)")
    p.add_argument("--guidance-scale", type=float, metavar="G", help="CFG scale; <= 1 disables CFG")
    p.add_argument("--size", type=_parse_size, metavar="WxH", help="width x height in pixels")
    p.add_argument("--negative-prompt", metavar="TEXT")
    p.add_argument("--scheduler", metavar="NAME", help="sampler: " + ", ".join(SAMPLERS))
    p.add_argument("--image", metavar="PATH_OR_DIR", help="init image, or a folder paired with prompts")
    p.add_argument("--strength", type=float, metavar="S", help="img2img strength in (0, 1]")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="most images per model call")
    p.add_argument("--device", help="torch device (default: the engine's choice)")
    p.add_argument("--dtype", choices=DTYPES, help="default: float16 on CUDA, float32 elsewhere")
    p.set_defaults(func=run_generate)


def _parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height)."""
    width, sep, height = text.lower().partition("x")
    if not (sep and width.strip().isdigit() and height.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"expected WxH such as 512x512, got {text!r}")
    return int(width), int(height)


def run_generate(args: argparse.Namespace) -> int:
    """Check everything, load the model, resolve every spec, and only then write."""
    source = _job_source(args)
    _check_out_dir(args.out)
    items = read_job(source)
    engine = load_engine(args)
    if args.size is not None:
        _check_size_flag(args.size, engine.defaults.vae_scale_factor)
    specs = resolve_all(engine, items)
    _generate(engine, specs, args.out)
    print(f"diffbatch: wrote {len(specs)} images and {MANIFEST} to {args.out}", file=sys.stderr)
    return 0


def _job_source(args: argparse.Namespace) -> JobSource:
    _check_flag("--seed", "seed", args.seed)
    if args.batch_size < 1:
        raise SpecError(f"--batch-size {args.batch_size} is invalid: must be an integer >= 1")
    return JobSource(prompts_file=args.prompts_file, prompts=tuple(args.prompt), image=args.image,
                     images_per_prompt=args.images_per_prompt, base_seed=args.seed,
                     defaults=_flag_fields(args))


def _flag_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The spec fields the flags set, each checked on its own so an error names its flag."""
    fields: dict[str, Any] = {}
    for dest, (flag, field) in SPEC_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            _check_flag(flag, field, value)
            fields[field] = value
    if args.size is not None:
        width, height = args.size
        _check_flag("--size", "width", width, shown=f"{width}x{height}")
        _check_flag("--size", "height", height, shown=f"{width}x{height}")
        fields.update(width=width, height=height)
    return fields


def _check_flag(flag: str, field: str, value: Any, shown: str | None = None) -> None:
    try:
        GenerationSpec(prompt="", **{field: value})
    except SpecError as exc:
        raise SpecError(f"{flag} {shown or value} is invalid: {_allowed(exc)}") from None


def _allowed(exc: SpecError) -> str:
    """The "what is allowed" half of a spec error (``field=value is invalid: <allowed>``)."""
    return str(exc).partition(" is invalid: ")[2] or str(exc)


def _check_size_flag(size: tuple[int, int], vae_scale_factor: int) -> None:
    width, height = size
    try:
        check_size(GenerationSpec(prompt="", width=width, height=height), vae_scale_factor)
    except SpecError as exc:
        raise SpecError(f"--size {width}x{height} is invalid: {_allowed(exc)}") from None


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")


def load_engine(args: argparse.Namespace) -> Engine:
    """The engine for ``--model`` (imported here: torch and diffusers load only when a job runs)."""
    from .engine import Engine

    _quiet_loading()
    with warnings.catch_warnings():  # library deprecation notes are not the user's business here
        warnings.simplefilter("ignore")
        return Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                      max_batch_size=args.batch_size)


def _quiet_loading() -> None:
    """Keep stderr for our progress bar and one-line errors: no loading bars or notices from the libraries."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.disable_progress_bar()
        logging.set_verbosity_error()


def resolve_all(engine: Engine, items: list[JobItem]) -> list[GenerationSpec]:
    """Every spec resolved against the model before the first image is written; errors name the line."""
    resolved = []
    for item in items:
        try:
            resolved.append(engine.resolve(item.spec, item.spec.seed))
        except DiffbatchError as exc:
            raise type(exc)(f"{item.where}: {exc}") from None
    return resolved


def _generate(engine: Engine, specs: list[GenerationSpec], out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create the folder: {exc.strerror}") from None
    with OutputWriter(out, engine.model_name) as writer, Progress(len(specs)) as progress:
        def on_result(result: Result) -> None:
            sampler = engine.sampler_label(result.spec)
            writer.write(result.index, result.spec, result.image, sampler, result.seconds)
            progress.update()

        engine.generate(specs, on_result=on_result)


if __name__ == "__main__":
    sys.exit(main())
