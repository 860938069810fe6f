"""Sampler names users pick per request, mapped to diffusers scheduler classes.

Pure data: no torch import, so the spec layer can validate names cheaply.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplerDef:
    class_name: str  # diffusers scheduler class
    options: dict[str, Any] = field(default_factory=dict)  # overrides applied to the model's config
    label: str = ""  # A1111-style display name for the PNG ``parameters`` chunk


SAMPLERS: dict[str, SamplerDef] = {
    "ddim": SamplerDef("DDIMScheduler", {}, "DDIM"),
    "pndm": SamplerDef("PNDMScheduler", {}, "PLMS"),
    "lms": SamplerDef("LMSDiscreteScheduler", {}, "LMS"),
    "euler": SamplerDef("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": SamplerDef("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": SamplerDef("HeunDiscreteScheduler", {}, "Heun"),
    "dpm++_2m": SamplerDef("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}, "DPM++ 2M"),
    "dpm++_2m_karras": SamplerDef(
        "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"
    ),
    "unipc": SamplerDef("UniPCMultistepScheduler", {}, "UniPC"),
    # A1111's k-diffusion samplers that diffusers has a scheduler for (diffusers' table of A1111 equivalents)
    "dpm++_2m_sde": SamplerDef("DPMSolverMultistepScheduler",
                               {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}, "DPM++ 2M SDE"),
    "dpm2": SamplerDef("KDPM2DiscreteScheduler", {}, "DPM2"),
    "dpm2_a": SamplerDef("KDPM2AncestralDiscreteScheduler", {}, "DPM2 a"),
    # Few-step samplers (issue 36): latent consistency (LCM-LoRA, LCM-distilled models) and TCD (its eta is
    # TCD's gamma, 0 unless given, as StableDiffusionPipeline passes it)
    "lcm": SamplerDef("LCMScheduler", {}, "LCM"),
    "tcd": SamplerDef("TCDScheduler", {}, "TCD"),
}

# A1111's samplers diffusers has no scheduler for, and why (io/infotext.py refuses them by name)
MISSING = {
    "DPM++ SDE": "diffusers' DPMSolverSDEScheduler draws its noise from a Brownian tree seeded apart from the request",
    "DPM++ 2S a": "diffusers has no DPM++ 2S ancestral sampler",
    "DPM++ 3M SDE": "diffusers has no DPM++ 3M sampler",
    "DPM fast": "diffusers has no DPM fast sampler",
    "DPM adaptive": "diffusers has no adaptive DPM sampler",
    "Restart": "diffusers has no Restart sampler",
}


@dataclass(frozen=True)
class Schedule:
    """A noise schedule A1111 names (its ``Schedule type``) and the diffusers scheduler option that gives it."""

    label: str
    option: str  # a scheduler config key
    value: Any


# The ``schedule`` field's values; "automatic" (or unset) is the sampler's own, as A1111's "Automatic"
SCHEDULES: dict[str, Schedule] = {
    "karras": Schedule("Karras", "use_karras_sigmas", True),
    "exponential": Schedule("Exponential", "use_exponential_sigmas", True),
    "beta": Schedule("Beta", "use_beta_sigmas", True),
    "sgm_uniform": Schedule("SGM Uniform", "timestep_spacing", "trailing"),
}
AUTOMATIC = "automatic"
SCHEDULE_NAMES = (AUTOMATIC, *SCHEDULES)


@functools.cache
def schedules_of(sampler_class: type) -> tuple[str, ...]:
    """The schedules a diffusers scheduler class takes: those whose option is a key of its config."""
    params = inspect.signature(sampler_class.__init__).parameters
    return tuple(name for name, schedule in SCHEDULES.items() if schedule.option in params)


@functools.cache
def step_params(sampler_class: type) -> frozenset[str]:
    """The arguments a diffusers scheduler's ``step`` takes (``eta``, ``generator``, ...)."""
    return frozenset(inspect.signature(sampler_class.step).parameters)


def schedule_taken(sampler: str, schedule: str | None) -> bool:
    """Whether the named sampler's diffusers scheduler takes the schedule (the sampler's own always)."""
    import diffusers

    return schedule in (None, AUTOMATIC) or schedule in schedules_of(getattr(diffusers, SAMPLERS[sampler].class_name))


def schedule_options(schedule: str | None) -> dict[str, Any]:
    """The scheduler config options a schedule sets ({} for the sampler's own)."""
    if schedule in (None, AUTOMATIC):
        return {}
    found = SCHEDULES[schedule]
    return {found.option: found.value}


def sampler_label(name: str | None, default_class: str) -> str:
    """Display name for a sampler; the model's own scheduler shows as its class name."""
    if name is None:
        return default_class
    return SAMPLERS[name].label


def is_stochastic(class_name: str, config: dict[str, Any] | None = None) -> bool:
    """Whether a diffusers scheduler draws fresh noise at every step: the ancestral and SDE ones (by class name,
    or a DPM-Solver configured with an SDE ``algorithm_type``)."""
    algorithm = str((config or {}).get("algorithm_type", ""))
    return "Ancestral" in class_name or "SDE" in class_name or "sde" in algorithm
