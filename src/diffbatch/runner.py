"""The runner: owns device, dtype, inference mode and the batching of tensors.

It executes one ``StepPlan``: decode the requests that finished denoising, prepare the newly admitted
ones (prompt embeddings: conditioning.py; each request's own sampler, initial latents), then make one batched
denoiser call and step each request's own sampler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from PIL import Image

from .adapters import Adapter, Cond
from .adapters.invariance import batch_rows, pad_rows, run_in_calls
from .adapters.lora import LoraBank, Loras
from .adapters.step_cache import first_block_changed
from .caching import parse_cache
from .conditioning import PromptEncoder
from .hires import UPSCALERS, second_pass, upscale_latents, upscale_picture
from .io.images import load_init_image
from .memory import BatchLimits, StageLimit
from .planner import StepPlan
from .request import Request
from .samplers import step_params
from .spec import GenerationSpec

Cached = dict[str, torch.Tensor]  # what a request's step cache keeps from a step (Request.cached)
def _chunks(items: Sequence[Request], limit: StageLimit) -> Iterator[list[Request]]:
    """Same-shape chunks of at most ``limit(shape)`` requests; the limit is read again for every chunk, so a
    limit lowered after an out-of-memory error applies to the rest at once."""
    by_shape: dict[tuple[int, int], list[Request]] = {}
    for r in items:
        by_shape.setdefault(r.shape_key, []).append(r)
    for shape, group in by_shape.items():
        while group:
            size = limit(shape)
            yield group[:size]
            group = group[size:]


class Runner:
    def __init__(self, adapter: Adapter, limits: BatchLimits, make_sampler: Callable[[str | None, str | None], Any],
                 generator_device: str = "cpu", loras: LoraBank | None = None) -> None:
        """``make_sampler(name, schedule)``: a fresh diffusers scheduler for a sampler name and schedule
        (``Resolver.make_sampler``);
        ``loras``: the LoRAs loaded into the pipeline, applied per row (adapters/lora.py)."""
        self.adapter = adapter
        self.make_sampler = make_sampler
        self.loras = loras
        # Images per denoiser call / VAE call, per shape; split and lowered on out-of-memory (memory.py).
        self.limits = limits
        self.generator_device = generator_device if generator_device == "cpu" else adapter.device
        self.prompts = PromptEncoder(adapter, self._lora_rows)

    def execute(self, plan: StepPlan) -> dict[int, np.ndarray]:
        """Run one engine step; return the decoded pixels (``[H, W, 3]`` in [0, 1]) by request id."""
        with torch.inference_mode():
            pixels = self._decode(plan.decode)
            if plan.prepare:
                self._prepare(plan.prepare)
            if plan.denoise:
                self._denoise(plan.denoise)
        return pixels

    # 1. Preparation --------------------------------------------------------------------------------------
    def _prepare(self, requests: list[Request]) -> None:
        self.prompts.attach(requests)
        for r in requests:
            r.generator = torch.Generator(self.generator_device).manual_seed(r.spec.seed)
            r.sampler = self.make_sampler(r.spec.scheduler, r.spec.schedule)
            r.timesteps = self.adapter.set_timesteps(r.sampler, r.spec)
            r.num_steps = len(r.timesteps)
            r.cache = parse_cache(r.spec.cache)  # resolved: off (None) or METHOD:VALUE
            if not r.spec.is_img2img:
                sigma = getattr(r.sampler, "init_noise_sigma", 1.0)  # flow-matching samplers do not scale noise
                r.latents = self.adapter.initial_noise(r.spec, r.generator) * sigma
        for r in requests:  # a hires request's second pass from its upscaled latents: diffusers' img2img on latents
            if r.spec.is_img2img and _is_latents(r.spec.image):
                r.latents = self.adapter.noise_init_latents(r.sampler, r.spec.image, r.generator, r.timesteps, r.spec)
        pictures = [r for r in requests if r.spec.is_img2img and not _is_latents(r.spec.image)]
        for chunk in _chunks(pictures, self.limits.decode):
            self._encode_init_images(chunk)

    def _lora_rows(self, per_row: list[Loras]) -> contextlib.AbstractContextManager:
        return self.loras.rows(per_row) if self.loras is not None else contextlib.nullcontext()

    def _encode_init_images(self, chunk: list[Request]) -> None:
        # Same RNG order as diffusers' img2img: the VAE latent sample first, then the noise.
        pixels = batch_rows([self._init_pixels(r.spec) for r in chunk])  # [B, 3, H, W]
        generators = [r.generator for r in chunk]
        init_latents = run_in_calls(self.adapter.call_shapes.vae, len(chunk), lambda real, size: (
            self.adapter.encode_images(pad_rows(pixels[real], size), generators[real])))  # [B, C, h, w]
        for i, r in enumerate(chunk):
            r.latents = self.adapter.noise_init_latents(r.sampler, init_latents[i : i + 1], r.generator, r.timesteps,
                                                        r.spec)

    def _init_pixels(self, spec: GenerationSpec) -> torch.Tensor:
        image = load_init_image(spec.image)
        if image.size != (spec.width, spec.height):
            image = image.resize((spec.width, spec.height), Image.Resampling.LANCZOS)
        return self.adapter.preprocess_image(image, spec.height, spec.width)

    # 2. Denoising ----------------------------------------------------------------------------------------
    def _denoise(self, requests: list[Request]) -> None:
        # The denoiser calls are retried in halves on out-of-memory; stepping the samplers (and keeping what the
        # step caches keep) comes after, once.
        limits = self.limits
        noise = limits.run_split(limits.denoise, requests[0].shape_key, requests, self._guided_noise)
        for r, (eps, cached) in zip(requests, noise, strict=True):
            r.cached.update(cached)
            self._step(r, eps)

    def _guided_noise(self, requests: list[Request]) -> list[tuple[torch.Tensor, Cached]]:
        """Each request's noise prediction with its own CFG, and what its step cache keeps from this step (empty
        without one). Each request's own state puts its rows in one of three sets of calls (step_cache.py): the
        rows that compute fully (no step cache, DeepCache refreshes), DeepCache's shallow path, and
        First-Block-Cache. Changes no state."""
        short = [r for r in requests if r.reuses_deep]
        first = [r for r in requests if r.probes_first_block]
        full = [r for r in requests if not (r.reuses_deep or r.probes_first_block)]
        outs: dict[int, tuple[torch.Tensor, Cached]] = {}
        if full and any(r.cache is not None for r in full):  # DeepCache refreshes among them
            out = self._call(full, self.adapter.denoise_keeping_deep)
            for r, rows in _row_slices(full):
                outs[r.request_id] = (out["out"][rows], {"deep": out["deep"][rows].clone()} if r.cache else {})
        elif full:
            out = self._call(full, self.adapter.denoise)
            outs.update((r.request_id, (out[rows], {})) for r, rows in _row_slices(full))
        if short:
            out = self._call(short, self.adapter.denoise_shallow, deep=batch_rows([r.cached["deep"] for r in short]))
            outs.update((r.request_id, (out[rows], {})) for r, rows in _row_slices(short))
        if first:
            outs.update(self._first_block(first))
        return [(_guide(r, outs[r.request_id][0]), outs[r.request_id][1]) for r in requests]

    def _first_block(self, requests: list[Request]) -> dict[int, tuple[torch.Tensor, Cached]]:
        """First-Block-Cache: the first block on every row (one set of calls); then each request, from its own
        rows, either runs the other blocks (with the others that do, one set of calls) or adds what they added at
        its last full step (one set of calls)."""
        carry = self._call(requests, self.adapter.denoise_first)
        rows = {r.request_id: at for r, at in _row_slices(requests)}
        changed = [first_block_changed(carry["probe"][rows[r.request_id]], r.cached.get("probe"), r.cache.value)
                   for r in requests]
        outs: dict[int, tuple[torch.Tensor, Cached]] = {}
        for computes in (True, False):
            group = [r for r, c in zip(requests, changed, strict=True) if c == computes]
            if not group:
                continue
            extra = {key: batch_rows([carry[key][rows[r.request_id]] for r in group])
                     for key in ("hidden", "text", "temb")}
            if not computes:
                extra["tail"] = batch_rows([r.cached["tail"] for r in group])
            out = self._call(group, self.adapter.denoise_rest, **extra)
            for r, at in _row_slices(group):  # a full step keeps its probe and tail (copies, not views of the batch)
                keep = ({"probe": carry["probe"][rows[r.request_id]].clone(), "tail": out["tail"][at].clone()}
                        if computes else {})
                outs[r.request_id] = (out["out"][at], keep)
        return outs

    def _call(self, requests: list[Request], model: Callable[..., Any], **extra: torch.Tensor) -> Any:
        """``model(sample, timesteps, cond, **extra)`` on the requests' rows (a guided request: uncond, then cond)
        in calls of the device's call shape (invariance.py), with each row's LoRAs; ``extra``: more row tensors.
        The output (a tensor, or a dict of them), one row per row."""
        samples, timesteps, conds, loras = [], [], [], []
        for r in requests:
            t = r.timesteps[r.step_index]
            x = _scale_model_input(r.sampler, r.latents, t)
            rows = [r.uncond, r.cond] if r.uses_cfg else [r.cond]
            loras += [r.spec.loras] * len(rows)
            samples += [x] * len(rows)
            timesteps += [t.reshape(1).to(torch.float32)] * len(rows)  # the UNet casts timesteps to float32
            conds += rows
        sample, timestep = batch_rows(samples), batch_rows(timesteps)  # [N, ...], [N]
        # Rows whose conditioning differs in length (a prompt of two chunks beside one of one) run in calls of
        # their own, as A1111 runs a prompt and a negative prompt of different lengths
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(conds):
            groups.setdefault(tuple(tuple(c[key].shape[1:]) for key in sorted(c)), []).append(i)
        outs = []
        for rows in groups.values():
            cond = {key: batch_rows([conds[i][key] for i in rows]) for key in conds[rows[0]]}
            picked = torch.tensor(rows) if len(groups) > 1 else slice(None)
            outs.append(self._calls(model, sample[picked], timestep[picked], cond,
                                    {key: value[picked] for key, value in extra.items()}, [loras[i] for i in rows]))
        if len(outs) == 1:
            return outs[0]
        order = torch.tensor([i for rows in groups.values() for i in rows]).argsort()  # back to the rows' order
        if isinstance(outs[0], dict):
            return {key: torch.cat([out[key] for out in outs])[order] for key in outs[0]}
        return torch.cat(outs)[order]

    def _calls(self, model: Callable[..., Any], sample: torch.Tensor, timestep: torch.Tensor, cond: Cond,
               extra: dict[str, torch.Tensor], loras: list[Loras]) -> Any:
        def call(real: slice, size: int) -> Any:  # padded to the device's call shape (invariance.py)
            rows = loras[real]
            with self._lora_rows(rows + rows[-1:] * (size - len(rows))):
                return model(pad_rows(sample[real], size), pad_rows(timestep[real], size),
                             {key: pad_rows(value[real], size) for key, value in cond.items()},
                             **{key: pad_rows(value[real], size) for key, value in extra.items()})

        return run_in_calls(self.adapter.call_shapes.denoiser, len(sample), call)

    def _step(self, r: Request, eps: torch.Tensor) -> None:
        params = step_params(type(r.sampler))
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = r.spec.eta or 0.0
        if "generator" in params:
            kwargs["generator"] = r.generator  # ancestral samplers draw from the request's own generator
        t = r.timesteps[r.step_index]
        r.latents = r.sampler.step(eps, t, r.latents, **kwargs, return_dict=False)[0]

    # 3. Decoding -----------------------------------------------------------------------------------------
    def _decode(self, requests: list[Request]) -> dict[int, np.ndarray]:
        """Decode the requests done denoising; a hires request's first pass continues as its second instead, from
        its latents upscaled (no decode) or its picture upscaled (hires.py)."""
        pixels: dict[int, np.ndarray] = {}
        limits, factor = self.limits, self.adapter.vae_scale_factor
        in_latents = [r for r in requests if r.spec.hires_scale and UPSCALERS[r.spec.hires_upscaler].latent]
        for r in in_latents:
            r.continue_as(second_pass(r.spec, upscale_latents(r.latents, r.spec, factor), factor))
        for chunk in _chunks([r for r in requests if r not in in_latents], limits.decode):
            images = limits.run_split(limits.decode, chunk[0].shape_key, chunk, self._decode_chunk)
            for r, image in zip(chunk, images, strict=True):
                if r.spec.hires_scale:
                    r.continue_as(second_pass(r.spec, upscale_picture(image, r.spec, factor), factor))
                    continue
                pixels[r.request_id] = image
                r.latents = r.sampler = r.uncond = r.generator = None  # free memory early
                r.cond, r.cached = {}, {}
        return pixels

    def _decode_chunk(self, chunk: list[Request]) -> list[np.ndarray]:
        latents = batch_rows([r.latents for r in chunk])
        images = run_in_calls(self.adapter.call_shapes.vae, len(chunk), lambda real, size: (
            self.adapter.decode(pad_rows(latents[real], size), chunk[0].spec)))
        return list(images)  # [B, H, W, 3]


def _is_latents(image: Any) -> bool:
    return isinstance(image, torch.Tensor)


def _row_slices(requests: list[Request]) -> Iterator[tuple[Request, slice]]:
    """Each request with its rows in a call's batch (``_call``'s order: 2 rows for a guided request, else 1)."""
    row = 0
    for r in requests:
        n = 2 if r.uses_cfg else 1
        yield r, slice(row, row + n)
        row += n


def _guide(r: Request, out: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance for one request's rows (``[uncond, cond]``, or ``[cond]`` unguided)."""
    if not r.uses_cfg:
        return out
    uncond, text = out[0:1], out[1:2]
    eps = uncond + r.spec.guidance_scale * (text - uncond)
    if r.spec.guidance_rescale > 0:
        eps = rescale_noise_cfg(eps, text, guidance_rescale=r.spec.guidance_rescale)
    return eps


def _scale_model_input(sampler: Any, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per item: Euler-type samplers scale by sigma; flow-matching samplers have no such step."""
    scale = getattr(sampler, "scale_model_input", None)
    return latents if scale is None else scale(latents, t)
