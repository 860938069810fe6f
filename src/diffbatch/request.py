"""Request: the engine-side, mutable state of one image.

The user-facing ``GenerationSpec`` stays frozen; everything that changes while an image is made lives here.
Tensor-valued fields are opaque to the scheduler (it never imports torch); only the runner touches them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .spec import GenerationSpec


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
    cache_every: int = 0  # step cache (DeepCache): the deep features are computed every this many steps; 0: off
    deep: Any = None  # the deep features of its last full step, one row per denoiser row ([2 or 1, C, h, w])
    started: float = 0.0  # perf_counter at admission

    @property
    def uses_cfg(self) -> bool:
        return self.uncond is not None

    @property
    def reuses_deep(self) -> bool:
        """This step runs the shallow path on the cached deep features: DeepCache's uniform schedule, a full
        step at step 0, N, 2N, ... (adapters/step_cache.py), decided from this request's own state alone."""
        return self.cache_every > 0 and self.deep is not None and self.step_index % self.cache_every != 0

    @property
    def remaining_steps(self) -> int:
        return self.num_steps - self.step_index
