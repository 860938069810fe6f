"""The ``diffbatch`` command line. Subcommands come from ``register(subparsers)`` functions: each adds its
parser and sets ``func`` (``args -> exit code``). Bad input of any kind is one line on stderr and exit 2,
raised before anything is written."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import os
import sys
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import DiffbatchError, InputError, SpecError, is_disk_full
from .io.a1111 import A1111_IMAGE_HASH, a1111_image_hash, differs_note, lora_hashes, refusal
from .io.dynamic import parse_dynamic
from .io.gallery import GRID_PNG, INDEX_HTML, write_gallery
from .io.images import image_hash, image_hashes
from .io.infotext import read_infotext
from .io.progress import Progress
from .io.prompts import AUTHORED_LIMIT, JobItem, JobSource, describe_job, read_job
from .io.resume import ResumePlan, apply_resume, lock_folder, plan_resume, shown_names
from .io.sweep import parse_sweep
from .io.writer import MANIFEST, OutputWriter
from .memory import AUTO, BatchSize
from .models import DEFAULT_MODEL
from .numbers import parse_int
from .numerics import NumericPath
from .options import AUTO_DTYPE, BACKENDS, DTYPE_NAMES
from .quiet import quiet_loading
from .seeds import JOB_BASE_SEED, job_seed
from .spec import EDGES, FIELDS, PARSE, GenerationSpec, check_field, check_size, parse_size

if TYPE_CHECKING:
    from .engine import Engine
    from .resolver import Resolver

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1  # the run could not finish (a full disk); rerunning the same command resumes it
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as shells report it
COMMANDS_GROUP = "diffbatch.commands"  # entry points adding subcommands: register(subparsers)
BACKEND_HELP = "what runs the models: torch (default) or openvino (CPU; pip install 'diffbatch[openvino]')"
DTYPE_HELP = ("auto (default): float16 on CUDA; on a CPU bfloat16 where it is native (AVX512_BF16 or AMX), "
              "else float32")

GENERATE_HELP = f"""\
PROMPTS is a text file (one prompt per line; blank lines and lines starting with # are skipped),
a .jsonl file (one JSON object per line; a line's fields override the flags), or - for stdin
(read as JSON lines when its first line starts with '{{'). A .jsonl line's fields are any of
{textwrap.fill(", ".join(FIELDS), 100)}.
A prompt may hold AUTOMATIC1111's <lora:NAME:WEIGHT> tags (NAME.safetensors in --lora-dir).
Image k of the job (0-based, in order) gets seed BASE + k unless its line sets a seed S (then its
-n copies get S, S+1, ...). Writes DIR/{{k:05d}}-{{seed}}.png, DIR/manifest.jsonl, and a gallery
(DIR/index.html, DIR/grid.png). Run again on the same DIR, it skips the images already written
(a changed job is refused unless --overwrite; an image whose file is not the one its manifest line
describes is made again). A changed init image (its content, not its name) is a changed job."""


class UsageError(DiffbatchError):
    """A command line argparse rejected (unknown flag, missing value, bad number)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)  # main prints it as one line (argparse would print usage too)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffbatch`` command; returns the exit code."""
    # transformers warns on import about optional backends (torchvision); a command's stderr is for its
    # own progress and one-line errors. An explicit TRANSFORMERS_VERBOSITY still wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except DiffbatchError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except OSError as exc:
        if is_disk_full(exc):
            where = f" writing {exc.filename}" if exc.filename else ""
            return _fail(f"the disk is full{where} ({exc.strerror}); free space and run the same command again: "
                         "the images written so far are kept", EXIT_FAILED)
        if exc.filename:  # a file refused mid-run (the folder removed, made read-only): the run's end, not a bug
            return _fail(f"{exc.filename}: {exc.strerror}; the images written so far are kept, and the same "
                         "command finishes the job once it can write there", EXIT_FAILED)
        raise
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to finish the job (the images written so far "
                     "are kept)", EXIT_INTERRUPTED)


def _fail(message: str, code: int) -> int:
    message = " ".join(message.split())  # one line, whatever the message held
    print(f"diffbatch: error: {message}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="diffbatch", description="Step-level batch inference for diffusion models.")
    parser.add_argument("--version", action="version", version=f"diffbatch {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(subparsers)
    _register_optional(subparsers, "diffbatch.server.cli", ("diffbatch.server", "fastapi", "uvicorn"))
    for entry in importlib.metadata.entry_points(group=COMMANDS_GROUP):
        entry.load()(subparsers)
    return parser


def _register_optional(subparsers: Subparsers, module: str, optional: tuple[str, ...]) -> None:
    """Subcommands of an optional part (the server): skipped when its module or an optional dependency is
    missing; a module that is there but broken still raises."""
    try:
        feature = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module or (exc.name or "").split(".")[0] in optional or exc.name in optional:
            return
        raise
    feature.register(subparsers)


def register(subparsers: Subparsers) -> None:
    """Add ``diffbatch generate`` and ``diffbatch gallery``."""
    p = subparsers.add_parser("generate", help="generate a batch of images into a folder",
                              description=GENERATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts_file", nargs="?", metavar="PROMPTS", help="prompts file (.txt or .jsonl), or -")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--model", help="diffusers pipeline folder or hub id (default: the embedded model)")
    p.add_argument("-n", "--images-per-prompt", type=int, default=1, metavar="N")
    p.add_argument("--seed", type=int, metavar="BASE", help="image k gets BASE + k (default 0; with --from: its seed)")
    p.add_argument("--from", dest="from_image", type=Path, metavar="IMAGE.png",
                   help="every setting (and the model) from a PNG written by diffbatch or AUTOMATIC1111; flags "
                        "override, --prompt replaces the prompt; alone it regenerates the same file")
    p.add_argument("--vary-seed", action="store_true", help="with --from: seeds S+1, S+2, ... instead of S, ...")
    p.add_argument("--ignore", action="append", default=[], metavar="KEY",
                   help="with --from: make the image without a setting of the PNG that diffbatch does not honour "
                        "(it says which), or without checking a hash it records (repeatable)")
    p.add_argument("--size", type=_parse_size, metavar="WxH", help="width x height in pixels")
    p.add_argument("--image", metavar="PATH_OR_DIR", help="init image, or a folder paired with prompts")
    _add_spec_flags(p)
    p.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2,...",
                   help="a sweep axis (up to 3: X, Y, Z): every image once per value, e.g. guidance=5,7.5,10, "
                        "steps=10-30 (+10), sampler=euler_a,ddim, size=512x512,768x512, lora:NAME=0,0.5,1, "
                        "prompt=red,blue (Prompt S/R); the cells share their image's seed; grids in xyz*.png")
    p.add_argument("--dynamic", nargs="?", const="combinatorial", metavar="combinatorial|random:N",
                   help="prompts are templates ({red|blue}, __wildcard__): every variant (default), or N random "
                        "draws per prompt seeded by --seed")
    p.add_argument("--wildcards", metavar="DIR", help="__NAME__ in a dynamic prompt reads DIR/NAME.txt")
    p.add_argument("--yes", action="store_true",
                   help=f"run a sweep or dynamic job of more than {AUTHORED_LIMIT} images")
    p.add_argument("--dry-run", action="store_true",
                   help="print the job's size, sweep cells and prompts without loading the model or writing")
    p.add_argument("--lora-dir", type=Path, metavar="DIR",
                   help="LoRA files (NAME.safetensors) for <lora:NAME:WEIGHT> tags and loras fields")
    p.add_argument("--embeddings-dir", type=Path, metavar="DIR",
                   help="textual-inversion embeddings (NAME.pt, NAME.safetensors, A1111's or diffusers'), used where "
                        "a prompt names one")
    p.add_argument("--batch-size", type=_parse_batch_size, default=AUTO, metavar="N|auto",
                   help="most images per model call; auto (default): as many as memory allows")
    p.add_argument("--device", help="torch device (default: the engine's choice)")
    # None until run: --from takes the numeric path its PNG records unless these are given (_numeric_flags)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help=DTYPE_HELP)
    p.add_argument("--backend", choices=BACKENDS, default=None, help=BACKEND_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="replace images of a different job found in DIR instead of refusing")
    p.add_argument("--no-gallery", action="store_true", help="do not write DIR/index.html and DIR/grid.png")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on a Ray cluster: ADDRESS, else RAY_ADDRESS, else a running `ray start` cluster, else "
                        "a new local one (--ray local: always new); needs diffbatch[ray]")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="Ray: engine actors (default 1)")
    p.set_defaults(func=run_generate)
    g = subparsers.add_parser("gallery", help="write index.html and grid.png for an output folder")
    g.add_argument("folder", type=Path, metavar="DIR", help="a folder written by diffbatch generate")
    g.set_defaults(func=run_gallery)


