"""Request: the engine-side, mutable state of one image.

The user-facing ``GenerationSpec`` stays frozen; everything that changes while an image is made lives here.
Tensor-valued fields are opaque to the scheduler (it never imports torch); only the runner touches them.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from .caching import CacheSetting
from .spec import GenerationSpec

# DeepCache's full steps besides every N-th: the first fifth and the last tenth of a request's steps (measured on
# the embedded model, Euler ancestral, 30 steps, deepcache:3: 13.1 dB PSNR against the uncached image uniform,
# 26.7 dB with the first fifth full, 31.7 dB with the last tenth too; benchmarks/RESULTS.md, "Step caching")
DEEPCACHE_WARMUP, DEEPCACHE_FINISH = 0.2, 0.1


class RequestStatus(enum.IntEnum):
    WAITING = 0  # admitted, not yet prepared (no prompt embeddings, no latents)
    RUNNING = 1  # has latents; denoising
    DECODING = 2  # all denoising steps done; waits for the VAE decode
    FINISHED = 3  # image decoded


@dataclass(eq=False)
class Request:
    request_id: int  # arrival order: also the fairness key (oldest first)
    spec: GenerationSpec  # resolved: every field set
    shape_key: tuple[int, int]  # (height, width): requests batch together only with the same shape
    status: RequestStatus = RequestStatus.WAITING
    step_index: int = 0
    num_steps: int = 0  # len(timesteps) once prepared (Heun's doubled steps included)
    # Runner-owned state (torch objects):
    generator: Any = None
    sampler: Any = None  # this request's own diffusers scheduler instance, never shared
    timesteps: Any = None
    latents: Any = None  # [1, C, h, w]
    cond: dict[str, Any] = field(default_factory=dict)  # adapter conditioning for the prompt, batch dim 1
    uncond: dict[str, Any] | None = None  # same for the negative prompt; None without CFG
    cache: CacheSetting | None = None  # its step cache (caching.py) as resolved; None: off
    # Its own cached tensors, one row per denoiser row: "deep" (DeepCache: the deep features of its last full
    # step), "probe" and "tail" (First-Block-Cache: its first block's residual at its last full step, and what
    # the other blocks added then); adapters/step_cache.py
    cached: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0  # perf_counter at admission
    origin: GenerationSpec | None = None  # the request as asked, while ``spec`` is a later pass of it (hires fix)

    def continue_as(self, spec: GenerationSpec) -> None:
        """Run ``spec`` next, as the same request (hires fix's second pass): its state starts again, at its size."""
        self.origin = self.origin or self.spec
        self.spec, self.shape_key = spec, (spec.height, spec.width)
        self.status, self.step_index, self.num_steps = RequestStatus.WAITING, 0, 0
        self.generator = self.sampler = self.timesteps = self.latents = self.uncond = None
        self.cond, self.cached = {}, {}

    @property
    def uses_cfg(self) -> bool:
        return self.uncond is not None

    @property
    def reuses_deep(self) -> bool:
        """This step runs the shallow path on the cached deep features, decided from this request's own state
        alone: DeepCache's schedule (adapters/step_cache.py), every ``N``-th step full, and also every step of its
        first ``DEEPCACHE_WARMUP`` and last ``DEEPCACHE_FINISH`` of steps."""
        cache = self.cache
        if cache is None or cache.method != "deepcache" or "deep" not in self.cached:
            return False
        i, n = self.step_index, self.num_steps
        if i < math.ceil(DEEPCACHE_WARMUP * n) or i >= n - math.ceil(DEEPCACHE_FINISH * n):
            return False
        return i % int(cache.value) != 0

    @property
    def probes_first_block(self) -> bool:
        """This request runs First-Block-Cache: every step its first block decides, from its own residual,
        whether its other blocks run (adapters/step_cache.py)."""
        return self.cache is not None and self.cache.method == "fbcache"

    @property
    def remaining_steps(self) -> int:
        return self.num_steps - self.step_index
