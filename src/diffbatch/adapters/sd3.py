"""Stable Diffusion 3 / 3.5 (SD3Transformer2DModel MMDiT, CLIP-L + CLIP-G + optional T5, flow matching)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from ..spec import GenerationSpec, ModelDefaults
from .base import Cond, warn_cut
from .clip_prompts import ClipPrompts, Encoder, Windows
from .flow_match import FlowMatchAdapter
from .hub import from_pretrained, read_model_index
from .invariance import run_in_calls


class StableDiffusion3Adapter(ClipPrompts, FlowMatchAdapter):
    """A1111's prompt language on its two CLIP encoders (clip_prompts.py: chunks of 75 tokens, weights, clip
    skip); its T5 encoder reads the prompt with the language's syntax taken out, up to ``max_sequence_length``
    tokens, as diffusers' ``encode_prompt`` reads a prompt (said in one line where it cuts one)."""

    family = "stable-diffusion-3"
    max_sequence_length = 256  # T5 tokens: StableDiffusion3Pipeline's default

    @classmethod
    def load_pipeline(cls, model: str, dtype: torch.dtype) -> Any:
        from diffusers import StableDiffusion3Pipeline


        # A pipeline saved without T5 (model_index.json entries null) loads only when told so; diffusers then
        # feeds zeros in place of the T5 embeddings.
        index = read_model_index(model)
        absent = {name: None for name in ("text_encoder_3", "tokenizer_3") if index.get(name, [None])[0] is None}
        return from_pretrained(StableDiffusion3Pipeline, model, dtype, **absent)

    @property
    def defaults(self) -> ModelDefaults:
        size = self.config.component("transformer").get("sample_size", 128) * self.vae_scale_factor
        # Latents are cut into patch_size^2 patches, so sizes are multiples of both factors (as check_inputs).
        return ModelDefaults(height=size, width=size, num_inference_steps=28, guidance_scale=7.0, strength=0.6,
                             vae_scale_factor=self.vae_scale_factor * self.patch_size)

    @property
    def patch_size(self) -> int:
        return self.config.component("transformer").get("patch_size", 2)  # as StableDiffusion3Pipeline

    def latent_shape(self, spec: GenerationSpec) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (1, self.config.component("transformer")["in_channels"], spec.height // f, spec.width // f)

    # Conditioning ----------------------------------------------------------------------------------------
    def encode_prompts(self, texts: list[str], negative: bool = False, clip_skip: int = 1) -> list[Cond]:
        warn_cut(texts, self.pipe.tokenizer_3, self.max_sequence_length, "SD3's T5 text encoder")
        # Without clip_skip, diffusers encodes a negative prompt exactly like a prompt: one cache serves both.
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            texts, None, None, device=self.device, do_classifier_free_guidance=False,
            clip_skip=clip_skip - 1 or None, max_sequence_length=self.max_sequence_length)  # [B, 77 + 256, D], [B, P]
        return [{"encoder_hidden_states": e[None], "pooled_projections": p[None]}
                for e, p in zip(embeds, pooled, strict=True)]

    def encoders(self) -> list[Encoder]:
        pipe = self.pipe
        return [Encoder(pipe.tokenizer, pipe.text_encoder), Encoder(pipe.tokenizer_2, pipe.text_encoder_2)]

    def select_hidden(self, index: int, out: Any, clip_skip: int) -> torch.Tensor:
        """As ``_get_clip_prompt_embeds``: the penultimate hidden state, ``clip_skip - 1`` more from the end."""
        return out.hidden_states[-(clip_skip + 1)]

    def join_windows(self, rows: dict[str, torch.Tensor], windows: Windows, emphasis: str) -> Cond:
        """As ``encode_prompt`` joins them: the CLIP chunks' states padded to T5's width, then T5's; the pooled
        outputs of both CLIP encoders (the first chunk's)."""
        cond = super().join_windows(rows, windows, emphasis)
        t5 = self._t5(windows.text)  # [1, max_sequence_length, D]
        clip = cond["encoder_hidden_states"]  # [1, k * 77, D_l + D_g]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": cond["pooled"]}

    def _t5(self, text: str) -> torch.Tensor:
        """T5's states for one text, in a call of the text stage's shape (its rows padded as every call's)."""
        warn_cut([text], self.pipe.tokenizer_3, self.max_sequence_length, "SD3's T5 text encoder")
        return run_in_calls(self.call_shapes.text, 1, lambda real, size: self.pipe._get_t5_prompt_embeds(
            [text] * size, 1, self.max_sequence_length, self.device))

    # Sampling --------------------------------------------------------------------------------------------
    def schedule_kwargs(self, sampler: Any, spec: GenerationSpec) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_inference_steps": spec.num_inference_steps}
        config = sampler.config
        if config.get("use_dynamic_shifting"):  # SD3 models trained with a resolution-dependent shift
            _, _, h, w = self.latent_shape(spec)
            patch = self.patch_size
            kwargs["mu"] = calculate_shift((h // patch) * (w // patch), config.get("base_image_seq_len", 256),
                                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                           config.get("max_shift", 1.16))
        return kwargs

    # Model calls -----------------------------------------------------------------------------------------
    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.denoiser(hidden_states=sample, timestep=timesteps, **cond, return_dict=False)[0]

    def embed(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.denoiser  # SD3Transformer2DModel.forward (diffusers 0.42), up to its blocks
        hidden = model.pos_embed(sample).contiguous()  # [N, S, D]
        temb = model.time_text_embed(timesteps, cond["pooled_projections"])
        return hidden, model.context_embedder(cond["encoder_hidden_states"]), temb

    def blocks(self) -> list[Any]:
        return list(self.denoiser.transformer_blocks)

    def finish(self, hidden: torch.Tensor, temb: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        model = self.denoiser  # the forward after its blocks: norm, projection, unpatchify
        hidden = model.proj_out(model.norm_out(hidden, temb))
        p, channels = model.config.patch_size, model.out_channels
        h, w = sample.shape[-2] // p, sample.shape[-1] // p
        hidden = torch.einsum("nhwpqc->nchpwq", hidden.reshape(shape=(hidden.shape[0], h, w, p, p, channels)))
        return hidden.reshape(shape=(hidden.shape[0], channels, h * p, w * p))

    def decode(self, latents: torch.Tensor, spec: GenerationSpec) -> np.ndarray:
        return self.decode_latents(latents)
