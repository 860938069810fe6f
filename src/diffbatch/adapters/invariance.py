"""Batch- and thread-invariant execution: a row's result must not depend on how many rows share the call,
where in the call it sits, or how many threads compute it.

One design, two mechanisms chosen per device (``CallShape`` below):

- **CPU: invariant kernels.** Measured op by op on the development CPU (PyTorch 2.13, oneDNN/MKL, 1-4
  threads, SD-1.5 channel widths; ``benchmarks/invariance_probe.py`` repeats the measurement on any machine),
  3x3 and strided convolutions, 3-D linears, attention, LayerNorm and contiguous GroupNorm give every row the
  same bits for any batch size >= 2 and any thread count. Three things do not, and are replaced here:
  (1) oneDNN's 1x1 convolution splits its channel reduction by thread count (rows differ between 1 and 2
  threads) -> computed as a GEMM over the channels, which does not (float32 and bfloat16; float16 on a CPU
  keeps oneDNN's kernel, whose rounding no GEMM reproduces, so it is not thread-invariant); (2) ``[N, C]``
  linears (time, guidance and pooled-text embeddings) pick their GEMM kernel by N -> computed in GEMMs of a
  fixed row count (``LINEAR_ROWS``, zero-padded), which gives every row the same bits at any position;
  (3) GroupNorm on
  channels-last input (diffusers' VAE attention returns channels-last views) rounds by N and by thread count
  -> made contiguous first; (4) elementwise activations (SiLU, GELU, ...) finish each thread's chunk with
  scalar code that rounds exp/tanh differently from the vector code, so where chunks split moves bits with
  the thread count (seen at 3 threads) -> inputs padded so that every chunk is whole vector steps. A
  one-row call is never made (some kernels take another path at N = 1): calls are padded to two rows.
- **CUDA (and MPS): fixed shapes.** cuBLAS and cuDNN choose kernels (split-K, algorithms) by problem size,
  so no per-op patch makes a row independent of N there; instead every model call of a stage runs the same
  number of rows (chunked, the last chunk padded by repeating a row), with cuDNN's autotuner off and TF32
  off, so a row always meets the same kernels. The cost is the padding of a part-full call.
- **bfloat16 on a CPU with AMX: both, and one thread count.** oneDNN's bfloat16 kernels differ by ISA: with
  AVX512_BF16 alone (AMD EPYC, benchmarks/invariance_probe.py) every stage is row-invariant at any N and
  thread count, stock kernels included, so those CPUs run as in float32. Intel's AMX kernels (tiles, packed
  weights, the flash-attention kernel's pack-or-not choice made from the batch and the thread count) gave 4 of
  4 images another PNG at ``--batch-size`` 1 and 4. There a bfloat16 row, whatever its company, meets one shape
  at every GEMM and convolution: each stage runs a fixed row count (``cpu_bf16_shapes``), at the thread count
  the model was loaded with (``CallShape.threads``, set around every call: a later ``torch.set_num_threads``
  changes no image); the invariant kernels stay on beneath. This assumes what the CUDA design assumes: at one
  shape a row's bits do not depend on its position or its neighbours (no AMX machine was at hand to measure
  it). The cost: a part-full call computes its padding (benchmarks/bf16_exactness.py).

Everything here is exact: the patched ops compute the same sums as the ops they replace (max difference
~1e-6 in float32), and the images still match diffusers' single-image call to <= 1e-4.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..hardware import amx

CUDA_DENOISER_ROWS = 16  # rows per denoiser call on CUDA: 8 images with CFG
CUDA_VAE_IMAGES = 1  # images per VAE encode/decode call on CUDA (decode memory grows fast with size)
CUDA_TEXT_ROWS = 8  # prompts per text-encoder call on CUDA
LINEAR_ROWS = 16  # rows per GEMM of an [N, C] linear on a CPU (time, guidance and pooled-text embeddings)
# bfloat16 on an AMX CPU: rows per denoiser call (4 guided images: batching's gain on AMX is large, measured
# 355 -> 710 GFLOP/s from 2 to 8 rows), prompts per text-encoder call, images per VAE call
CPU_BF16_DENOISER_ROWS = 8
CPU_BF16_TEXT_ROWS = 4
CPU_BF16_VAE_IMAGES = 1


@dataclass(frozen=True)
class CallShape:
    """Rows per model call for one stage: ``fixed`` rows per call (chunked and padded), or any count of at
    least ``minimum`` rows when ``fixed`` is None; ``threads``: the torch thread count every call runs at (None:
    whatever is set)."""

    minimum: int = 2
    fixed: int | None = None
    threads: int | None = None

    def calls(self, rows: int) -> Iterator[tuple[slice, int]]:
        """The calls for ``rows`` rows: each as (the real rows it computes, the rows it runs, padding incl.)."""
        size = self.fixed or max(rows, self.minimum)
        for start in range(0, rows, size):
            yield slice(start, min(start + size, rows)), size


@dataclass(frozen=True)
class CallShapes:
    """The call shape of each stage on one device."""

    text: CallShape
    denoiser: CallShape
    vae: CallShape


CPU_SHAPES = CallShapes(text=CallShape(), denoiser=CallShape(), vae=CallShape())
FIXED_SHAPES = CallShapes(text=CallShape(1, CUDA_TEXT_ROWS), denoiser=CallShape(1, CUDA_DENOISER_ROWS),
                          vae=CallShape(1, CUDA_VAE_IMAGES))
DYNAMIC_SHAPES = CallShapes(text=CallShape(1), denoiser=CallShape(1), vae=CallShape(1))  # invariance off


def call_shapes(device: torch.device, invariant: bool = True, dtype: torch.dtype = torch.float32) -> CallShapes:
    if not invariant:
        return DYNAMIC_SHAPES
    if device.type != "cpu":
        return FIXED_SHAPES
    return cpu_bf16_shapes(torch.get_num_threads()) if dtype == torch.bfloat16 and amx() else CPU_SHAPES


def cpu_bf16_shapes(threads: int) -> CallShapes:
    """bfloat16 on an AMX CPU: every stage at a fixed row count and at ``threads`` threads (module docstring)."""
    def fixed(rows: int) -> CallShape:
        return CallShape(minimum=1, fixed=rows, threads=threads)

    return CallShapes(text=fixed(CPU_BF16_TEXT_ROWS), denoiser=fixed(CPU_BF16_DENOISER_ROWS),
                      vae=fixed(CPU_BF16_VAE_IMAGES))


def make_batch_invariant(modules: Sequence[nn.Module | None], device: torch.device) -> None:
    """Make ``modules`` batch- and thread-invariant on ``device`` (in place; see the module docstring)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # the autotuner may pick another algorithm on another run
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if device.type != "cpu":
        return
    for module in modules:
        for layer in module.modules() if module is not None else ():
            patch = _cpu_patch(layer)
            if patch is not None:
                layer.forward = types.MethodType(patch, layer)