class _SpecFlag(argparse.Action):
    """A spec field's flag (spec.EDGES): its value goes to ``args.spec_fields`` (field -> value)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        namespace.spec_fields = {**namespace.spec_fields, self.dest: values}


def _add_spec_flags(p: argparse.ArgumentParser) -> None:
    """One flag for each spec field that has one, typed by its kind; ``_flag_fields`` checks the values."""
    for name, edges in EDGES.items():
        if edges.flag is not None:
            p.add_argument(edges.flag, dest=name, action=_SpecFlag, type=PARSE[edges.kind],
                           default=argparse.SUPPRESS, metavar=edges.metavar, help=edges.help)
    p.set_defaults(spec_fields={})


def _parse_batch_size(text: str) -> BatchSize:
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        size = parse_int(text.strip(), "the batch size")
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is invalid: must be auto or an integer >= 1")
    return size


def _parse_size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_generate(args: argparse.Namespace) -> int:
    """Check everything, load the model, resolve every spec, and only then write. With ``--ray`` this process
    loads no weights: it resolves from the model's configuration, the workers load the model."""
    source = _job_source(args)
    if args.ray is not None and args.embeddings_dir is not None:
        raise UsageError("--embeddings-dir is not available with --ray yet (the workers load no embeddings)")
    if args.ray is not None:  # which cluster, checked before anything is written (one line if none answers)
        from .executors.ray import choose_cluster

        choose_cluster(args.ray or None)
    _check_out_dir(args.out)
    items = read_job(source)
    if args.dry_run:
        print(describe_job(items, source))
        return 0
    _recorded_numerics(args)
    engine = load_engine(args) if args.ray is None else None
    resolver = engine.resolver if engine is not None else load_resolver(args)
    if args.size is not None:
        _check_size_flag(args.size, resolver.defaults.vae_scale_factor)
    _check_default_sampler(args, resolver)
    specs = resolve_all(resolver, items)
    _check_from_hashes(args, resolver)
    hashes = image_hashes(s.image for s in specs)  # taken once, before any image is made from the files
    numerics = engine.numerics if engine is not None else ""  # --ray: unknown here; each worker's is recorded
    job = (resolver.model_name, args.overwrite, resolver.model_hash, hashes, numerics)
    plan_resume(args.out, specs, *job)  # a changed job: refused before any write
    _make_out_dir(args.out)
    with lock_folder(args.out):  # planned again under the lock: another run may have written meanwhile
        plan = plan_resume(args.out, specs, *job)
        _repair(args.out, plan)
        notes = {item.index: item.notes for item in items if item.notes}
        _execute(args, engine, resolver, specs, plan.todo, OutputWriter(args.out, resolver.model_name,
                                                                         resolver.model_hash, hashes, notes, numerics))
        if not args.no_gallery:
            write_gallery(args.out)
    print(f"diffbatch: wrote {len(plan.todo)} images and {MANIFEST} to {args.out}", file=sys.stderr)
    return 0


