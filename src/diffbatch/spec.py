"""GenerationSpec: the frozen statement of what a user asked for one image.

Validated once, at the edge (CLI parser, HTTP schema, Python API); the engine only sees resolved specs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .caching import METHODS, OFF, cache_ok
from .caching import RULE as CACHE_RULE
from .errors import SpecError, shown
from .hires import (
    DEFAULT_UPSCALER,
    HIRES_FIELDS,
    HIRES_STRENGTH,
    MAX_SCALE,
    UPSCALERS,
    hires_size,
    upscaler_label,
)
from .prompt_language import EMPHASES, EMPHASIS_RULE, NONE, ORIGINAL, has_syntax
from .samplers import SAMPLERS, SCHEDULE_NAMES, SCHEDULES
from .seeds import SEED_RULE, is_seed

MIN_SIDE, MAX_SIDE = 8, 4096
MAX_CLIP_SKIP = 12  # A1111's slider; a model's text encoder may have fewer layers (its adapter checks)


@dataclass(frozen=True)
class ModelDefaults:
    """What a model fills in for fields a spec leaves unset."""

    height: int = 512  # the model's native resolution
    width: int = 512
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    strength: float = 0.8  # img2img only
    vae_scale_factor: int = 8  # height and width must be multiples of this
    emphasis: str = ORIGINAL  # how prompts are read: A1111's language where the family's encoders are CLIP's


@dataclass(frozen=True)
class GenerationSpec:
    """One image request. ``None`` means "the model's default" (or a random seed)."""

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    image: Any = None  # init image for image-to-image: a PIL image or a path
    strength: float | None = None
    scheduler: str | None = None  # a name from diffbatch.samplers.SAMPLERS; None: the model's own
    guidance_rescale: float | None = None  # CFG rescale (Lin et al. 2023, sec. 3.4), 0 = off; for v-prediction
    # A variation (AUTOMATIC1111's subseed): the starting noise is slerp(variation_strength, noise of seed,
    # noise of variation_seed); strength 0 is exactly the seed's image. Both or neither.
    variation_seed: int | None = None
    variation_strength: float | None = None
    # LoRAs and their weights, as ((name, weight), ...) sorted by name; a mapping is accepted. Names are file
    # names in the engine's LoRA folder (a local run may give paths: Resolver). AUTOMATIC1111's
    # <lora:NAME:WEIGHT> tags in the prompt are taken out of it and added here at resolve time.
    loras: tuple[tuple[str, float], ...] = ()
    # Step caching (caching.py): off (every step computes the whole denoiser), auto, or METHOD:VALUE.
    cache: str = "off"
    # How the prompts are read (prompt_language.py): AUTOMATIC1111's language with its "Original" emphasis,
    # "no_norm", "ignore" (brackets parsed, weights dropped) or "none" (literally); None: the model's default
    # (original where its text encoders are CLIP's). Long prompts are encoded in chunks whatever the emphasis.
    emphasis: str | None = None
    # A1111's "Clip skip": 1 = the text encoder's last layer (the default), N = its N-th layer from the end;
    # diffusers' clip_skip N - 1 (applied, as diffusers does, to the prompt and not to the negative prompt).
    clip_skip: int | None = None
    # A1111's "Schedule type": the sampler's noise schedule (samplers.SCHEDULES: karras, exponential, beta,
    # sgm_uniform), where its diffusers scheduler takes it; None or "automatic": the sampler's own
    schedule: str | None = None
    # DDIM's eta (A1111's "Eta DDIM"): 0 (None) is deterministic DDIM, 1 DDPM-like; only samplers whose step takes it
    eta: float | None = None
    # Hires fix (hires.py): the text-to-image image upscaled by hires_scale (hires_upscaler: A1111's latent modes,
    # or a picture resize), then denoised again at the larger size from ``strength`` (A1111's "Denoising
    # strength", 0.7 by default here) for hires_steps steps (None or 0: num_inference_steps), as A1111 runs them
    hires_scale: float | None = None
    hires_steps: int | None = None
    hires_upscaler: str | None = None
    # ... with its own sampler and prompts where given (A1111's "Hires sampler", "Hires prompt", "Hires negative
    # prompt"); None: the first pass's
    hires_scheduler: str | None = None
    hires_prompt: str | None = None
    hires_negative_prompt: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "loras", _lora_pairs(self.loras))
        validate_fields(self)

    @property
    def is_img2img(self) -> bool:
        return self.image is not None

    def resolve(self, defaults: ModelDefaults, seed: int, image_size: tuple[int, int] | None = None
                ) -> GenerationSpec:
        """Fill every unset field; img2img takes its size from the init image (as diffusers does)."""
        height, width = self.height, self.width
        if image_size is not None:  # (width, height), rounded down to the VAE grid like diffusers
            f = defaults.vae_scale_factor
            width = width or image_size[0] // f * f
            height = height or image_size[1] // f * f
        resolved = dataclasses.replace(
            self,
            seed=self.seed if self.seed is not None else seed,
            num_inference_steps=self.num_inference_steps or defaults.num_inference_steps,
            guidance_scale=_first(self.guidance_scale, defaults.guidance_scale),
            guidance_rescale=_first(self.guidance_rescale, 0.0),
            height=height or defaults.height,
            width=width or defaults.width,
            strength=(_first(self.strength, defaults.strength) if self.is_img2img else
                      _first(self.strength, HIRES_STRENGTH) if self.hires_scale else self.strength),
            hires_upscaler=_first(self.hires_upscaler, DEFAULT_UPSCALER) if self.hires_scale else self.hires_upscaler,
            emphasis=_first(self.emphasis, defaults.emphasis),
            schedule=None if self.schedule == "automatic" else self.schedule,  # the sampler's own, one way
            # an empty hires prompt is the prompt, as in A1111 (its empty box)
            hires_prompt=self.hires_prompt or None, hires_negative_prompt=self.hires_negative_prompt or None,
            clip_skip=_first(self.clip_skip, 1),
        )
        check_size(resolved, defaults.vae_scale_factor)
        if (resolved.variation_seed is None) != (resolved.variation_strength is None):
            given, missing = (("variation_seed", "variation_strength") if resolved.variation_strength is None
                              else ("variation_strength", "variation_seed"))
            raise SpecError(f"{given} needs {missing} too (a variation is seed x variation_seed at a strength)",
                            field=missing, value=None, reason=f"required with {given}")
        _check_hires(resolved, defaults.vae_scale_factor)
        if resolved.is_img2img and int(resolved.num_inference_steps * resolved.strength) < 1:
            raise SpecError(f"strength={resolved.strength} with num_inference_steps={resolved.num_inference_steps} "
                            "leaves no denoising step: need num_inference_steps * strength >= 1", field="strength",
                            value=resolved.strength, reason="need num_inference_steps * strength >= 1")
        return resolved

    def prompt_texts(self) -> dict[str, tuple[str, int]]:
        """Each text a resolved spec's conditioning is encoded from, by field, with the clip skip it is encoded
        at (a negative prompt at none, as diffusers); the hires prompts where given."""
        texts = {"prompt": (self.prompt, self.clip_skip), "negative_prompt": (self.negative_prompt, 1),
                 "hires_prompt": (self.hires_prompt, self.clip_skip),
                 "hires_negative_prompt": (self.hires_negative_prompt, 1)}
        return {name: pair for name, pair in texts.items() if pair[0] is not None}

    def to_record(self) -> dict[str, Any]:
        """Plain JSON-able fields (the init image as its path, or ``"<image>"`` for in-memory ones)."""
        record = dataclasses.asdict(self)
        record["loras"] = [[name, weight] for name, weight in self.loras]  # as JSON reads it back
        if self.image is not None:
            record["image"] = os.fspath(self.image) if isinstance(self.image, str | os.PathLike) else "<image>"
        return record


FIELDS = tuple(f.name for f in dataclasses.fields(GenerationSpec))


def _check_hires(spec: GenerationSpec, factor: int) -> None:
    """Hires fix: text-to-image only, a second-pass size on the grid and within bounds, a step to run."""
    if spec.hires_scale is None:
        for name in HIRES_FIELDS[1:]:
            if getattr(spec, name) is not None:
                raise SpecError(f"{name} needs hires_scale (the hires fix's upscale)", field=name,
                                value=getattr(spec, name), reason="requires hires_scale")
        return
    if spec.is_img2img:
        raise SpecError("hires_scale: hires fix is for text-to-image (as A1111's); an init image is given",
                        field="hires_scale", value=spec.hires_scale, reason="text-to-image only")
    if "<lora:" in (spec.hires_prompt or ""):
        raise SpecError("hires_prompt: <lora:NAME:WEIGHT> tags go in the prompt (its LoRAs make both passes)",
                        field="hires_prompt", value=spec.hires_prompt, reason="no LoRA tags")
    height, width = hires_size(spec.height, spec.width, spec.hires_scale, factor)
    if not (MIN_SIDE <= min(height, width) and max(height, width) <= MAX_SIDE):
        raise SpecError(f"hires_scale={spec.hires_scale} makes {width}x{height}: a side must be from {MIN_SIDE} to "
                        f"{MAX_SIDE} pixels", field="hires_scale", value=spec.hires_scale,
                        reason=f"the upscaled size must be from {MIN_SIDE} to {MAX_SIDE} pixels a side")



class Kind(Enum):
    """A field's type at the edges: each edge maps it to its own (pydantic, form converter, argparse, OpenAPI)."""

    TEXT = "text"
    INT = "integer"
    NUMBER = "number"
    LORAS = "loras"  # LoRA name -> weight: a JSON object (a form field holds its JSON text)


