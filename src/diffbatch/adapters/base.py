"""The adapter interface: everything model-family specific, behind one small surface.

The engine and runner never look inside a pipeline; an adapter (one module per family) knows how to encode
prompts, turn init images into latents, call the denoiser on a batch, and decode.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from ..spec import GenerationSpec, ModelDefaults

Cond = dict[str, torch.Tensor]  # denoiser conditioning, every tensor with batch dimension first


class Adapter(ABC):
    family: ClassVar[str]  # e.g. "stable-diffusion"
    pipeline_classes: ClassVar[tuple[str, ...]]  # model_index.json ``_class_name`` values handled

    def __init__(self, pipe: Any, name: str) -> None:
        self.pipe = pipe
        self.name = name
        self.device: torch.device = pipe.device
        # Every request builds its sampler from the config as loaded, never from one a request changed
        # (``from_config(cfg, use_karras_sigmas=True)`` writes the option into the config it returns).
        self.scheduler_config = copy.deepcopy(dict(pipe.scheduler.config))
        self.default_scheduler_class: type = type(pipe.scheduler)

    @classmethod
    @abstractmethod
    def load_pipeline(cls, model: str, dtype: torch.dtype) -> Any:
        """Load the diffusers pipeline (safetensors only; no remote code) on the CPU."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype of latents and conditioning fed to the denoiser."""

    @property
    @abstractmethod
    def defaults(self) -> ModelDefaults: ...

    @abstractmethod
    def latent_shape(self, spec: GenerationSpec) -> tuple[int, ...]:
        """Shape of one image's latents, batch dimension included (``[1, C, h, w]`` for UNet models)."""

    @abstractmethod
    def encode_prompts(self, texts: list[str]) -> list[Cond]:
        """Encode a batch of texts in one call; one conditioning (batch dim 1) per text."""

    def request_cond(self, text_cond: Cond, spec: GenerationSpec) -> Cond:
        """Per-request additions to a prompt's conditioning (SDXL time ids); none by default."""
        return text_cond

    @abstractmethod
    def preprocess_image(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """Init image to model input pixels ``[1, 3, H, W]``, as the family's img2img pipeline does."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Batched VAE encode; sample each item's latent with its own generator; scaled latents."""

    @abstractmethod
    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """One batched denoiser call: ``sample [N, ...]``, per-row ``timesteps [N]``, batched ``cond``."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Batched VAE decode to float pixels in [0, 1], ``[B, H, W, 3]``."""