def _check_default_sampler(args: argparse.Namespace, resolver: Resolver | Engine) -> None:
    """``--from`` a PNG made with a model's own sampler: only the same sampler makes the same image."""
    label = getattr(args, "default_sampler", None)
    own = resolver.sampler_label(GenerationSpec(prompt=""))
    if label is not None and label != own:
        raise InputError(f"--from {args.from_image}: made with sampler {label}, but this model's own sampler is "
                         f"{own}; give --scheduler to choose one")


def run_gallery(args: argparse.Namespace) -> int:
    folder: Path = args.folder
    if not (folder / MANIFEST).is_file():
        raise InputError(f"{folder}: no {MANIFEST} in it (not a folder written by diffbatch generate)")
    write_gallery(folder)
    print(f"diffbatch: wrote {folder / INDEX_HTML} and {folder / GRID_PNG}", file=sys.stderr)
    return 0


def _job_source(args: argparse.Namespace) -> JobSource:
    if args.seed is not None:
        _check_flag("--seed", "seed", args.seed)
    if args.workers < 1:
        raise SpecError(f"--workers {args.workers} is invalid: must be an integer >= 1")
    if args.workers != 1 and args.ray is None:
        raise UsageError(f"--workers {args.workers} needs --ray (a local run has one engine)")
    if args.from_image is not None:
        source = _from_source(args)
        _numeric_flags(args)
        return source
    _numeric_flags(args)
    if args.vary_seed:
        raise UsageError("--vary-seed needs --from IMAGE (it varies that image's seed)")
    return JobSource(prompts_file=args.prompts_file, prompts=tuple(args.prompt), image=args.image,
                     images_per_prompt=args.images_per_prompt,
                     base_seed=args.seed if args.seed is not None else JOB_BASE_SEED,
                     defaults=_flag_fields(args), **_authoring(args))