# A value of each kind read from text (a CLI flag, a PNG infotext value, an edits-form field)
PARSE: dict[Kind, Callable[[str], Any]] = {Kind.TEXT: str, Kind.INT: int, Kind.NUMBER: float,
                                           Kind.LORAS: json.loads}


@dataclass(frozen=True)
class Key:
    """A field's AUTOMATIC1111 infotext key (io/writer.py writes ``Key: value``, io/infotext.py reads it back),
    written only when ``when(spec)``."""

    name: str
    when: Callable[[GenerationSpec], bool] = lambda spec: True
    write: Callable[[Any], str] | None = None  # the value as written, where it is not the kind's form
    read: Callable[[str], Any] | None = None  # and read back


BODY = "body"  # Edges.http: the generations JSON body and the edits form
EDITS = "edits"  # the edits form only


@dataclass(frozen=True)
class Edges:
    """How a field enters and leaves diffbatch. The HTTP body model and form, the OpenAPI descriptions, the CLI
    flags and the PNG's keys are built from this table (EDGES); anything else says how that edge sets it."""

    kind: Kind
    http: str = BODY  # BODY, EDITS, or how the API sets it otherwise
    flag: str | None = None  # the ``generate`` flag; None: ``no_flag`` says how the command line sets it
    metavar: str | None = None
    help: str | None = None
    no_flag: str = ""
    key: Key | None = None  # None: not a ``Key: value`` of its own (``no_key`` says how the PNG holds it)
    no_key: str = ""


