"""Tiny random SD3 and Flux pipelines built from configs (as diffusers' own tests do), tokenizers written here."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from diffbatch import GenerationSpec
from tiny import write_byte_level_clip_tokenizer

T5_DIM = 32  # T5 width = the transformers' joint_attention_dim


def write_char_t5_tokenizer(folder: Path) -> T5TokenizerFast:
    """A T5 Unigram tokenizer whose pieces are single printable ASCII characters (others map to <unk>)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    T5TokenizerFast(vocab=pieces, extra_ids=0).save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def tiny_t5(vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))


def tiny_clip_config(hidden: int = 16, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=hidden,
                          intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=514,
                          max_position_embeddings=16, **extra)


def tiny_flow_vae() -> AutoencoderKL:
    """Factor 2, 4 latent channels, with SD3/Flux's latent shift and scale."""
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, shift_factor=0.0609, scaling_factor=1.5035,
                         use_quant_conv=False, use_post_quant_conv=False)


def save_tiny_sd3(folder: Path, with_t5: bool = True, dynamic_shift: bool = False, seed: int = 0) -> Path:
    """Tiny SD3 (patch 2, 32x32 native size, sizes multiples of 4 up to 64); ``with_t5=False``: no third
    encoder, as SD3 users load it to save memory (diffusers feeds zeros); ``dynamic_shift``: a scheduler with
    a resolution-dependent shift (an option of SD3's pipeline, off in the released SD3 models)."""
    scratch = folder.with_name(folder.name + "-tokenizers")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
    clip = write_byte_level_clip_tokenizer(scratch / "clip")
    t5_tokenizer = write_char_t5_tokenizer(scratch / "t5")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic_shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=tiny_flow_vae(), scheduler=scheduler,
        text_encoder=CLIPTextModelWithProjection(tiny_clip_config(projection_dim=16)), tokenizer=clip,
        text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config(projection_dim=16)), tokenizer_2=clip,
        text_encoder_3=tiny_t5(len(t5_tokenizer)) if with_t5 else None, tokenizer_3=t5_tokenizer if with_t5 else None)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_flux(folder: Path, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """Tiny Flux (VAE factor 2, sizes multiples of 4); ``guidance_embeds``: guidance-distilled, as FLUX.1-dev
    (False: as FLUX.1-schnell). The scheduler is FLUX.1-dev's: resolution-dependent shift."""
    scratch = folder.with_name(folder.name + "-tokenizers")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_DIM,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    t5_tokenizer = write_char_t5_tokenizer(scratch / "t5")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, vae=tiny_flow_vae(), scheduler=scheduler,
                        text_encoder=CLIPTextModel(tiny_clip_config()),
                        tokenizer=write_byte_level_clip_tokenizer(scratch / "clip"),
                        text_encoder_2=tiny_t5(len(t5_tokenizer)), tokenizer_2=t5_tokenizer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


class PipelineOracle:
    """diffusers' own text-to-image / image-to-image pipeline called for one image, with a CPU generator."""

    def __init__(self, model: Path, txt2img: type, img2img: type, **components) -> None:
        self.txt2img = txt2img.from_pretrained(model, **components)
        self.img2img = img2img(**self.txt2img.components)
        for pipe in (self.txt2img, self.img2img):
            pipe.set_progress_bar_config(disable=True)

    def __call__(self, spec: GenerationSpec) -> np.ndarray:
        """[H, W, 3] float pixels in [0, 1]. Sizes always given: diffusers' SD3/Flux img2img would otherwise use
        the model's native size, not the init image's (diffbatch resolves img2img sizes from the image)."""
        kwargs = dict(prompt=spec.prompt, num_inference_steps=spec.num_inference_steps,
                      guidance_scale=spec.guidance_scale, height=spec.height, width=spec.width,
                      generator=torch.Generator("cpu").manual_seed(spec.seed), output_type="np")
        if spec.negative_prompt:
            kwargs["negative_prompt"] = spec.negative_prompt
        if spec.image is None:
            return self.txt2img(**kwargs).images[0]
        return self.img2img(**kwargs, image=spec.image, strength=spec.strength).images[0]