def _authoring(args: argparse.Namespace) -> dict[str, Any]:
    """The JobSource fields of ``--sweep``, ``--dynamic``, ``--wildcards`` and ``--yes``."""
    if args.wildcards is not None and args.dynamic is None:
        raise UsageError("--wildcards needs --dynamic (wildcards are part of dynamic prompts)")
    if args.wildcards is not None and not Path(args.wildcards).is_dir():
        raise InputError(f"--wildcards {args.wildcards}: not a folder")
    dynamic = None if args.dynamic is None else parse_dynamic(args.dynamic, args.wildcards)
    return {"sweep": parse_sweep(args.sweep), "dynamic": dynamic, "limit": None if args.yes else AUTHORED_LIMIT}


def _from_source(args: argparse.Namespace) -> JobSource:
    """``--from IMAGE``: the PNG's settings, then the flags over them; its model unless ``--model`` is given
    (the embedded model's name means the embedded model). Sets ``args.model`` and ``args.default_sampler``."""
    if args.prompts_file is not None:
        raise UsageError("give a PROMPTS file or --from IMAGE, not both")
    found = read_infotext(args.from_image)
    where = f"--from {args.from_image}"
    flags = _flag_fields(args)  # a flag sets its field instead of the PNG's key
    found.ignore([*args.ignore, *(EDGES[name].key.name for name in flags if EDGES[name].key is not None)])
    if found.refused:
        raise InputError(refusal(where, found.refused, found.settings))
    if found.a1111 is not None:
        print(differs_note(where, found.a1111), file=sys.stderr)
    if found.image_hash and "image" in found.fields and not args.image:
        _check_from_image(args.from_image, found.fields["image"], found.image_hash)
    elif found.image_hash and "image" not in found.fields:  # A1111 keeps no init image, only its fingerprint
        _check_a1111_image(where, args.image, found.image_hash, "Init image hash" in args.ignore)
    # The PNG's model is checked when it is the one used (--model chooses another); an A1111 model hash is of its
    # checkpoint file, which a diffusers folder is not
    checked = args.model is None and found.a1111 is None and "Model hash" not in args.ignore
    args.from_hashes = {key: found.settings[key] for key in ("Model hash",) if checked and key in found.settings}
    for key in ("Lora hashes", "TI hashes"):
        if key in found.settings and key not in args.ignore:
            args.from_hashes[key] = found.settings[key]
    fields = {k: v for k, v in found.fields.items() if k not in ("prompt", "seed")}
    if found.a1111 is not None and "clip_skip" in fields and _is_sdxl(args.model or found.model):
        # A1111 writes its Clip skip setting into an SDXL image's PNG but applies none there (by default)
        print(f"diffbatch: {where}: Clip skip: {fields.pop('clip_skip')} is not applied: AUTOMATIC1111 applies no "
              "clip skip on SDXL models (give --clip-skip to apply one)", file=sys.stderr)
    fields.update(flags)
    if args.model is None and found.model not in (None, DEFAULT_MODEL):
        args.model = found.model
    args.default_sampler = found.default_sampler if "scheduler" not in fields else None
    args.recorded_numerics = found.numerics
    seed = args.seed if args.seed is not None else job_seed(found.fields.get("seed", JOB_BASE_SEED),
                                                            int(args.vary_seed))
    prompts = tuple(args.prompt) or (found.fields["prompt"],)
    return JobSource(prompts=prompts, prompts_from="--prompt" if args.prompt else f"--from {args.from_image}",
                     image=args.image, images_per_prompt=args.images_per_prompt, base_seed=seed,
                     defaults={k: v for k, v in fields.items() if not (k == "image" and args.image)},
                     **_authoring(args))


def _numeric_flags(args: argparse.Namespace) -> None:
    """``--dtype``, ``--backend`` and ``--device`` as given, else ``--from``'s recorded numeric path (checked when
    the model loads: ``_recorded_numerics``), else the defaults."""
    recorded: NumericPath | None = getattr(args, "recorded_numerics", None)
    if recorded is not None and (args.dtype, args.backend, args.device) != (None, None, None):
        args.recorded_numerics = None  # the user chose: their flags, the defaults for the rest
    elif recorded is not None:
        args.dtype, args.backend, args.device = recorded.dtype, recorded.backend, recorded.device
    args.dtype = args.dtype or AUTO_DTYPE
    args.backend = args.backend or "torch"


