"""The adapter interface: everything model-family specific, behind one small surface.

The engine and runner never look inside a pipeline; an adapter (one module per family) knows how to encode
prompts, make initial latents, turn init images into latents, call the denoiser on a batch, and decode.
Methods with a body are the Stable-Diffusion-style default that most families share; families override them.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import diffusers
import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..caching import AUTO, METHODS, OFF, parse_cache
from ..errors import SpecError, shown
from ..numerics import NumericPath
from ..prompt_language import NONE, has_syntax, parse_attention
from ..samplers import SAMPLERS, is_stochastic
from ..spec import GenerationSpec, ModelDefaults
from .config import PipelineConfig
from .invariance import CallShape, CallShapes, call_shapes, make_batch_invariant
from .layers import LayerStack

MODEL_COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
Cond = dict[str, torch.Tensor]  # denoiser conditioning, every tensor with batch dimension first


class Adapter(ABC):
    family: ClassVar[str]  # e.g. "stable-diffusion"
    cache_methods: ClassVar[tuple[str, ...]] = ()  # the step caches (caching.METHODS) this family runs
    # What ``cache: auto`` runs with a deterministic sampler, and with a stochastic one (ancestral, SDE: small
    # changes move more of the image, so it computes more often); benchmarks/cache.py measured them
    auto_cache: ClassVar[str] = OFF
    auto_cache_stochastic: ClassVar[str] = OFF
    # Reads AUTOMATIC1111's prompt language and encodes long prompts in chunks (clip_prompts.py); a family
    # without reads prompts literally (``emphasis: none``), as diffusers does
    prompt_language: ClassVar[bool] = False
    clip_skip: ClassVar[bool] = True  # its pipeline's encode_prompt takes diffusers' clip_skip

    def __init__(self, config: PipelineConfig, name: str, pipe: Any = None, invariant: bool = True,
                 backend: str = "torch") -> None:
        """``pipe=None``: configuration only (``loading.describe``): the adapter resolves and checks specs, from
        ``config`` alone, but makes no images. ``backend="openvino"``: the models run on OpenVINO."""
        self.config = config
        self.pipe = pipe
        self.name = name
        self.backend = backend
        self.invariant = invariant
        self.fingerprint = ""  # hub.model_fingerprint of the weights, set by the loader ("" unknown)
        self.device: torch.device = pipe.device if pipe is not None else torch.device("cpu")
        # Every request builds its sampler from the config as loaded, never from one a request changed
        # (``from_config(cfg, use_karras_sigmas=True)`` writes the option into the config it returns).
        self.scheduler_config = copy.deepcopy(dict(config.component("scheduler")))
        self.default_scheduler_class: type = (type(pipe.scheduler) if pipe is not None
                                              else getattr(diffusers, config.default_scheduler))
        # Rows per model call, per stage; with ``invariant`` (the default) a row's result does not depend on
        # its batch or the thread count (invariance.py).
        self.call_shapes: CallShapes = call_shapes(self.device, invariant,
                                                   self.dtype if pipe is not None else torch.float32)
        self.denoiser: Any = None  # the UNet or transformer: what ``denoise`` calls
        self.embeddings: Any = None  # textual-inversion embeddings (embeddings.EmbeddingBank), set by the engine
        self.layers = LayerStack(backend)  # what changes how model calls run, in order (layers.py)
        if pipe is None:
            return
        self.denoiser = next(getattr(pipe, n) for n in ("unet", "transformer") if getattr(pipe, n, None) is not None)
        torch_modules = [getattr(pipe, n, None) for n in MODEL_COMPONENTS]
        if backend == "openvino":
            torch_modules.remove(self.denoiser)  # converted unpatched; invariant by its fixed call shape
        self.layers.install("backend", self._install_openvino if backend == "openvino" else lambda: None)
        if invariant:
            self.layers.install("invariance", lambda: make_batch_invariant(torch_modules, self.device))

    def _install_openvino(self) -> None:
        """The OpenVINO backend (layers.py, layer 1): every stage runs a fixed row count."""
        from .openvino import DENOISER_ROWS, TEXT_ROWS, VAE_IMAGES, install  # optional dependency

        self.denoiser = install(self.pipe, self.denoiser, self.dtype, self.device)
        self.call_shapes = CallShapes(text=CallShape(1, TEXT_ROWS), denoiser=CallShape(1, DENOISER_ROWS),
                                      vae=CallShape(1, VAE_IMAGES))

    # Loading and defaults ------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load_pipeline(cls, model: str, dtype: torch.dtype) -> Any:
        """Load the diffusers pipeline (safetensors only; no remote code) on the CPU."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of latents and conditioning fed to the denoiser: diffusers runs latents in the prompt
        embeddings' dtype, the first text encoder's unless a family says otherwise."""
        return self.pipe.text_encoder.dtype

    @property
    def numerics(self) -> NumericPath:
        """The numeric path its images are made on (numerics.py); a configuration-only adapter makes none."""
        if self.pipe is None:
            raise RuntimeError("a configuration-only adapter (loading.describe) makes no images")
        return NumericPath(str(self.dtype).removeprefix("torch."), self.device.type, self.backend)

    @property
    @abstractmethod
    def defaults(self) -> ModelDefaults:
        """What the model fills in for unset fields, from ``self.config`` only (no weights needed)."""

    @property
    def vae_scale_factor(self) -> int:
        return self.config.vae_scale_factor

    @abstractmethod
    def latent_shape(self, spec: GenerationSpec) -> tuple[int, ...]:
        """Shape of one image's latents, batch dimension included (``[1, C, h, w]`` for UNet models)."""

    # Conditioning ----------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, texts: list[str], negative: bool = False, clip_skip: int = 1) -> list[Cond]:
        """Encode a batch of texts in one call as diffusers' ``encode_prompt`` does; one conditioning (batch dim
        1) per text. ``negative``: the texts are negative prompts (SDXL zeroes an empty one); ``clip_skip``:
        A1111's, 1 = none (diffusers' ``clip_skip`` is one less, and applies to prompts only)."""

    def text_layers(self) -> int | None:
        """The fewest layers of the text encoders clip skip applies to (None: unknown, or none)."""
        if self.pipe is None:
            return None
        encoders = [getattr(self.pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
        layers = [e.config.num_hidden_layers for e in encoders if e is not None and hasattr(e, "config")]
        return min(layers) if layers else None

    def embeddings_in(self, text: str, emphasis: str, clip_skip: int = 1) -> list[Any]:
        """The textual-inversion embeddings ``text`` is encoded with (clip_prompts.py); none by default."""
        return []

    def text_dims(self) -> tuple[int, ...]:
        """The hidden sizes of the text encoders textual-inversion embeddings feed; () where none do."""
        return ()

    def windows(self, text: str, emphasis: str, field: str = "prompt", clip_skip: int = 1) -> Any:
        """How ``text`` is encoded when not by ``encode_prompts``: its chunks (clip_prompts.py); None: by
        ``encode_prompts``, as in every family without A1111's prompt language."""
        return None

    def request_cond(self, text_cond: Cond, spec: GenerationSpec, negative: bool = False) -> Cond:
        """Per-request additions to a prompt's conditioning (SDXL time ids); none by default."""
        return text_cond

    def check_spec(self, spec: GenerationSpec) -> None:
        """Raise ``SpecError`` at admission for a resolved spec this model cannot run (an SDXL refiner refuses
        text-to-image). The base checks how its prompts are read."""
        self.check_reading(spec)

    def check_reading(self, spec: GenerationSpec) -> None:
        """The prompts parse in the language ``emphasis`` names (a weight that is not a number, brackets nested
        past the limit: refused naming the field), and the family reads it."""
        encoded = spec.prompt_texts()
        texts = {name: text for name, (text, _) in encoded.items()}
        if self.embeddings is not None:  # the embeddings the prompts name, loaded now: a bad file refused here
            self.embeddings.ensure(*texts.values())
        if spec.emphasis != NONE:
            if not self.prompt_language and any(has_syntax(t) for t in texts.values()):
                raise SpecError(f"emphasis={spec.emphasis!r}: {self.family} models read prompts literally here "
                                "(A1111's prompt language is read on CLIP text encoders); give emphasis none",
                                field="emphasis", value=spec.emphasis, reason="none on this model")
            for name, text in texts.items():
                parse_attention(text, name)
        if self.pipe is not None:  # its chunks (their count), computed now and kept for the encoding
            for name, (text, skip) in encoded.items():
                self.windows(text, spec.emphasis, name, skip)
        if spec.clip_skip > 1 and not self.clip_skip:
            raise SpecError(f"clip_skip={spec.clip_skip}: {self.family} models take no clip skip", field="clip_skip",
                            value=spec.clip_skip, reason="1 on this model")
        layers = self.text_layers()
        if layers is not None and spec.clip_skip > layers:
            raise SpecError(f"clip_skip={spec.clip_skip}: this model's text encoder has {layers} layers",
                            field="clip_skip", value=spec.clip_skip, reason=f"at most {layers} on this model")

    def resolve_cache(self, spec: GenerationSpec) -> str:
        """A resolved spec's ``cache`` as it will run: ``auto`` made concrete for its sampler (``off`` where this
        model runs no step cache), the value written canonically; ``SpecError`` naming the field where this model
        cannot run it."""
        cache = spec.cache
        if cache == AUTO:
            if not self.layers.supports("step-cache"):
                return OFF
            return self.auto_cache_stochastic if self.stochastic_sampler(spec) else self.auto_cache
        setting = parse_cache(cache)  # the spec checked its form
        if setting is None:
            return OFF
        if self.cache_methods:
            self.layers.require("step-cache", "cache", cache, instead="cache off")
        if setting.method not in self.cache_methods:
            reason = "supported: " + ", ".join([OFF, AUTO, *(_method_form(m) for m in self.cache_methods)])
            raise SpecError(f"cache={cache!r}: {self.family} models do not run {setting.method} ({reason})",
                            field="cache", value=cache, reason=reason)
        return f"{setting.method}:{setting.value:g}"

    def stochastic_sampler(self, spec: GenerationSpec) -> bool:
        """Whether the spec's sampler draws fresh noise every step (ancestral and SDE samplers)."""
        if spec.eta:  # DDIM with eta draws noise every step
            return True
        if spec.scheduler is not None:
            return is_stochastic(SAMPLERS[spec.scheduler].class_name, SAMPLERS[spec.scheduler].options)
        return is_stochastic(self.default_scheduler_class.__name__, self.scheduler_config)

    def uses_cfg(self, spec: GenerationSpec) -> bool:
        """Classifier-free guidance only where it changes something (as diffusers: guidance > 1)."""
        return spec.guidance_scale > 1

    # Sampling --------------------------------------------------------------------------------------------
    def set_timesteps(self, sampler: Any, spec: GenerationSpec) -> Any:
        """Set the request's sampler up for its step count; return its timesteps (img2img cut applied).
        The cut is StableDiffusionImg2ImgPipeline.get_timesteps: skip the first (1 - strength) of them."""
        steps = spec.num_inference_steps
        sampler.set_timesteps(steps, device=self.device)
        if not spec.is_img2img:
            return sampler.timesteps
        t_start = (steps - min(int(steps * spec.strength), steps)) * sampler.order
        if hasattr(sampler, "set_begin_index"):
            sampler.set_begin_index(t_start)
        return sampler.timesteps[t_start:]

    def noise(self, shape: tuple[int, ...], generator: torch.Generator, spec: GenerationSpec) -> torch.Tensor:
        """Noise of ``shape`` drawn as diffusers' ``randn_tensor`` draws it; for a variation, slerped towards
        the same draw from a fresh generator seeded with ``variation_seed`` (strength 0: untouched)."""
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        if not spec.variation_strength:
            return noise
        other = torch.Generator(generator.device).manual_seed(spec.variation_seed)
        toward = randn_tensor(shape, generator=other, device=self.device, dtype=self.dtype)
        return slerp(spec.variation_strength, noise[0].float(), toward[0].float())[None].to(self.dtype)

    def initial_noise(self, spec: GenerationSpec, generator: torch.Generator) -> torch.Tensor:
        """Text-to-image starting noise, drawn as diffusers' ``prepare_latents`` draws it (before scaling by
        the sampler's ``init_noise_sigma``)."""
        return self.noise(self.latent_shape(spec), generator, spec)

    def noise_init_latents(self, sampler: Any, latents: torch.Tensor, generator: torch.Generator,
                           timesteps: torch.Tensor, spec: GenerationSpec) -> torch.Tensor:
        """Image-to-image: noise the init image's latents to the first timestep (noise drawn after the VAE
        sample, as diffusers does)."""
        return sampler.add_noise(latents, self.noise(tuple(latents.shape), generator, spec), timesteps[:1])

    # Model calls -----------------------------------------------------------------------------------------
    def preprocess_image(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """Init image to model input pixels ``[1, 3, H, W]``, as the family's img2img pipeline does."""
        return self.pipe.image_processor.preprocess(image, height=height, width=width)

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Batched VAE encode; sample each item's latent with its own generator; scaled latents."""

    @abstractmethod
    def denoise(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """One batched denoiser call: ``sample [N, ...]``, per-row ``timesteps [N]``, batched ``cond``."""

    # Step caches (step_cache.py), for the families that run them; every call takes padded rows and returns
    # one row per input row, so the runner calls them in the device's call shapes like ``denoise``.
    def denoise_keeping_deep(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond
                             ) -> dict[str, torch.Tensor]:
        """DeepCache's full step: ``denoise``'s output (``out``) and the rows' deep features (``deep``)."""
        raise NotImplementedError(f"{self.family} models run no DeepCache")

    def denoise_shallow(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond,
                        deep: torch.Tensor) -> torch.Tensor:
        """``denoise`` with the deep features taken from ``deep`` (from ``denoise_keeping_deep``) instead of
        computed: DeepCache's shallow path."""
        raise NotImplementedError(f"{self.family} models run no DeepCache")

    def denoise_first(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> dict[str, torch.Tensor]:
        """First-Block-Cache's first stage: the carry into ``denoise_rest`` and the first block's residual
        (``probe``); flow_match.py."""
        raise NotImplementedError(f"{self.family} models run no First-Block-Cache")

    def denoise_rest(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: Cond, hidden: torch.Tensor,
                     text: torch.Tensor, temb: torch.Tensor, tail: torch.Tensor | None = None
                     ) -> dict[str, torch.Tensor]:
        """First-Block-Cache's second stage: the output (``out``) and the other blocks' residual (``tail``)."""
        raise NotImplementedError(f"{self.family} models run no First-Block-Cache")

    @abstractmethod
    def decode(self, latents: torch.Tensor, spec: GenerationSpec) -> np.ndarray:
        """Batched VAE decode (all of ``spec``'s size) to float pixels in [0, 1], ``[B, H, W, 3]``."""


CUT = logging.getLogger("diffbatch.prompts")  # one line on stderr by default (logging's last resort)


def warn_cut(texts: list[str], tokenizer: Any, limit: int, encoder: str) -> None:
    """Say, once per prompt, where a text encoder that takes ``limit`` tokens (BOS/EOS included) cuts one: the
    families whose encoders diffbatch does not chunk (T5, and SD3's CLIP beside it) read only its start."""
    if tokenizer is None:
        return
    warned: set[str] = tokenizer.__dict__.setdefault("_diffbatch_warned", set())
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    for text, ids in zip(texts, tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"], strict=True):
        if len(ids) > limit and text not in warned:
            warned.add(text)
            CUT.warning(f"diffbatch: warning: {encoder} reads {limit} tokens; this prompt has {len(ids)}, and the "
                        f"rest is cut: {shown(tokenizer.decode(ids[limit - 1:-1]))[:200]}")


def _method_form(name: str) -> str:
    method = METHODS[name]
    return f"{name}:VALUE ({method.low:g}-{method.high:g})"


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's ``slerp`` (modules/processing.py) as it is, for one image's noise ``[C, h, w]``: norms
    and dot products run over dim 1, and nearly parallel noises fall back to its linear mix."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high
