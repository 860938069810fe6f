"""Tiny random Stable Diffusion pipelines built from configs (as diffusers' own tests do): no download."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def write_byte_level_clip_tokenizer(folder: Path, max_length: int = 16) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over the byte-level alphabet only (no merges): every text tokenizes."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))
    return CLIPTokenizer.from_pretrained(folder)


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [mapping[b] for b in range(256)]


def tiny_sd_components(tokenizer_dir: Path, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=16, intermediate_size=32,
        num_attention_heads=2, num_hidden_layers=2, vocab_size=514, max_position_embeddings=16,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler,
                tokenizer=write_byte_level_clip_tokenizer(tokenizer_dir), safety_checker=None,
                feature_extractor=None, image_encoder=None)


def save_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random SD pipeline (32x32 native size, VAE factor 2) as safetensors to ``folder``."""
    components = tiny_sd_components(folder.with_name(folder.name + "-tokenizer"), seed)
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