def _cpu_patch(layer: nn.Module) -> Callable[..., torch.Tensor] | None:
    if _is_activation(layer):
        return _aligned(type(layer).forward)
    if hasattr(layer, "gelu") and type(layer).__module__.startswith("diffusers."):  # GELU, GEGLU: proj, then gelu
        layer.gelu = types.MethodType(_aligned(type(layer).gelu), layer)
        return None
    if isinstance(layer, nn.Linear):
        return _bucketed_linear
    if isinstance(layer, nn.GroupNorm):
        return _contiguous_group_norm
    if isinstance(layer, nn.Conv2d) and _is_pointwise(layer) and layer.weight.dtype != torch.float16:
        # float16 on a CPU: no GEMM reproduces oneDNN's float16 rounding, and diffusers' numbers come first.
        return _pointwise_conv_as_gemm
    return None


ACTIVATIONS = (nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Mish)
GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: elementwise ops split only tensors larger than this across threads
GELU_SERIAL_LIMIT = 16384  # GELU splits any tensor above this into one chunk per thread
VECTOR_BLOCK = 64  # elements per vectorised loop step, with margin (float32: 32 with AVX-512, 16 with AVX2)


def _is_activation(layer: nn.Module) -> bool:
    # transformers' activations (quick_gelu, gelu_new, ...) are elementwise modules too
    return isinstance(layer, ACTIVATIONS) or type(layer).__module__ == "transformers.activations"


