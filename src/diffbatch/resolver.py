"""Resolver: what a spec becomes on a model (its defaults filled in, a seed drawn) and whether the model can
run it, and the per-request samplers. It needs the model's configuration, never its weights, so a process
that only plans a job (the ``--ray`` driver) resolves exactly as the engines that run it."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import diffusers

from .adapters import Adapter
from .adapters.loading import describe
from .caching import canonical_cache
from .errors import SpecError, shown
from .hires import run_steps, second_pass
from .io.images import init_image_size
from .samplers import AUTOMATIC, SAMPLERS, sampler_label, schedule_options, schedules_of, step_params
from .seeds import random_seed
from .spec import GenerationSpec, ModelDefaults

# AUTOMATIC1111's <lora:NAME:WEIGHT>, with the blanks before it (they leave the prompt with the tag). A run of
# blanks is tried from its first blank only (the look-behind) and no part gives back what it took: as plain
# \s*<lora:..., every blank of a long run was a new start that scanned the rest of it (quadratic: a 150 KB prompt
# of "<lora:" and blanks took 122 s).
LORA_TAG = re.compile(r"(?<!\s)\s*+<lora:([^:<>]++)(?::([^:<>]*+))?+>")
MAX_LORA_NAME = 200  # characters: a file name, with room to spare
SAMPLER_CHECKS = 4096  # (sampler, schedule, steps, strength) answers kept


class Resolver:
    def __init__(self, adapter: Adapter, lora_dir: str | os.PathLike | None = None, lora_paths: bool = False) -> None:
        """``lora_dir``: the folder LoRA names are files of. ``lora_paths``: a LoRA may also be named by its file's
        path, anywhere (a local ``generate``, whose user owns the files; never a server, whose clients could then
        load or probe any file)."""
        self.adapter = adapter
        self.lora_dir = None if lora_dir is None else Path(lora_dir)
        self.lora_paths = lora_paths
        self._prototypes: dict[tuple[str | None, str | None], Any] = {}
        # (sampler, schedule, steps, img2img strength) -> "" where the sampler runs them, else why not
        self._sampler_errors: dict[tuple[str | None, str | None, int, float | None], str] = {}

    @classmethod
    def for_model(cls, model: str | os.PathLike | None, lora_dir: str | os.PathLike | None = None,
                  lora_paths: bool = False, backend: str = "torch") -> Resolver:
        """From the model's JSON files alone (``None``: the embedded model), for the models run by ``backend``."""
        return cls(describe(model, backend), lora_dir, lora_paths)

    @property
    def model_name(self) -> str:
        return self.adapter.name

    @property
    def model_hash(self) -> str:
        """The weights' fingerprint (adapters/hub.py ``model_fingerprint``): manifests, PNGs, resume."""
        return self.adapter.fingerprint

    @property
    def defaults(self) -> ModelDefaults:
        return self.adapter.defaults

    def sampler_label(self, spec: GenerationSpec) -> str:
        return sampler_label(spec.scheduler, self.adapter.default_scheduler_class.__name__)

    def resolve(self, spec: GenerationSpec, seed: int | None = None) -> GenerationSpec:
        """Fill defaults (``seed`` when the spec has none; random if both are None) and check the result."""
        image_size = init_image_size(spec.image) if spec.is_img2img else None
        seed = random_seed() if seed is None else seed
        resolved = self._take_lora_tags(spec).resolve(self.defaults, seed, image_size)
        for name, _ in resolved.loras:
            self.lora_path(name)
        if resolved.loras:
            self.adapter.layers.require("lora", "loras", dict(resolved.loras))
        # auto made concrete, and one text for one setting: the PNG records what ran
        cache = canonical_cache(self.adapter.resolve_cache(resolved))
        if cache != resolved.cache:
            resolved = dataclasses.replace(resolved, cache=cache)
        self.adapter.check_spec(resolved)
        self.check_sampler(resolved)
        return resolved

    def lora_path(self, name: str) -> Path:
        """A LoRA's file: ``NAME.safetensors`` in the LoRA folder, NAME a file name there (no folder, no ``..``);
        with ``lora_paths``, also ``name`` itself when it is a .safetensors file."""
        if self.lora_paths:
            return self._local_lora_path(name)
        path = self.lora_dir / f"{name}.safetensors" if self.lora_dir is not None and _is_file_name(name) else None
        if path is None or not _is_safetensors_file(path):
            # One message, whatever the name is or points at: it shows no path and tells no one which files exist.
            raise SpecError(f"loras: unknown LoRA {shown(name)}: not a LoRA in the LoRA folder (a LoRA is named by "
                            "its file name there, without .safetensors)", field="loras", value=name,
                            reason="unknown LoRA")
        return path.resolve()  # links followed: the folder and its links are the operator's

    def _local_lora_path(self, name: str) -> Path:
        candidates = [self.lora_dir / f"{name}.safetensors"] if self.lora_dir is not None else []
        candidates.append(Path(name).expanduser())
        for path in candidates:
            if _is_safetensors_file(path):
                return path.resolve()
        where = (f"not in --lora-dir {self.lora_dir}" if self.lora_dir is not None
                 else "no LoRA folder was given (--lora-dir)")
        raise SpecError(f"loras: unknown LoRA {shown(name)}: not a .safetensors file, and {where}",
                        field="loras", value=name, reason="unknown LoRA")

    @staticmethod
    def _take_lora_tags(spec: GenerationSpec) -> GenerationSpec:
        """``<lora:NAME:WEIGHT>`` tags out of the prompt (weight 1 when left out), into ``loras``."""
        if "<lora:" not in spec.prompt:
            return spec
        loras = dict(spec.loras)
        for name, weight in LORA_TAG.findall(spec.prompt):
            try:
                loras[name] = float(weight) if weight.strip() else 1.0
            except ValueError:
                raise SpecError(f"prompt: the <lora:NAME:WEIGHT> tag of LoRA {shown(name)} has a weight that is not "
                                f"a number: {shown(weight)}", field="prompt", value=spec.prompt,
                                reason="malformed <lora:NAME:WEIGHT> tag") from None
        prompt = LORA_TAG.sub("", spec.prompt).strip()
        if "<lora:" in prompt:
            raise SpecError(f"prompt: a malformed <lora:NAME:WEIGHT> tag in {shown(spec.prompt)}", field="prompt",
                            value=spec.prompt, reason="malformed <lora:NAME:WEIGHT> tag")
        return dataclasses.replace(spec, prompt=prompt, loras=loras)

    def check_sampler(self, spec: GenerationSpec) -> None:
        """Raise ``SpecError`` now, at admission, if the sampler cannot run this many steps (PNDM needs 4+
        without skip_prk_steps): a failure inside a batched step would take the whole batch down."""
        self._check_schedule(spec)
        self._check_steps(spec, "num_inference_steps", spec.num_inference_steps)
        if spec.hires_scale:  # its second pass too (hires.py), as the engine will run it
            steps = run_steps(spec)
            trained = int(self.adapter.scheduler_config.get("num_train_timesteps", 1000))
            if steps > 0.999 * trained:  # no strength makes A1111's schedule, int(steps / strength), short enough
                raise SpecError(f"hires_steps={steps}: more than the model's {trained} training steps allow (at "
                                f"most {int(0.999 * trained)})", field="hires_steps", value=steps,
                                reason=f"at most {int(0.999 * trained)}")
            if steps > min(spec.strength, 0.999) * trained:  # A1111's schedule, int(steps / strength), past them
                raise SpecError(f"strength={spec.strength} with {steps} hires steps makes a schedule of more than the "
                                f"model's {trained} training steps: give a strength of at least {steps / trained:g}",
                                field="strength", value=spec.strength, reason=f"at least {steps / trained:g}")
            second = second_pass(spec, "(the upscaled image)", self.adapter.vae_scale_factor)
            self._check_schedule(second)
            self._check_steps(second, "hires_steps", steps)

    def _check_steps(self, spec: GenerationSpec, field: str, value: Any) -> None:
        key = (spec.scheduler, spec.schedule, spec.num_inference_steps, spec.strength if spec.is_img2img else None)
        if key not in self._sampler_errors:
            try:
                sampler = self.make_sampler(spec.scheduler, spec.schedule)
                timesteps = self.adapter.set_timesteps(sampler, spec)
                table = getattr(sampler, "alphas_cumprod", None)  # samplers that index it by timestep
                if table is not None and len(timesteps) and int(timesteps.max()) >= len(table):
                    raise ValueError(f"timestep {int(timesteps.max())} is past the model's {len(table)} training "
                                     "timesteps (fewer steps, or another sampler)")
                self._sampler_errors[key] = ""
            except Exception as exc:  # noqa: BLE001 - diffusers raises assorted errors for unsupported counts
                self._sampler_errors[key] = f"{type(exc).__name__}: {exc}"
            if len(self._sampler_errors) > SAMPLER_CHECKS:  # keyed by strengths too: kept bounded
                del self._sampler_errors[next(iter(self._sampler_errors))]
        if self._sampler_errors[key]:
            name = spec.scheduler or self.adapter.default_scheduler_class.__name__
            raise SpecError(f"scheduler={name} cannot run {field}={value}: {self._sampler_errors[key]}", field=field,
                            value=value, reason=self._sampler_errors[key])

    def _check_schedule(self, spec: GenerationSpec) -> None:
        """A schedule and an eta only where the spec's sampler takes them (refused naming the field)."""
        sampler_class = self.sampler_class(spec.scheduler)
        name = spec.scheduler or sampler_class.__name__
        options = schedule_options(spec.schedule)
        own = {k for k, v in (SAMPLERS[spec.scheduler].options if spec.scheduler else {}).items() if v is True}
        if options and own and set(options) != own:  # dpm++_2m_karras is Karras already
            raise SpecError(f"schedule={spec.schedule}: sampler {name} has its own schedule; give its plain sampler "
                            "with this schedule", field="schedule", value=spec.schedule,
                            reason=f"sampler {name} has its own schedule")
        if options and spec.schedule not in schedules_of(sampler_class):
            raise SpecError(f"schedule={spec.schedule}: sampler {name} has no such schedule (it takes: "
                            f"{', '.join([AUTOMATIC, *schedules_of(sampler_class)])})", field="schedule",
                            value=spec.schedule, reason=f"not available for sampler {name}")
        if spec.eta and "eta" not in step_params(sampler_class):
            raise SpecError(f"eta={spec.eta}: sampler {name} takes no eta (DDIM does)", field="eta", value=spec.eta,
                            reason=f"sampler {name} takes no eta")

    def sampler_class(self, name: str | None) -> type:
        return self.adapter.default_scheduler_class if name is None else getattr(diffusers, SAMPLERS[name].class_name)

    def make_sampler(self, name: str | None, schedule: str | None = None) -> Any:
        """A fresh sampler: a copy of a never-used prototype (``from_config`` costs ~1 ms of signature parsing)."""
        key = (name, schedule)
        if key not in self._prototypes:
            options = {} if name is None else dict(SAMPLERS[name].options)
            options.update(schedule_options(schedule))
            self._prototypes[key] = self.sampler_class(name).from_config(self.adapter.scheduler_config, **options)
        return copy.deepcopy(self._prototypes[key])


def _is_file_name(name: str) -> bool:
    """A name that can only mean a file directly in a folder: not empty or long, no separator, no ``..``, no NUL."""
    return 0 < len(name) <= MAX_LORA_NAME and not set(name) & set("/\\\0") and ".." not in name


def _is_safetensors_file(path: Path) -> bool:
    try:
        return path.suffix == ".safetensors" and path.is_file()
    except OSError:  # a name too long for the file system, say: no such file
        return False