CACHE_HELP = ("step caching: off (default: every step computes the whole denoiser), auto (the model's recommended "
              "method), or " + "; ".join(f"{m.name}:VALUE, {m.meaning}" for m in METHODS.values()))


def _variation(spec: GenerationSpec) -> bool:
    return spec.variation_seed is not None


def _emphasis_written(spec: GenerationSpec) -> bool:
    """``Emphasis`` when it is not A1111's default (Original); ``None`` only where a prompt has syntax it reads
    differently (the default of the families that read prompts literally, and A1111's rule)."""
    if spec.emphasis in (None, ORIGINAL):
        return False
    return spec.emphasis != NONE or has_syntax(spec.prompt) or has_syntax(spec.negative_prompt)


def _label_reader(labels: dict[str, str], unset: str | None = None) -> Callable[[str], Any]:
    """A key's value read back: A1111's label (``No norm``, ``SGM Uniform``) or the field's own value, case
    aside; ``unset``: the label that means the field is unset (``Automatic``); else the text in lower case, for
    the rule to refuse."""
    names = {label.lower(): name for name, label in labels.items()}

    def read(text: str) -> str | None:
        key = text.strip().lower()
        return None if key == unset else names.get(key, key)

    return read


def _read_sampler(label: str) -> str:
    """A1111's label (``DPM++ 2M``) or the sampler's own name; else the text, for the rule to refuse."""
    labels = {d.label.lower(): name for name, d in SAMPLERS.items()}
    return labels.get(label.strip().lower(), label.strip())


def _quote_text(text: str) -> str:
    """A prompt as a settings value: JSON-quoted, as A1111 quotes one with a comma, colon or quote in it."""
    return json.dumps(text, ensure_ascii=False)


def _schedule_label(name: str) -> str:
    return SCHEDULES[name].label if name in SCHEDULES else "Automatic"


