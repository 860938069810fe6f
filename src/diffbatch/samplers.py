"""Sampler names users pick per request, mapped to diffusers scheduler classes.

Pure data: no torch import, so the spec layer can validate names cheaply.
"""

from __future__ import annotations

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
}


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