def _aligned(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An elementwise ``forward`` made independent of the thread count.

    PyTorch splits an elementwise op over threads in equal chunks; each chunk runs a vectorised loop and
    finishes its last few elements with scalar code, whose exp/tanh round differently from the vector code
    (SLEEF). Where a chunk boundary falls therefore moves bits with the thread count (SiLU at 3 threads vs 1).
    Padding the flattened input so that every chunk is a whole number of vector steps sends every element
    through the vector code, whatever the thread count."""

    def run(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        padded = _aligned_numel(n, torch.get_num_threads())
        if padded == n and x.is_contiguous():
            return forward(self, x)
        flat = x.reshape(-1)
        return forward(self, torch.cat([flat, flat.new_zeros(padded - n)]))[:n].view(x.shape)

    return run


@functools.cache
def _aligned_numel(n: int, threads: int) -> int:
    """The least size >= n at which every thread's chunk is whole vector steps, under both ways PyTorch 2.x
    splits elementwise ops (ATen's ParallelOpenMP/Activation.cpp): ``used = min(threads, ceil(size /
    GRAIN_SIZE))`` chunks of ``ceil(size / used)`` (most ops), and ``threads`` chunks for anything above
    ``GELU_SERIAL_LIMIT`` elements (GELU)."""
    size = -(-n // VECTOR_BLOCK) * VECTOR_BLOCK
    while not all(-(-size // used) % VECTOR_BLOCK == 0 for used in _chunk_counts(size, threads)):
        size += VECTOR_BLOCK
    return size


def _chunk_counts(size: int, threads: int) -> set[int]:
    counts = {max(1, min(threads, -(-size // GRAIN_SIZE)))}
    if size > GELU_SERIAL_LIMIT:
        counts.add(threads)
    return counts


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid")
            and conv.dilation == (1, 1) and conv.groups == 1)


def _bucketed_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """An ``[N, C]`` linear as GEMMs of exactly ``LINEAR_ROWS`` rows (the last zero-padded): one GEMM shape, so one
    kernel, whatever N; measured row-invariant (position in the call, the other rows, 1-4 threads; float32 and
    bfloat16; benchmarks/invariance_probe.py). Replaced a call per row: 7,204 ``linear`` calls for 16 guided
    images x 20 steps of the tiny model, 15% of the run (issue 22).

    A ``[N, L, C]`` linear with fewer than ``LINEAR_ROWS`` tokens a row (attention at a 2x2 or 1x2 latent level:
    the embedded model's 4th level) picks its GEMM kernel by N * L too (measured: rows moved by ~1e-6 between
    N = 2 and 3 at L = 2), so it runs the same way on its flattened tokens; with more tokens a row, 3-D linears
    were measured invariant and keep the plain call."""
    if x.dim() == 3 and x.shape[1] < LINEAR_ROWS:
        n, tokens, channels = x.shape
        return _bucketed_linear(self, x.reshape(n * tokens, channels)).view(n, tokens, -1)
    if x.dim() != 2:
        return F.linear(x, self.weight, self.bias)
    outs = []
    for start in range(0, x.shape[0], LINEAR_ROWS):
        chunk = x[start : start + LINEAR_ROWS]
        rows = chunk.shape[0]
        if rows < LINEAR_ROWS:
            chunk = torch.cat([chunk, chunk.new_zeros(LINEAR_ROWS - rows, chunk.shape[1])])
        outs.append(F.linear(chunk, self.weight, self.bias)[:rows])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _contiguous_group_norm(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)


def _pointwise_conv_as_gemm(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # One batched GEMM per image, accumulated and biased in float32, rounded once: bit for bit what oneDNN's
    # bfloat16 convolution gives, and in float32 an NCHW output with no transposes to copy. The GEMM is spelled
    # out: torch.matmul picks its kernel by whether the weight requires grad (its "fold"), and loading a LoRA
    # turns that off on every base weight, which moved bits (measured).
    n, c, h, w = x.shape
    weight = self.weight.view(self.out_channels, c).float()  # float32 weights and inputs: ``float()`` is a no-op
    out = torch.bmm(weight.expand(n, self.out_channels, c), x.contiguous().reshape(n, c, h * w).float())
    if self.bias is not None:
        out = out + self.bias.float()[:, None]
    return out.to(x.dtype).view(n, self.out_channels, h, w)


def batch_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate into one contiguous batch: a one-image tensor can carry channels-last strides (from a VAE
    encode), and a batch built from it would stay channels-last."""
    return torch.cat(rows).contiguous()


def pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with its last row repeated up to ``size`` rows (the caller drops the extra rows)."""
    if x.shape[0] >= size:
        return x
    return torch.cat([x, x[-1:].expand(size - x.shape[0], *x.shape[1:])]).contiguous()


def run_in_calls(shape: CallShape, rows: int, call: Callable[[slice, int], Any]) -> Any:
    """``call(real_rows, size)`` for each call of ``shape`` over ``rows`` rows; each returns at least the
    real rows first (tensor, array, list, or a dict of tensors); their concatenation, exactly ``rows`` long."""
    with threads_set(shape.threads):
        outs = [_first_rows(call(real, size), real.stop - real.start) for real, size in shape.calls(rows)]
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], dict):
        return {key: torch.cat([out[key] for out in outs]) for key in outs[0]}
    if isinstance(outs[0], list):
        return [item for out in outs for item in out]
    return np.concatenate(outs) if isinstance(outs[0], np.ndarray) else torch.cat(outs)


@contextlib.contextmanager
def threads_set(threads: int | None) -> Iterator[None]:
    """Run the block at ``threads`` torch threads (None: as set), then restore the caller's count."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _first_rows(out: Any, rows: int) -> Any:
    return {key: value[:rows] for key, value in out.items()} if isinstance(out, dict) else out[:rows]
