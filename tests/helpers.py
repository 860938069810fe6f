"""Shared test factories: diffusers reference images for a spec (the oracle)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from diffbatch import GenerationSpec
from diffbatch.result import Result
from diffbatch.samplers import SAMPLERS


def scheduler_for(name: str | None, config: dict, default_class: type, schedule: str | None = None):
    """A fresh scheduler for a sampler name (None: the model's own class) and schedule (A1111's Schedule type, as
    diffusers' documentation maps it to a scheduler option), from the model's loaded config."""
    options = {"karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
               "beta": {"use_beta_sigmas": True}, "sgm_uniform": {"timestep_spacing": "trailing"}}.get(schedule, {})
    if name is None:
        return default_class.from_config(config, **options)
    sampler = SAMPLERS[name]
    return getattr(diffusers, sampler.class_name).from_config(config, **{**sampler.options, **options})


class DiffusersOracle:
    """Calls diffusers' own pipeline for one image, with a CPU generator seeded with the spec's seed."""

    def __init__(self, model: Path) -> None:
        self.pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.config = dict(self.pipe.scheduler.config)

    def scheduler(self, name: str | None, schedule: str | None = None):
        return scheduler_for(name, self.config, type(self.pipe.scheduler), schedule)

    def __call__(self, spec: GenerationSpec) -> np.ndarray:
        """[H, W, 3] float pixels in [0, 1]."""
        components = {**self.pipe.components, "scheduler": self.scheduler(spec.scheduler, spec.schedule)}
        kwargs = dict(prompt=spec.prompt, negative_prompt=spec.negative_prompt or None, eta=spec.eta or 0.0,
                      num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                      generator=torch.Generator("cpu").manual_seed(spec.seed), output_type="np")
        if spec.image is None:
            pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
            kwargs.update(height=spec.height, width=spec.width, guidance_rescale=spec.guidance_rescale or 0.0)
        else:
            pipe = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
            kwargs.update(image=spec.image, strength=spec.strength)
        pipe.set_progress_bar_config(disable=True)
        return pipe(**kwargs).images[0]


def noise_image(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def made(spec: GenerationSpec, image: Image.Image, sampler: str = "DDIM", model: str = "tiny-sd",
         seconds: float = 0.1, index: int = 0) -> Result:
    """A finished image as the engine returns it, for output tests that need no model."""
    return Result(index, spec, image, np.zeros((image.height, image.width, 3), np.float32), seconds, sampler, model)


def in_mount_namespace(script: str, marker: Path, what: str, timeout: int = 300) -> None:
    """Run the shell ``script`` in a private mount namespace (a tmpfs or read-only mount of its own), or skip the
    test where this machine does not allow it: no unshare(1), the script's mount failed (it exits 99), or it
    never wrote ``marker``."""
    try:
        done = subprocess.run(["unshare", "--mount", "sh", "-c", script], timeout=timeout)
    except FileNotFoundError:
        pytest.skip(f"no unshare(1) here to {what}")
    if done.returncode == 99 or not marker.exists():
        pytest.skip(f"this machine does not allow to {what} in a private mount namespace")


def a1111_two_encoders(pipe, text: str) -> tuple[torch.Tensor, list[torch.Tensor], list]:
    """A1111's reading of ``text`` on a pipeline's two CLIP encoders (SDXL, SD3), written out independently of
    diffbatch's encoder: per encoder, each chunk [BOS, tokens, EOS, padding] encoded alone, its penultimate hidden
    states times the tokens' weights, the chunk's mean restored; the encoders joined along features and the
    chunks along the sequence ``[1, L * k, D1 + D2]``; each projecting encoder's pooled output for the first
    chunk; and the parsed pieces."""
    from diffbatch.prompt_language import chunk, parse_attention

    parts = parse_attention(text)
    tokenizer = pipe.tokenizer
    window = tokenizer.model_max_length - 2
    chunks = chunk(parts, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], window,
                   tokenizer.get_vocab().get(",</w>"))
    joined, pooled = [], []
    for k, c in enumerate(chunks):
        pad = window - len(c.tokens)
        weights = torch.tensor([1.0, *c.weights, *[1.0] * (pad + 1)])[None, :, None]
        per_encoder = []
        for tok, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = torch.tensor([[tok.bos_token_id, *c.tokens, tok.eos_token_id, *[tok.pad_token_id] * pad]])
            with torch.no_grad():
                out = encoder(ids, output_hidden_states=True)
            z = out.hidden_states[-2]
            per_encoder.append(z * weights * (z.mean() / (z * weights).mean()))
            if k == 0 and out[0].ndim == 2:
                pooled.append(out[0])
        joined.append(torch.cat(per_encoder, dim=-1))
    return torch.cat(joined, dim=1), pooled, parts
