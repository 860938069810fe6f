"""Hires fix, as AUTOMATIC1111 names it: a text-to-image request made at its size, upscaled by ``hires_scale``,
then denoised again as image-to-image at the larger size from ``strength`` (A1111's "Denoising strength"), for
``hires_steps`` steps (the first pass's count when unset), with the request's seed again.

The steps are A1111's: it runs exactly N = ``hires_steps`` steps, the last N of a schedule of ``int(N /
strength)`` (``setup_img2img_steps``). The exact result (tests/test_hires.py): diffusers' text-to-image for the
request (``output_type="latent"`` for a latent upscaler, else its picture), the upscale, then diffusers'
image-to-image with a generator seeded with the request's seed, the upscaled latents (or picture) as its image,
``num_inference_steps`` that schedule and a strength that starts it N steps from the end (``second_pass``). In
the engine the second pass is the same request continuing: its rows join the running batch at the larger size
(runner.py ``_decode``).

No torch at import, and no import of the spec layer, which reads the upscaler names from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

GenerationSpec = Any  # spec.GenerationSpec: the spec layer imports this module, not the other way round

HIRES_STRENGTH = 0.7  # A1111's default denoising strength for hires fix
MAX_SCALE = 8.0


@dataclass(frozen=True)
class Upscaler:
    label: str  # as A1111 writes it in "Hires upscaler"
    mode: str  # torch.nn.functional.interpolate's mode on latents, or PIL's resampling filter on pictures
    antialias: bool = False
    latent: bool = True


# A1111's latent upscale modes (shared.latent_upscale_modes) and its PIL upscalers
UPSCALERS: dict[str, Upscaler] = {
    "latent": Upscaler("Latent", "bilinear"),
    "latent_antialiased": Upscaler("Latent (antialiased)", "bilinear", antialias=True),
    "latent_bicubic": Upscaler("Latent (bicubic)", "bicubic"),
    "latent_bicubic_antialiased": Upscaler("Latent (bicubic antialiased)", "bicubic", antialias=True),
    "latent_nearest": Upscaler("Latent (nearest)", "nearest"),
    "latent_nearest_exact": Upscaler("Latent (nearest-exact)", "nearest-exact"),
    "lanczos": Upscaler("Lanczos", "LANCZOS", latent=False),
    "nearest": Upscaler("Nearest", "NEAREST", latent=False),
}
DEFAULT_UPSCALER = "latent"  # A1111's default
def upscaler_label(name: str) -> str:
    return UPSCALERS[name].label if name in UPSCALERS else name


def hires_size(height: int, width: int, scale: float, factor: int) -> tuple[int, int]:
    """The second pass's (height, width): the size times the scale, cut to the VAE grid (as A1111's latent
    upscale does: the latents are ``size // factor``)."""
    return int(height * scale) // factor * factor, int(width * scale) // factor * factor


def run_steps(spec: GenerationSpec) -> int:
    """The steps the second pass runs: ``hires_steps``, or (unset, or 0 as A1111 writes it) the first pass's."""
    return spec.hires_steps or spec.num_inference_steps


def second_pass_steps(spec: GenerationSpec) -> tuple[int, float]:
    """(diffusers' ``num_inference_steps``, ``strength``) that run A1111's hires pass: the last N steps of a
    schedule of ``int(N / strength)`` (A1111 caps the strength at 0.999 there); the strength given to diffusers
    is one that makes its ``int(steps * strength)`` exactly N (N + 0.5 over the schedule, at most 1)."""
    steps = run_steps(spec)
    schedule = int(steps / min(spec.strength, 0.999))
    return schedule, min(1.0, (steps + 0.5) / schedule)


# The spec fields of a hires request's second pass; None in the second pass itself (it has none of its own)
HIRES_FIELDS = ("hires_scale", "hires_steps", "hires_upscaler", "hires_scheduler", "hires_prompt",
                "hires_negative_prompt")


def second_pass(spec: GenerationSpec, image: Any, factor: int) -> GenerationSpec:
    """The image-to-image request a hires request continues as: ``image`` the upscaled picture or latents, at
    the larger size, A1111's steps (``second_pass_steps``), its hires sampler and prompts where it has them."""
    height, width = hires_size(spec.height, spec.width, spec.hires_scale, factor)
    steps, strength = second_pass_steps(spec)
    return dataclasses.replace(
        spec, image=image, height=height, width=width, num_inference_steps=steps, strength=strength,
        scheduler=spec.hires_scheduler or spec.scheduler,
        prompt=spec.prompt if spec.hires_prompt is None else spec.hires_prompt,
        negative_prompt=spec.negative_prompt if spec.hires_negative_prompt is None else spec.hires_negative_prompt,
        **dict.fromkeys(HIRES_FIELDS))


def upscale_latents(latents: Any, spec: GenerationSpec, factor: int) -> Any:
    """A1111's latent upscale: ``interpolate`` to the second pass's latent size in the upscaler's mode."""
    import torch

    upscaler = UPSCALERS[spec.hires_upscaler]
    height, width = hires_size(spec.height, spec.width, spec.hires_scale, factor)
    return torch.nn.functional.interpolate(latents, size=(height // factor, width // factor), mode=upscaler.mode,
                                           antialias=upscaler.antialias)


def upscale_picture(pixels: Any, spec: GenerationSpec, factor: int) -> Any:
    """A pixel upscale: the first pass's picture as diffusers gives it (uint8, ``numpy_to_pil``), resized by PIL."""
    from PIL import Image

    height, width = hires_size(spec.height, spec.width, spec.hires_scale, factor)
    picture = Image.fromarray((pixels * 255).round().astype("uint8"))
    return picture.resize((width, height), getattr(Image.Resampling, UPSCALERS[spec.hires_upscaler].mode))
