"""Flux.1 (FluxTransformer2DModel, CLIP pooled + T5, packed latents, guidance embedding, flow matching).

Requests hold packed latents ``[1, (h/2)(w/2), 4C]`` (2x2 latent patches as tokens). Guidance-distilled models
(``guidance_embeds``, FLUX.1-dev) take the guidance scale as an input: one row per image, no CFG rows; the
scale rides in the conditioning, so rows of one call can have different scales. diffusers' ``true_cfg_scale``
(real CFG with a negative prompt, for undistilled fine-tunes) is not supported: a negative prompt is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ..errors import SpecError
from ..prompt_language import NONE
from ..spec import GenerationSpec, ModelDefaults
from .base import Cond, warn_cut
from .flow_match import FlowMatchAdapter
from .hub import from_pretrained

DEFAULT_SAMPLE_SIZE = 128  # latent pixels: FluxPipeline's fixed default_sample_size (1024 px images)


class FluxAdapter(FlowMatchAdapter):
    clip_skip = False  # FluxPipeline.encode_prompt takes none
    family = "flux"
    max_sequence_length = 512  # T5 tokens: FluxPipeline's default

    @classmethod
    def load_pipeline(cls, model: str, dtype: torch.dtype) -> Any:
        from diffusers import FluxPipeline


        return from_pretrained(FluxPipeline, model, dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.text_encoder_2.dtype  # latents run in the T5 prompt embeddings' dtype

    @property
    def defaults(self) -> ModelDefaults:
        f = self.vae_scale_factor
        # Sizes are multiples of twice the VAE factor: 2x2 latent patches (diffusers would silently round down).
        return ModelDefaults(height=DEFAULT_SAMPLE_SIZE * f, width=DEFAULT_SAMPLE_SIZE * f,
                             num_inference_steps=28, guidance_scale=3.5, strength=0.6, vae_scale_factor=2 * f,
                             emphasis=NONE)

    def _latent_grid(self, spec: GenerationSpec) -> tuple[int, int, int]:
        """Unpacked latent ``(C, h, w)`` as FluxPipeline.prepare_latents computes it."""
        f = self.vae_scale_factor
        channels = self.config.component("transformer")["in_channels"] // 4
        return channels, 2 * (spec.height // (2 * f)), 2 * (spec.width // (2 * f))

    def latent_shape(self, spec: GenerationSpec) -> tuple[int, ...]:
        c, h, w = self._latent_grid(spec)
        return (1, (h // 2) * (w // 2), 4 * c)

    def check_spec(self, spec: GenerationSpec) -> None:
        super().check_spec(spec)
        if spec.negative_prompt:
            raise SpecError(f"negative_prompt={spec.negative_prompt!r} is invalid for flux model {self.name!r}: "
                            "FluxPipeline uses a negative prompt only for true CFG (true_cfg_scale), which "
                            "diffbatch does not support; leave negative_prompt empty", field="negative_prompt",
                            value=spec.negative_prompt, reason="must be empty for Flux")

    def uses_cfg(self, spec: GenerationSpec) -> bool:
        return False  # FluxPipeline never runs CFG rows from guidance_scale (an embedding input, or unused)

    # Conditioning ----------------------------------------------------------------------------------------
    def encode_prompts(self, texts: list[str], negative: bool = False, clip_skip: int = 1) -> list[Cond]:
        warn_cut(texts, self.pipe.tokenizer_2, self.max_sequence_length, "Flux's T5 text encoder")
        embeds, pooled, _ = self.pipe.encode_prompt(texts, None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)  # [B, L, D], [B, P]
        return [{"encoder_hidden_states": e[None], "pooled_projections": p[None]}
                for e, p in zip(embeds, pooled, strict=True)]

    def request_cond(self, text_cond: Cond, spec: GenerationSpec, negative: bool = False) -> Cond:
        """Per row: the image's token positions (``img_ids``, shared by all rows of a call: the planner batches
        one latent shape) and, for guidance-distilled models, its guidance scale."""
        _, h, w = self._latent_grid(spec)
        img_ids = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype)  # [S, 3]
        cond = {**text_cond, "img_ids": img_ids[None]}  # [1, S, 3]
        if self.pipe.transformer.config.guidance_embeds:
            cond["guidance"] = torch.full([1], spec.guidance_scale, device=self.device, dtype=torch.float32)
        return cond

    # Sampling --------------------------------------------------------------------------------------------
    def initial_noise(self, spec: GenerationSpec, generator: torch.Generator) -> torch.Tensor:
        return self._pack(self.noise((1, *self._latent_grid(spec)), generator, spec))

    def schedule_kwargs(self, sampler: Any, spec: GenerationSpec) -> dict[str, Any]:
        """FluxPipeline's schedule: sigmas 1 .. 1/steps, shifted by ``mu``, which grows with the token count."""
        steps, config = spec.num_inference_steps, sampler.config
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if not spec.is_img2img and config.get("use_flow_sigmas"):  # as FluxPipeline (its img2img has no such check)
            sigmas = None
        mu = calculate_shift(self.latent_shape(spec)[1], config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        return {"sigmas": sigmas, "mu": mu} if sigmas is not None else {"num_inference_steps": steps, "mu": mu}

    def noise_init_latents(self, sampler: Any, latents: torch.Tensor, generator: torch.Generator,
                           timesteps: torch.Tensor, spec: GenerationSpec) -> torch.Tensor:
        return self._pack(super().noise_init_latents(sampler, latents, generator, timesteps, spec))  # unpacked in

    # Model calls -----------------------------------------------------------------------------------------
    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.denoiser(
            hidden_states=sample, timestep=timesteps.to(sample.dtype) / 1000, guidance=cond.get("guidance"),
            pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=self._txt_ids(cond), img_ids=cond["img_ids"][0], return_dict=False)[0]

    def _txt_ids(self, cond: Cond) -> torch.Tensor:
        text = cond["encoder_hidden_states"]  # [N, L, D]
        return torch.zeros(text.shape[1], 3, device=self.device, dtype=self.dtype)  # as encode_prompt: zeros

    def embed(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.denoiser  # FluxTransformer2DModel.forward (diffusers 0.42), up to its blocks
        hidden = model.x_embedder(sample)
        timestep = (timesteps.to(sample.dtype) / 1000).to(hidden.dtype) * 1000  # as ``denoise`` then the forward
        guidance = cond.get("guidance")
        pooled = cond["pooled_projections"]
        temb = (model.time_text_embed(timestep, pooled) if guidance is None
                else model.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled))
        return hidden, model.context_embedder(cond["encoder_hidden_states"]), temb

    def blocks(self) -> list[Any]:
        return [*self.denoiser.transformer_blocks, *self.denoiser.single_transformer_blocks]

    def block_kwargs(self, cond: Cond) -> dict[str, Any]:
        ids = torch.cat((self._txt_ids(cond), cond["img_ids"][0]), dim=0)
        return {"image_rotary_emb": self.denoiser.pos_embed(ids)}

    def finish(self, hidden: torch.Tensor, temb: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return self.denoiser.proj_out(self.denoiser.norm_out(hidden, temb))

    def decode(self, latents: torch.Tensor, spec: GenerationSpec) -> np.ndarray:
        unpacked = self.pipe._unpack_latents(latents, spec.height, spec.width, self.vae_scale_factor)
        return self.decode_latents(unpacked)  # [B, H, W, 3]

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)  # [B, C, h, w] -> [B, (h/2)(w/2), 4C]