# In A1111's order of the keys (io/writer.py places the settings that are no field's own between them).
EDGES: dict[str, Edges] = {
    "prompt": Edges(Kind.TEXT, http="OpenAI's own field (server/schemas.py)",
                    no_flag="--prompt TEXT (repeatable) or the PROMPTS file", no_key="the first lines"),
    "negative_prompt": Edges(Kind.TEXT, flag="--negative-prompt", metavar="TEXT", no_key="its 'Negative prompt:' line"),
    "num_inference_steps": Edges(Kind.INT, flag="--steps", metavar="N", help="inference steps (default: the model's)",
                                 key=Key("Steps")),
    "guidance_scale": Edges(Kind.NUMBER, flag="--guidance-scale", metavar="G", help="CFG scale; <= 1 disables CFG",
                            key=Key("CFG scale")),
    "seed": Edges(Kind.INT, no_flag="--seed BASE: image k of the job gets BASE + k", key=Key("Seed")),
    "height": Edges(Kind.INT, http="size (WxH)", no_flag="--size WxH", no_key="Size (WxH)"),
    "width": Edges(Kind.INT, http="size (WxH)", no_flag="--size WxH", no_key="Size (WxH)"),
    "image": Edges(Kind.TEXT, http="the edits' uploaded image", no_flag="--image PATH_OR_DIR (a folder pairs images "
                   "with prompts)", no_key="Init image (a path), Init image hash"),
    "strength": Edges(Kind.NUMBER, flag="--strength", metavar="S",
                      help="img2img strength in (0, 1]; with --hires-scale, the second pass's (default 0.7)",
                      key=Key("Denoising strength", lambda spec: spec.is_img2img or bool(spec.hires_scale))),
    "scheduler": Edges(Kind.TEXT, flag="--scheduler", metavar="NAME", help="sampler: " + ", ".join(SAMPLERS),
                       no_key="Sampler (its label; a model's own sampler as its class name)"),
    "guidance_rescale": Edges(Kind.NUMBER, flag="--guidance-rescale", metavar="R",
                              help="CFG rescale in [0, 1] (for v-prediction models); 0: off",
                              key=Key("CFG rescale", lambda spec: bool(spec.guidance_rescale))),
    "variation_seed": Edges(Kind.INT, flag="--variation-seed", metavar="V",
                            help="variation: mix in seed V's noise (A1111 subseed)",
                            key=Key("Variation seed", _variation)),
    "variation_strength": Edges(Kind.NUMBER, flag="--variation-strength", metavar="X",
                                help="variation strength in [0, 1]; 0: the seed's own image",
                                key=Key("Variation seed strength", _variation)),
    "loras": Edges(Kind.LORAS, no_flag="<lora:NAME:WEIGHT> tags in a prompt, or a .jsonl line's loras field",
                   no_key="<lora:NAME:WEIGHT> tags after the prompt, and Lora hashes"),
    "cache": Edges(Kind.TEXT, flag="--cache", metavar="off|auto|METHOD:VALUE", help=CACHE_HELP,
                   key=Key("Cache", lambda spec: spec.cache != OFF)),
    "emphasis": Edges(Kind.TEXT, flag="--emphasis", metavar="|".join(EMPHASES),
                      help="how prompts are read: AUTOMATIC1111's prompt language ((x:1.3), [x], BREAK) with its "
                      "Original emphasis (the default on CLIP models), no_norm, ignore (weights dropped), or none "
                      "(literally); prompts longer than the text encoder's window are encoded in chunks",
                      key=Key("Emphasis", _emphasis_written, write=lambda value: EMPHASES[value],
                              read=_label_reader(EMPHASES))),
    "schedule": Edges(Kind.TEXT, flag="--schedule", metavar="|".join(SCHEDULE_NAMES),
                      help="the sampler's noise schedule, as A1111's Schedule type (where the sampler takes it)",
                      key=Key("Schedule type", lambda spec: spec.schedule not in (None, "automatic"),
                              write=_schedule_label,
                              read=_label_reader({n: s.label for n, s in SCHEDULES.items()}, "automatic"))),
    "eta": Edges(Kind.NUMBER, flag="--eta", metavar="E", help="DDIM's eta in [0, 1] (default 0)",
                 key=Key("Eta DDIM", lambda spec: bool(spec.eta))),
    "hires_scale": Edges(Kind.NUMBER, flag="--hires-scale", metavar="X",
                         help=f"hires fix: upscale the image by X (up to {MAX_SCALE:g}) and denoise it again at that "
                         "size with --strength (default 0.7)",
                         key=Key("Hires upscale", lambda spec: bool(spec.hires_scale))),
    "hires_steps": Edges(Kind.INT, flag="--hires-steps", metavar="N",
                         help="hires fix: the second pass's steps (default: --steps)",
                         key=Key("Hires steps", lambda spec: bool(spec.hires_steps))),
    "hires_upscaler": Edges(Kind.TEXT, flag="--hires-upscaler", metavar="NAME",
                            help="hires fix: " + ", ".join(UPSCALERS) + f" (default {DEFAULT_UPSCALER})",
                            key=Key("Hires upscaler", lambda spec: bool(spec.hires_scale), write=upscaler_label,
                                    read=_label_reader({n: u.label for n, u in UPSCALERS.items()}))),
    "hires_scheduler": Edges(Kind.TEXT, flag="--hires-scheduler", metavar="NAME",
                             help="hires fix: the second pass's sampler (default: --scheduler)",
                             key=Key("Hires sampler", lambda spec: spec.hires_scheduler is not None,
                                     write=lambda name: SAMPLERS[name].label, read=_read_sampler)),
    "hires_prompt": Edges(Kind.TEXT, flag="--hires-prompt", metavar="TEXT",
                          help="hires fix: the second pass's prompt (default: the prompt)",
                          key=Key("Hires prompt", lambda spec: spec.hires_prompt is not None, write=_quote_text)),
    "hires_negative_prompt": Edges(Kind.TEXT, flag="--hires-negative-prompt", metavar="TEXT",
                                   help="hires fix: the second pass's negative prompt (default: the negative prompt)",
                                   key=Key("Hires negative prompt", lambda spec: spec.hires_negative_prompt is not None,
                                           write=_quote_text)),
    "clip_skip": Edges(Kind.INT, flag="--clip-skip", metavar="N",
                       help="A1111's Clip skip: 1 = the text encoder's last layer (default), 2 = the one before...",
                       key=Key("Clip skip", lambda spec: (spec.clip_skip or 1) > 1)),
}


