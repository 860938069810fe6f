"""Tiny random SDXL pipelines (base and refiner) built from configs, and the diffusers oracle for them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffbatch import GenerationSpec
from helpers import scheduler_for
from tiny import write_byte_level_clip_tokenizer

TIME_EMBED_DIM = 4  # unet addition_time_embed_dim
HIDDEN, PROJECTION = 16, 16  # text encoders' hidden size; text_encoder_2's pooled projection


def _text_config() -> CLIPTextConfig:
    return CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=HIDDEN,
                          intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=514,
                          max_position_embeddings=16, projection_dim=PROJECTION)


def _unet(refiner: bool) -> UNet2DConditionModel:
    # base: time ids (orig h, w, crop y, x, target h, w), text from both encoders; refiner: 5 ids, encoder 2 only
    n_ids, cross_dim = (5, HIDDEN) if refiner else (6, 2 * HIDDEN)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=n_ids * TIME_EMBED_DIM + PROJECTION,
        cross_attention_dim=cross_dim, norm_num_groups=4,
    )


def tiny_sdxl_components(tokenizer_dir: Path, refiner: bool = False, seed: int = 0, latent_stats: bool = False) -> dict:
    """Components of a tiny SDXL pipeline: 32x32 native size, VAE factor 2; the refiner has no text_encoder.
    ``latent_stats``: the VAE config has per-channel ``latents_mean``/``latents_std`` (as Playground v2.5's)."""
    torch.manual_seed(seed)
    unet = _unet(refiner)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32, force_upcast=True,
        latents_mean=(0.1, -0.2, 0.3, 0.0) if latent_stats else None,
        latents_std=(0.9, 1.1, 0.7, 1.3) if latent_stats else None,
    )
    text_encoder = None if refiner else CLIPTextModel(_text_config())
    text_encoder_2 = CLIPTextModelWithProjection(_text_config())
    tokenizer = write_byte_level_clip_tokenizer(tokenizer_dir)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=None if refiner else tokenizer, tokenizer_2=tokenizer, scheduler=scheduler,
                image_encoder=None, feature_extractor=None)


def save_tiny_sdxl(folder: Path, refiner: bool = False, seed: int = 0, latent_stats: bool = False) -> Path:
    """Write a tiny random SDXL base (``StableDiffusionXLPipeline``) or refiner (``...Img2ImgPipeline`` with
    ``requires_aesthetics_score``) as safetensors to ``folder``."""
    components = tiny_sdxl_components(folder.with_name(folder.name + "-tokenizer"), refiner, seed, latent_stats)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=True, add_watermarker=False)
    else:
        pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


class SDXLOracle:
    """diffusers' own SDXL pipeline called for one image, with a CPU generator seeded with the spec's seed."""

    def __init__(self, model: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        self.pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(model, dtype=dtype, add_watermarker=False)
        self.pipe.to(device)
        self.config = dict(self.pipe.scheduler.config)

    def scheduler(self, name: str | None):
        return scheduler_for(name, self.config, type(self.pipe.scheduler))

    def __call__(self, spec: GenerationSpec) -> np.ndarray:
        """[H, W, 3] float pixels in [0, 1]. An empty negative prompt is passed as None (diffusers then zeroes
        the unconditional embeddings, as diffbatch does for "")."""
        components = {**self.pipe.components, "scheduler": self.scheduler(spec.scheduler)}
        kwargs = dict(prompt=spec.prompt, negative_prompt=spec.negative_prompt or None,
                      num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                      guidance_rescale=spec.guidance_rescale or 0.0,
                      generator=torch.Generator("cpu").manual_seed(spec.seed), output_type="np")
        if spec.image is None:
            pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
            kwargs.update(height=spec.height, width=spec.width)
        else:
            pipe = StableDiffusionXLImg2ImgPipeline(**components, add_watermarker=False,
                                                    requires_aesthetics_score=self.pipe.config.requires_aesthetics_score)
            kwargs.update(image=spec.image, strength=spec.strength)
        pipe.set_progress_bar_config(disable=True)
        return pipe(**kwargs).images[0]


def noise_picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
