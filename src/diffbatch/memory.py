"""Memory-safe batch sizes: how many images one denoiser call or one VAE decode may take.

Policy (``--batch-size auto``, the default of the CLI):
- Budget: on CUDA, ``CUDA_FREE_FRACTION`` of the device's free memory (weights are already loaded, so free
  memory is what activations may use); elsewhere ``CPU_RAM_FRACTION`` of the available RAM (``MemAvailable``).
  Read once per image shape, when that shape is first planned.
- Per-image estimate: activation bytes grow with the image's pixels, the rows per image (2 with CFG) and the
  element size: ``DENOISER_BYTES_PER_PIXEL`` and ``DECODER_BYTES_PER_PIXEL`` per pixel, row and element byte.
  They are deliberately rough (calibrated on SD-1.5 at 512x512 float16: about 1 GB per CFG image in the
  UNet, 1.5 GB per image in the VAE decoder); an estimate that is too high costs throughput, one that is too
  low costs one split.
- The limit is ``budget // per_image``, at least 1 and at most ``AUTO_CAP`` (bigger batches gain nothing).
- Out of memory anyway (another process took memory, the estimate was low): the runner splits the batch in
  two halves, retries each (rows are independent and batch-invariant, so images do not change), and the
  limit for that shape drops to the half for the rest of the run. A fixed ``--batch-size N`` gets the same
  split-and-retry; only the starting limit differs.

Test hook: ``DIFFBATCH_SIMULATE_OOM_ABOVE=N`` raises the device's out-of-memory error for any denoiser call
or VAE decode of more than N images (per stage: ``engine.limits.decode.simulate_oom_above = N``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

AUTO = "auto"
BatchSize = int | Literal["auto"]

AUTO_CAP = 64  # most images per call under "auto", whatever the memory
CUDA_FREE_FRACTION = 0.8  # of free device memory, for activations
CPU_RAM_FRACTION = 0.5  # of available RAM; the rest is for the process, the OS and other jobs
DENOISER_BYTES_PER_PIXEL = 1000  # activation bytes per output pixel, per row, per byte of element size
DECODER_BYTES_PER_PIXEL = 3000  # the VAE decoder works at full resolution: heavier per pixel
SIMULATE_ENV = "DIFFBATCH_SIMULATE_OOM_ABOVE"

Shape = tuple[int, int]  # (height, width) in pixels
T = TypeVar("T")
R = TypeVar("R")


def is_out_of_memory(exc: BaseException) -> bool:
    """``torch.OutOfMemoryError`` (CUDA, and others that raise it), or a ``RuntimeError`` saying so (MPS, CPU
    allocators, older PyTorch)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def available_bytes(device_type: str) -> int:
    """Memory activations may use now: free CUDA memory, or available RAM elsewhere."""
    if device_type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free * CUDA_FREE_FRACTION)
    return int(_ram_available() * CPU_RAM_FRACTION)


def _ram_available() -> int:
    """``MemAvailable`` from /proc/meminfo (Linux); free physical pages elsewhere."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def denoiser_bytes(shape: Shape, element_size: int, rows: int = 2) -> int:
    """Estimated activation bytes of one image in a denoiser call (``rows`` = 2 with CFG)."""
    return shape[0] * shape[1] * rows * element_size * DENOISER_BYTES_PER_PIXEL


def decoder_bytes(shape: Shape, element_size: int) -> int:
    """Estimated activation bytes of one image in a VAE decode."""
    return shape[0] * shape[1] * element_size * DECODER_BYTES_PER_PIXEL


def fit(budget: int, per_image: int, cap: int = AUTO_CAP) -> int:
    """Images of ``per_image`` bytes that fit ``budget``: at least 1, at most ``cap``."""
    return max(1, min(cap, budget // max(1, per_image)))


@dataclass
class StageLimit:
    """The batch limit of one stage (denoiser or decoder), per image shape, lowered on out-of-memory."""

    cap: int  # the user's fixed size, or AUTO_CAP
    estimate: Callable[[Shape], int] | None = None  # shape -> images that fit; None: always ``cap``
    simulate_oom_above: int | None = None  # tests: raise OOM for calls of more images than this
    _limits: dict[Shape, int] = field(default_factory=dict)

    def __call__(self, shape: Shape) -> int:
        if shape not in self._limits:
            self._limits[shape] = self.cap if self.estimate is None else min(self.cap, self.estimate(shape))
        return self._limits[shape]

    def lower(self, shape: Shape, failed: int) -> None:
        """A call of ``failed`` images ran out of memory: at most half of it from now on."""
        self._limits[shape] = max(1, min(self(shape), (failed + 1) // 2))

    def check_simulated(self, images: int) -> None:
        if self.simulate_oom_above is not None and images > self.simulate_oom_above:
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {images} images > "
                                         f"{SIMULATE_ENV}={self.simulate_oom_above})")


@dataclass
class BatchLimits:
    """Denoiser and decoder limits of one engine."""

    denoise: StageLimit
    decode: StageLimit
    splits: int = 0  # out-of-memory splits so far (for logs and tests)

    def run_split(self, stage: StageLimit, shape: Shape, items: list[T], call: Callable[[list[T]], list[R]]
                  ) -> list[R]:
        """``call(items)``; on out-of-memory, lower ``stage``'s limit and run each half on its own."""
        try:
            stage.check_simulated(len(items))
            return call(items)
        except Exception as exc:
            if len(items) == 1 or not is_out_of_memory(exc):
                raise
        # Out of the except block: the traceback (and the tensors its frames hold) is released first.
        self.splits += 1
        stage.lower(shape, len(items))
        _release_cached_memory()
        half = (len(items) + 1) // 2
        return self.run_split(stage, shape, items[:half], call) + self.run_split(stage, shape, items[half:], call)


def _release_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def batch_limits(batch_size: BatchSize, device_type: str, element_size: int,
                 vae_batch_size: int | None = None) -> BatchLimits:
    """Limits for ``--batch-size`` (an int, or "auto": estimated from memory) on this device."""
    simulate = os.environ.get(SIMULATE_ENV)
    above = int(simulate) if simulate else None
    if batch_size == AUTO:
        budget = lambda: available_bytes(device_type)  # noqa: E731 - read when a shape is first planned
        denoise = StageLimit(AUTO_CAP, lambda shape: fit(budget(), denoiser_bytes(shape, element_size)), above)
        decode = StageLimit(vae_batch_size or AUTO_CAP,
                            lambda shape: fit(budget(), decoder_bytes(shape, element_size)), above)
        return BatchLimits(denoise, decode)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch size {batch_size!r} is invalid: must be an integer >= 1 or 'auto'")
    return BatchLimits(StageLimit(batch_size, None, above), StageLimit(vae_batch_size or batch_size, None, above))
