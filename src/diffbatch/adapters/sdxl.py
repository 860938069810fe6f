"""Stable Diffusion XL: base (text-to-image, image-to-image) and refiner (image-to-image, aesthetic score).

What SDXL adds to SD 1.x: two CLIP text encoders whose hidden states are concatenated, a pooled embedding from
the second (``text_embeds``), and per-image micro-conditioning ``time_ids`` (original size, crop corner, target
size; the refiner puts an aesthetic score in place of the target size). The fp16 VAE overflows, so diffusers
runs it in float32 (``force_upcast``); we keep it there.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..errors import SpecError
from ..spec import GenerationSpec, ModelDefaults
from .base import Cond
from .clip_prompts import Encoder
from .config import PipelineConfig
from .hub import from_pretrained, read_model_index
from .stable_diffusion import StableDiffusionAdapter

IMG2IMG_CLASS = "StableDiffusionXLImg2ImgPipeline"


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    family = "stable-diffusion-xl"
    # diffusers' StableDiffusionXLImg2ImgPipeline defaults; there is no per-request field for them (yet).
    aesthetic_score: ClassVar[float] = 6.0
    negative_aesthetic_score: ClassVar[float] = 2.5

    def __init__(self, config: PipelineConfig, name: str, pipe: Any = None, invariant: bool = True,
                 backend: str = "torch") -> None:
        super().__init__(config, name, pipe, invariant, backend)
        # Conditioned on an aesthetic score instead of the target size: trained for image-to-image only.
        self.is_refiner = bool(config.index.get("requires_aesthetics_score", False))
        if pipe is not None:
            self._upcast_vae(pipe.vae)

    @staticmethod
    def _upcast_vae(vae: Any) -> None:
        # diffusers upcasts a float16 VAE with ``force_upcast`` for every encode and decode; upcasting it once
        # gives the same numbers without converting weights back and forth on each call.
        if vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(torch.float32)

    @classmethod
    def load_pipeline(cls, model: str, dtype: torch.dtype) -> Any:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline


        # A refiner folder is saved as the img2img pipeline, often without the first text encoder.
        img2img = read_model_index(model).get("_class_name") == IMG2IMG_CLASS
        pipeline_class = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
        return from_pretrained(pipeline_class, model, dtype, add_watermarker=False)

    # Properties ------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        encoder = self.pipe.text_encoder_2  # diffusers casts prompt embeddings to its dtype
        return (self.pipe.unet if encoder is None else encoder).dtype

    @property
    def defaults(self) -> ModelDefaults:
        size = self.config.component("unet")["sample_size"] * self.vae_scale_factor
        # diffusers' SDXL guidance default; a refiner polishes an image, so it changes little of it by default.
        return ModelDefaults(height=size, width=size, guidance_scale=5.0, strength=0.3 if self.is_refiner else 0.8,
                             vae_scale_factor=self.vae_scale_factor)

    def check_spec(self, spec: GenerationSpec) -> None:
        super().check_spec(spec)
        if self.is_refiner and not spec.is_img2img:
            raise SpecError(f"model {self.name!r} is an SDXL refiner, which only does image-to-image: give an init "
                            "image (--image, or a spec's image field), or use an SDXL base model for text-to-image",
                            field="image", reason="required by an SDXL refiner")

    # Conditioning ----------------------------------------------------------------------------------------
    def encode_prompts(self, texts: list[str], negative: bool = False, clip_skip: int = 1) -> list[Cond]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(texts, device=self.device, do_classifier_free_guidance=False,
                                                       clip_skip=clip_skip - 1 or None)
        conds = [{"encoder_hidden_states": e[None], "text_embeds": p[None]}
                 for e, p in zip(embeds, pooled, strict=True)]
        if negative and self.pipe.config.force_zeros_for_empty_prompt:
            # diffusers zeroes the unconditional embeddings when no negative prompt is given (ours: "").
            conds = [_zeros(c) if not t else c for t, c in zip(texts, conds, strict=True)]
        return conds  # encoder_hidden_states [1, L, D1 + D2], text_embeds [1, P]

    def encoders(self) -> list[Encoder]:
        pipe = self.pipe  # a refiner has the second encoder only
        pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
        return [Encoder(tokenizer, model) for tokenizer, model in pairs if model is not None]

    def select_hidden(self, index: int, out: Any, clip_skip: int) -> torch.Tensor:
        """As ``encode_prompt``: the penultimate hidden state, ``clip_skip - 1`` more from the end, unnormalised."""
        return out.hidden_states[-(clip_skip + 1)]

    def join_windows(self, rows: dict[str, torch.Tensor], windows: Any, emphasis: str) -> Cond:
        cond = super().join_windows(rows, windows, emphasis)
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "text_embeds": cond["pooled"]}

    def request_cond(self, text_cond: Cond, spec: GenerationSpec, negative: bool = False) -> Cond:
        return {**super().request_cond(text_cond, spec, negative), "time_ids": self._time_ids(spec, negative)}

    def _time_ids(self, spec: GenerationSpec, negative: bool) -> torch.Tensor:
        """``_get_add_time_ids``: original size = target size = the image's size, crop corner (0, 0)."""
        size = (spec.height, spec.width)
        if self.is_refiner:
            last: tuple[float, ...] = (self.negative_aesthetic_score if negative else self.aesthetic_score,)
        else:
            last = size
        return torch.tensor([[*size, 0, 0, *last]], dtype=self.dtype, device=self.device)  # [1, 6] (refiner: 5)

    # Sampling --------------------------------------------------------------------------------------------
    def set_timesteps(self, sampler: Any, spec: GenerationSpec) -> Any:
        timesteps = super().set_timesteps(sampler, spec)
        if not spec.is_img2img and hasattr(sampler, "set_begin_index"):
            sampler.set_begin_index(0)  # as StableDiffusionXLPipeline does before its loop
        return timesteps

    # Model calls -----------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        with self._vae_for_encoding() as vae:
            # Pixels pass through the model dtype first, as in diffusers (float16 rounding, then upcast).
            pixels = pixels.to(self.device, self.dtype).to(vae.dtype)
            params = vae.encode(pixels).latent_dist.parameters  # [B, 2C, h, w]
            latents = [DiagonalGaussianDistribution(params[i : i + 1]).sample(g) for i, g in enumerate(generators)]
        latents = torch.cat(latents).to(self.dtype)  # [B, C, h, w]
        mean, std = self._latent_stats(latents)
        if mean is None:
            return vae.config.scaling_factor * latents
        return (latents - mean) * vae.config.scaling_factor / std

    @contextmanager
    def _vae_for_encoding(self) -> Any:
        """diffusers encodes in float32 whenever ``force_upcast`` is set (a bfloat16 VAE too), then casts back."""
        vae = self.pipe.vae
        dtype = vae.dtype
        upcast = vae.config.force_upcast and dtype != torch.float32
        if upcast:
            vae.to(torch.float32)
        try:
            yield vae
        finally:
            if upcast:
                vae.to(dtype)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The VAE's per-channel latent mean and std (``[1, C, 1, 1]``), where its config has them."""
        config = self.pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return None, None
        return tuple(torch.tensor(v).view(1, -1, 1, 1).to(like.device, like.dtype) for v in (mean, std))

    def unet_kwargs(self, cond: Cond) -> dict[str, Any]:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        extra = {"timestep_cond": cond["timestep_cond"]} if "timestep_cond" in cond else {}  # LCM-distilled
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "added_cond_kwargs": added, **extra}

    def decode(self, latents: torch.Tensor, spec: GenerationSpec) -> np.ndarray:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)  # float32 when upcast (see __init__)
        mean, std = self._latent_stats(latents)
        if mean is None:
            latents = latents / vae.config.scaling_factor
        else:
            latents = latents * std / vae.config.scaling_factor + mean
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * len(image))


def _zeros(cond: Cond) -> Cond:
    return {key: torch.zeros_like(value) for key, value in cond.items()}