def _lora_pairs(value: Any) -> Any:
    """A mapping or pairs, as sorted ``((name, weight), ...)``; anything else is left for the rule to refuse."""
    if isinstance(value, dict):
        value = list(value.items())
    if isinstance(value, list | tuple) and all(isinstance(p, list | tuple) and len(p) == 2 for p in value):
        return tuple(sorted((name, weight) for name, weight in value))
    return value


def _loras_ok(value: Any) -> bool:
    return isinstance(value, tuple) and all(
        isinstance(name, str) and name.strip() and not set(name) & set("<>:") and _is_number(weight)
        for name, weight in value) and len({name for name, _ in value}) == len(value)


def _first(value: Any, default: Any) -> Any:
    return default if value is None else value


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise SpecError(field=field, value=value, reason=allowed)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)) and math.isfinite(value)


def _optional(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or ok(value)


def _side(value: Any) -> bool:
    return _is_int(value) and MIN_SIDE <= value <= MAX_SIDE


# Each field's own rule: (accepts the value, what is allowed). Size against the model's grid is check_size's.
TEXT_RULE = "must be a string without NUL characters or lone surrogates (a PNG's text chunk cannot hold them)"


def _text(value: Any) -> bool:
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. JSON's "\ud800"
        return False
    return True


FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "prompt": (_text, TEXT_RULE),
    "negative_prompt": (_text, TEXT_RULE),
    "seed": (_optional(is_seed), SEED_RULE),
    "num_inference_steps": (_optional(lambda v: _is_int(v) and v >= 1), "must be an integer >= 1"),
    "guidance_scale": (_optional(lambda v: _is_number(v) and v >= 0), "must be a number >= 0"),
    "guidance_rescale": (_optional(lambda v: _is_number(v) and 0 <= v <= 1), "must be in [0, 1]"),
    "strength": (_optional(lambda v: _is_number(v) and 0 < v <= 1), "must be in (0, 1]"),
    "scheduler": (_optional(lambda v: isinstance(v, str) and v in SAMPLERS), "must be one of " + ", ".join(SAMPLERS)),
    "variation_seed": (_optional(is_seed), SEED_RULE),
    "variation_strength": (_optional(lambda v: _is_number(v) and 0 <= v <= 1), "must be in [0, 1]"),
    "image": (_optional(lambda v: isinstance(v, str | os.PathLike) or (hasattr(v, "convert") and hasattr(v, "size"))
                        or len(getattr(v, "shape", ())) == 4), "must be a path or an image"),  # (or latents: hires)
    "loras": (_loras_ok, "must map LoRA names (no < > :) to finite weights, each name once"),
    "cache": (cache_ok, CACHE_RULE),
    "emphasis": (_optional(lambda v: v in EMPHASES), EMPHASIS_RULE),
    "schedule": (_optional(lambda v: v in SCHEDULE_NAMES), "must be one of " + ", ".join(SCHEDULE_NAMES)),
    "eta": (_optional(lambda v: _is_number(v) and 0 <= v <= 1), "must be in [0, 1]"),
    "hires_scale": (_optional(lambda v: _is_number(v) and 0 < v <= MAX_SCALE), f"must be in (0, {MAX_SCALE:g}]"),
    "hires_steps": (_optional(lambda v: _is_int(v) and 0 <= v <= 10_000), "must be an integer >= 0 (0: --steps)"),
    "hires_upscaler": (_optional(lambda v: v in UPSCALERS), "must be one of " + ", ".join(UPSCALERS)),
    "hires_scheduler": (_optional(lambda v: isinstance(v, str) and v in SAMPLERS),
                        "must be one of " + ", ".join(SAMPLERS)),
    "hires_prompt": (_optional(_text), TEXT_RULE),
    "hires_negative_prompt": (_optional(_text), TEXT_RULE),
    "clip_skip": (_optional(lambda v: _is_int(v) and 1 <= v <= MAX_CLIP_SKIP),
                  f"must be an integer from 1 to {MAX_CLIP_SKIP}"),
    "height": (_optional(_side), f"must be an integer from {MIN_SIDE} to {MAX_SIDE} pixels"),
    "width": (_optional(_side), f"must be an integer from {MIN_SIDE} to {MAX_SIDE} pixels"),
}


