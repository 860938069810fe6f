"""What the flow-matching families (SD3, Flux) share: sampler, strength cut, img2img noising, VAE, admission.

Both pipelines sample with a rectified-flow scheduler (Esser et al. 2024, "Scaling Rectified Flow Transformers",
sec. 2): ``x_t = (1 - sigma) x_0 + sigma * noise``, the model predicts the velocity ``noise - x_0``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..errors import SpecError
from ..spec import GenerationSpec
from .base import Adapter


class FlowMatchAdapter(Adapter):
    """Base of the SD3 and Flux adapters; a family supplies its schedule (``schedule_kwargs``)."""

    def check_spec(self, spec: GenerationSpec) -> None:
        if spec.scheduler is not None:
            raise SpecError(f"scheduler={spec.scheduler!r} is invalid for {self.family} model {self.name!r}: it "
                            f"samples with flow matching ({self.default_scheduler_class.__name__}), which the "
                            "Stable Diffusion samplers cannot run; leave scheduler unset", field="scheduler",
                            value=spec.scheduler, reason="must be unset for flow-matching models")
        if spec.guidance_rescale:
            raise SpecError(f"guidance_rescale={spec.guidance_rescale} is invalid for {self.family} model "
                            f"{self.name!r}: its diffusers pipeline has no guidance rescale; leave it at 0",
                            field="guidance_rescale", value=spec.guidance_rescale, reason="must be 0 here")

    # Sampling --------------------------------------------------------------------------------------------
    @abstractmethod
    def schedule_kwargs(self, sampler: Any, spec: GenerationSpec) -> dict[str, Any]:
        """The family pipeline's ``retrieve_timesteps`` arguments (step count or sigmas, shift ``mu``)."""

    def set_timesteps(self, sampler: Any, spec: GenerationSpec) -> Any:
        """The family's schedule, then the img2img cut of StableDiffusion3Img2ImgPipeline.get_timesteps (Flux
        copies it): unlike SD's, it rounds ``steps * (1 - strength)`` down, not ``steps * strength``."""
        sampler.set_timesteps(device=self.device, **self.schedule_kwargs(sampler, spec))
        steps = spec.num_inference_steps
        strength = spec.strength if spec.is_img2img else 1.0
        t_start = int(max(steps - min(steps * strength, steps), 0)) * sampler.order
        sampler.set_begin_index(t_start)
        return sampler.timesteps[t_start:]

    def noise_init_latents(self, sampler: Any, latents: torch.Tensor, generator: torch.Generator,
                           timesteps: torch.Tensor, spec: GenerationSpec) -> torch.Tensor:
        """Flow matching mixes noise in linearly (``scale_noise``) where SD samplers ``add_noise``."""
        return sampler.scale_noise(latents, timesteps[:1], self.noise(tuple(latents.shape), generator, spec))

    # VAE -------------------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        vae = self.pipe.vae
        params = vae.encode(pixels.to(self.device, self.dtype)).latent_dist.parameters  # [B, 2C, h, w]
        # Sample per item, as diffusers does for one image: each draw from that item's own generator.
        latents = torch.cat([DiagonalGaussianDistribution(params[i : i + 1]).sample(g)
                             for i, g in enumerate(generators)])  # [B, C, h, w]
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Unshifted, unscaled VAE decode of ``[B, C, h, w]`` latents to ``[B, H, W, 3]`` pixels in [0, 1]."""
        vae = self.pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * len(image))
