"""Stable Diffusion 1.x / 2.x (UNet2DConditionModel, one CLIP text encoder, AutoencoderKL)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..spec import GenerationSpec, ModelDefaults
from . import step_cache
from .base import Adapter, Cond
from .clip_prompts import ClipPrompts, Encoder
from .hub import from_pretrained


class StableDiffusionAdapter(ClipPrompts, Adapter):
    family = "stable-diffusion"
    cache_methods = ("deepcache",)
    # Measured on the embedded model (benchmarks/RESULTS.md, "Step caching"): PSNR >= 30 dB against the uncached
    # image with DDIM at deepcache:5, with Euler ancestral at deepcache:3
    auto_cache, auto_cache_stochastic = "deepcache:5", "deepcache:3"

    @classmethod
    def load_pipeline(cls, model: str, dtype: torch.dtype) -> Any:
        from diffusers import StableDiffusionPipeline


        # No safety checker: the engine returns what the model makes (diffbatch is a batch tool, not a filter).
        return from_pretrained(StableDiffusionPipeline, model, dtype, safety_checker=None,
                               requires_safety_checker=False)

    @property
    def defaults(self) -> ModelDefaults:
        size = self.config.component("unet")["sample_size"] * self.vae_scale_factor
        return ModelDefaults(height=size, width=size, vae_scale_factor=self.vae_scale_factor)

    def latent_shape(self, spec: GenerationSpec) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (1, self.config.component("unet")["in_channels"], spec.height // f, spec.width // f)

    def encode_prompts(self, texts: list[str], negative: bool = False, clip_skip: int = 1) -> list[Cond]:
        # diffusers encodes the negative prompt exactly like a prompt (clip skip aside), so one cache serves both;
        # a clip skip goes by windows() (clip_prompts.py)
        embeds, _ = self.pipe.encode_prompt(texts, self.device, 1, False)
        return [{"encoder_hidden_states": e[None]} for e in embeds]  # [1, L, D]

    def uses_cfg(self, spec: GenerationSpec) -> bool:
        """As diffusers decides it: guidance > 1, and never on an LCM-distilled UNet, which takes the guidance as
        an embedding instead (one row a step)."""
        return super().uses_cfg(spec) and self.config.component("unet").get("time_cond_proj_dim") is None

    def request_cond(self, text_cond: Cond, spec: GenerationSpec, negative: bool = False) -> Cond:
        """An LCM-distilled UNet (``time_cond_proj_dim``) takes the guidance as an embedding, per row, as
        diffusers' pipelines compute it (``guidance_scale - 1``)."""
        dim = self.config.component("unet").get("time_cond_proj_dim")
        if dim is None:
            return text_cond
        w = torch.tensor([spec.guidance_scale - 1.0])
        embedding = self.pipe.get_guidance_scale_embedding(w, embedding_dim=dim).to(self.device, self.dtype)
        return {**text_cond, "timestep_cond": embedding}  # [1, dim]

    def encoders(self) -> list[Encoder]:
        return [Encoder(self.pipe.tokenizer, self.pipe.text_encoder)]

    def select_hidden(self, index: int, out: Any, clip_skip: int) -> torch.Tensor:
        """As ``encode_prompt``: the last hidden state, or the ``clip_skip``-th from the end, normalised."""
        if clip_skip == 1:
            return out[0]
        encoder = self.pipe.text_encoder  # transformers 5's CLIPTextModel has its layers at the top
        return getattr(encoder, "text_model", encoder).final_layer_norm(out.hidden_states[-clip_skip])

    def encode_images(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        vae = self.pipe.vae
        params = vae.encode(pixels.to(self.device, self.dtype)).latent_dist.parameters  # [B, 2C, h, w]
        # Sample per item, as diffusers does for one image: each draw from that item's own generator.
        latents = [DiagonalGaussianDistribution(params[i : i + 1]).sample(g) for i, g in enumerate(generators)]
        return vae.config.scaling_factor * torch.cat(latents)

    def unet_kwargs(self, cond: Cond) -> dict[str, Any]:
        """The UNet's conditioning arguments for a batched ``cond``."""
        return cond

    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.denoiser(sample, timesteps, **self.unet_kwargs(cond), return_dict=False)[0]

    def denoise_keeping_deep(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond
                             ) -> dict[str, torch.Tensor]:
        captured: list[torch.Tensor] = []
        with step_cache.capture(self.denoiser, captured):
            out = self.denoise(sample, timesteps, cond)
        return {"out": out, "deep": captured[0]}

    def denoise_shallow(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond,
                        deep: torch.Tensor) -> torch.Tensor:
        return step_cache.shallow_forward(self.denoiser, sample, timesteps, deep, **self.unet_kwargs(cond))

    def decode(self, latents: torch.Tensor, spec: GenerationSpec) -> np.ndarray:
        vae = self.pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * len(image))