def _recorded_numerics(args: argparse.Namespace) -> None:
    """``--from`` a PNG made on a numeric path this machine lacks (a CUDA device, native bfloat16): say so, and
    run on this machine's default path instead (another image than the PNG's, said rather than silent)."""
    recorded: NumericPath | None = getattr(args, "recorded_numerics", None)
    if recorded is None or args.ray is not None:  # --ray: the workers' hardware decides, not this machine's
        return
    import torch

    from .hardware import missing_numerics

    lacking = missing_numerics(recorded)
    if lacking:
        print(f"diffbatch: --from {args.from_image}: made on {recorded}, but this machine {lacking}; making it on "
              "this machine's default dtype and device instead (the pixels will differ)", file=sys.stderr)
        args.dtype, args.device = AUTO_DTYPE, None
    elif recorded.device == "cpu" and torch.cuda.is_available():  # a GPU left idle: said, not silent
        print(f"diffbatch: --from {args.from_image}: making it on {recorded}, as it was made; give --device cuda "
              "(and --dtype) to make it on the GPU instead (other pixels)", file=sys.stderr)


def _is_sdxl(model: str | Path | None) -> bool:
    """Whether ``model`` is an SDXL pipeline, from its model_index.json (False where it cannot be read here)."""
    if model in (None, DEFAULT_MODEL):  # the embedded model is Stable Diffusion 1.x's layout
        return False
    from .adapters.hub import read_model_index

    try:
        return "XL" in str(read_model_index(os.fspath(model)).get("_class_name", ""))
    except Exception:  # noqa: BLE001 - a model that cannot be read fails later, with its own message
        return False


def _check_a1111_image(where: str, image: str | None, recorded: str, ignored: bool) -> None:
    """An AUTOMATIC1111 image-to-image PNG records its init picture by fingerprint only: ``--image`` gives it,
    and only the same picture makes the same image."""
    if image is None:
        raise InputError(f"{where}: made from an init image that A1111 does not keep (Init image hash {recorded}): "
                         "give it with --image FILE (its fingerprint is checked)")
    if ignored or not A1111_IMAGE_HASH.fullmatch(recorded):
        return
    from PIL import Image

    with Image.open(image) as picture:
        now = a1111_image_hash(picture)
    if recorded not in now:
        raise InputError(f"{where}: --image {image} is not the init image it was made from (Init image hash "
                         f"{recorded}, this one {sorted(now)[0]}); give --ignore 'Init image hash' to use it anyway")


def _check_from_hashes(args: argparse.Namespace, resolver: Resolver | Engine) -> None:
    """``--from`` a PNG that records the model's and the LoRAs' fingerprints: only the same files make the same
    image (``--ignore`` the key to use others)."""
    recorded: dict[str, str] = getattr(args, "from_hashes", {})
    if not recorded:
        return
    from .adapters.lora import file_hash

    where = f"--from {args.from_image}"
    model = recorded.get("Model hash")
    if model and resolver.model_hash and model != resolver.model_hash:
        raise InputError(f"{where}: made with model hash {model}, but this model's is {resolver.model_hash}; give "
                         "--ignore 'Model hash' to make it with this model anyway")
    for name, digest in lora_hashes(recorded.get("Lora hashes", "")):
        now = file_hash(resolver.lora_path(name))
        if now != digest:
            raise InputError(f"{where}: made with LoRA {name} of hash {digest}, but its file now has hash {now}; "
                             "give --ignore 'Lora hashes' to use it anyway")
    for name, digest in lora_hashes(recorded.get("TI hashes", "")):
        files = resolver.adapter.embeddings
        path = files.files().get(name.lower()) if files is not None else None
        now = file_hash(path) if path is not None else "no file in --embeddings-dir"
        if now != digest:
            raise InputError(f"{where}: made with the embedding {name} of hash {digest}, but here it has "
                             f"{now}; give --embeddings-dir, or --ignore 'TI hashes' to make it anyway")


def _check_from_image(png: Path, image: str, recorded: str) -> None:
    """``--from`` a PNG made from an init image: only the same content makes the same image."""
    now = image_hash(image, f"--from {png}: its init image")
    if now != recorded:
        raise InputError(f"--from {png}: its init image {image!r} has changed since (Init image hash {recorded}, "
                         f"now {now}); give --image to use a file anyway")


