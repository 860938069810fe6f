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
from .base import Adapter, Cond


class FlowMatchAdapter(Adapter):
    """Base of the SD3 and Flux adapters; a family supplies its schedule (``schedule_kwargs``) and its forward in
    stages (``embed``, ``blocks``, ``block_kwargs``, ``finish``) for First-Block-Cache."""

    cache_methods = ("fbcache",)
    # ParaAttention's recommended First-Block-Cache threshold for FLUX.1-dev (about 1.5-2x there); not measured
    # here: no SD3 or Flux weights on this machine (README, "Step caching").
    auto_cache = auto_cache_stochastic = "fbcache:0.08"

    def check_spec(self, spec: GenerationSpec) -> None:
        super().check_spec(spec)
        if spec.hires_scale:
            raise SpecError(f"hires_scale: {self.family} models run no hires fix here (Stable Diffusion 1.x/2.x and "
                            "SDXL do)", field="hires_scale", value=spec.hires_scale, reason=f"not on {self.family}")
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

    # Model calls in stages (First-Block-Cache, step_cache.py) ------------------------------------------------
    @abstractmethod
    def embed(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward up to its first block: ``(hidden [N, S, D], text [N, L, D], temb [N, D])``."""

    @abstractmethod
    def blocks(self) -> list[Any]:
        """The transformer blocks in forward order; each maps ``(hidden, text, temb, **block_kwargs)`` to
        ``(text, hidden)``."""

    def block_kwargs(self, cond: Cond) -> dict[str, Any]:
        """What every block takes besides ``hidden``, ``text`` and ``temb`` (Flux: the rotary embedding)."""
        return {}

    @abstractmethod
    def finish(self, hidden: torch.Tensor, temb: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The forward after its last block: output norm, projection (SD3: unpatchify to ``sample``'s size)."""

    def denoise_first(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> dict[str, torch.Tensor]:
        """Stage 1: the embeddings and the first block, with its residual (``probe``)."""
        hidden, text, temb = self.embed(sample, timesteps, cond)
        text_out, first = self._run(self.blocks()[:1], hidden, text, temb, cond)
        text = text if text_out is None else text_out  # None: the first block is the last (SD3's has no text out)
        return {"hidden": first, "text": text, "temb": temb, "probe": first - hidden}

    def denoise_rest(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond, hidden: torch.Tensor,
                     text: torch.Tensor, temb: torch.Tensor, tail: torch.Tensor | None = None
                     ) -> dict[str, torch.Tensor]:
        """Stage 2 from stage 1's carry: the other blocks (``tail`` None) or, reused, ``hidden + tail``; the
        output and what the other blocks added (``tail``). Stage 1 then 2 runs the forward's own operations."""
        if tail is None:
            _, last = self._run(self.blocks()[1:], hidden, text, temb, cond)
            tail = last - hidden
        else:
            last = hidden + tail
        return {"out": self.finish(last, temb, sample), "tail": tail}

    def _run(self, blocks: list[Any], hidden: torch.Tensor, text: torch.Tensor, temb: torch.Tensor, cond: Cond
             ) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = self.block_kwargs(cond)
        for block in blocks:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb, **kwargs)
        return text, hidden

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