def check_field(field: str, value: Any) -> None:
    """Raise ``SpecError(field, value, reason)`` if ``value`` breaks the field's own rule (the CLI checks
    each flag with it, so its error names the flag)."""
    accepts, allowed = FIELD_RULES[field]
    _require(accepts(value), field, value, allowed)


def validate_fields(spec: GenerationSpec) -> None:
    """Check each field on its own; size against the model's grid comes at resolve time."""
    for field in FIELD_RULES:
        check_field(field, getattr(spec, field))


def check_size(spec: GenerationSpec, vae_scale_factor: int) -> None:
    for name in ("height", "width"):
        value = getattr(spec, name)
        _require(value % vae_scale_factor == 0 and MIN_SIDE <= value <= MAX_SIDE, name, value,
                 f"must be a multiple of {vae_scale_factor} (the model's VAE scale factor) "
                 f"from {MIN_SIDE} to {MAX_SIDE} pixels")


SIZE = re.compile(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*")


def parse_size(text: str) -> tuple[int, int]:
    """The one ``WxH`` parser (CLI ``--size``, the API's ``size``): ``"512x768"`` -> ``(512, 768)`` as
    (width, height). Only the form is checked here; the bounds are ``check_size``'s."""
    match = SIZE.fullmatch(text)
    if match is None:
        raise SpecError(f"size {shown(text)} is invalid: use WIDTHxHEIGHT, e.g. 512x512", field="size", value=text,
                        reason="use WIDTHxHEIGHT, e.g. 512x512")
    return int(match[1]), int(match[2])


def without_nulls(record: dict[str, Any]) -> dict[str, Any]:
    """A JSON record with its nulls left out: a null field means the field's default (``"cache": null`` is
    ``off``), as if it were not given; ``prompt`` stays (a null prompt is refused by name)."""
    return {key: value for key, value in record.items() if value is not None or key == "prompt"}


def spec_from_record(record: dict[str, Any], where: str = "spec") -> GenerationSpec:
    """Build a spec from a JSON object, naming ``where`` (e.g. ``prompts.jsonl:3``) in any error."""
    if not isinstance(record, dict):
        raise SpecError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}",
                        field=unknown[0], value=record[unknown[0]], reason=f"allowed: {', '.join(FIELDS)}")
    if "prompt" not in record:
        raise SpecError(f"{where}: missing field 'prompt'", field="prompt", reason="required")
    try:
        return GenerationSpec(**without_nulls(record))
    except SpecError as exc:
        raise SpecError(f"{where}: {exc}", field=exc.field, value=exc.value, reason=exc.reason) from None