def _flag_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The spec fields the flags set, each checked on its own so an error names its flag."""
    fields: dict[str, Any] = dict(args.spec_fields)
    for field, value in fields.items():
        _check_flag(EDGES[field].flag, field, value)
    if args.size is not None:
        width, height = args.size
        _check_flag("--size", "width", width, shown=f"{width}x{height}")
        _check_flag("--size", "height", height, shown=f"{width}x{height}")
        fields.update(width=width, height=height)
    return fields


def _check_flag(flag: str, field: str, value: Any, shown: str | None = None) -> None:
    try:
        check_field(field, value)
    except SpecError as exc:
        raise SpecError(f"{flag} {shown or value} is invalid: {exc.reason}", field=field, value=value,
                        reason=exc.reason) from None


def _check_size_flag(size: tuple[int, int], vae_scale_factor: int) -> None:
    width, height = size
    try:
        check_size(GenerationSpec(prompt="", width=width, height=height), vae_scale_factor)
    except SpecError as exc:
        raise SpecError(f"--size {width}x{height} is invalid: {exc.reason}", field=exc.field, value=exc.value,
                        reason=exc.reason) from None


def _check_out_dir(out: Path) -> None:
    """Before the model loads: ``out`` is a folder, or can be made, and can be written to."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    folder = out
    while not folder.exists() and folder != folder.parent:  # the nearest folder that exists
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"--out {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        where = "" if folder == out else f" (in {folder})"
        raise InputError(f"--out {out}: cannot write there{where}: permission denied or a read-only file system")


def load_engine(args: argparse.Namespace) -> Engine:
    """The engine for ``--model`` (imported here: torch and diffusers load only when a job runs)."""
    from .engine import Engine

    with _quiet():
        return Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                                      max_batch_size=args.batch_size, lora_dir=args.lora_dir, lora_paths=True,
                                      embeddings_dir=args.embeddings_dir)


def load_resolver(args: argparse.Namespace) -> Resolver:
    """Defaults and checks of ``--model`` from its configuration files (the ``--ray`` driver: no weights)."""
    from .resolver import Resolver

    with _quiet():
        return Resolver.for_model(args.model, args.lora_dir, lora_paths=True, backend=args.backend)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    quiet_loading()
    with warnings.catch_warnings():  # library deprecation notes are not the user's business here
        warnings.simplefilter("ignore")
        yield


def resolve_all(resolver: Resolver | Engine, items: list[JobItem]) -> list[GenerationSpec]:
    """Every spec resolved against the model before the first image is written; errors name the line."""
    resolved = []
    for item in items:
        try:
            resolved.append(resolver.resolve(item.spec, item.spec.seed))
        except DiffbatchError as exc:
            raise type(exc)(f"{item.where}: {exc}") from None
    return resolved


def _make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create the folder: {exc.strerror}") from None


def _repair(out: Path, plan: ResumePlan) -> None:
    """Repair what a killed run left (cut manifest line, temp files); say what is skipped and what is made
    again because its file is not the one its manifest line describes."""
    apply_resume(out, plan)
    if plan.damaged:
        print(f"diffbatch: made again, as they are not the files their manifest lines describe (damaged or "
              f"replaced since written): {shown_names(plan.damaged)}", file=sys.stderr)
    if plan.done:
        print(f"diffbatch: resuming in {out}: skipped {plan.done} images already written, "
              f"{len(plan.todo)} to make", file=sys.stderr)


def _execute(args: argparse.Namespace, engine: Engine | None, resolver: Resolver | Engine,
             specs: list[GenerationSpec], todo: list[int], writer: OutputWriter) -> None:
    """Make the images ``todo`` (job indices) on ``engine``, or on Ray with ``--ray`` (``engine`` None), and
    write each as it finishes (``executors.base.run_job``)."""
    from .executors.base import run_job

    with writer, Progress(len(todo)) as progress:
        run_job(_executor(args, engine, resolver, writer), specs, todo, writer, progress.update)


def _executor(args: argparse.Namespace, engine: Engine | None, resolver: Resolver | Engine,
              writer: OutputWriter) -> Any:
    if engine is not None:
        from .executors.local import EngineLoop

        return EngineLoop(engine, log_errors=False)  # an error is raised here, as the command's own
    from .executors.ray import RayDataExecutor, RayOptions

    options = RayOptions(model=args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                         lora_dir=None if args.lora_dir is None else str(args.lora_dir), lora_paths=True,
                         batch_size=args.batch_size, address=args.ray or None, workers=args.workers,
                         model_name=resolver.model_name)
    return RayDataExecutor(options, writer.image_hash)


if __name__ == "__main__":
    sys.exit(main())
