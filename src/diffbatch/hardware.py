"""What this machine computes natively, as torch reports it: decides ``dtype="auto"`` and refuses a dtype a
CPU would only emulate.

Measured (SD-1.5 UNet architecture, one forward at batch 2, 32x32 latents, 2 threads): on an AMD EPYC with
AVX512_BF16 (no AMX) bfloat16 took 1.4 s against 3.0 s in float32; on an AMD EPYC with AVX2 only it took
249 s against 7.65 s (emulated, 33x slower); on an Intel Xeon with AMX bfloat16 autocast ran 2.47x float32.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from .numerics import NumericPath


def _cpu_has(probe: str) -> bool:
    """torch's answer to one of its ``torch.cpu._is_*_supported`` probes (False where this torch lacks it)."""
    return bool(getattr(torch.cpu, probe, lambda: False)())


def amx() -> bool:
    """Whether this CPU has AMX tiles, whose bfloat16 kernels move a row's bits with its batch and thread count
    (adapters/invariance.py runs bfloat16 at fixed call shapes there)."""
    return _cpu_has("_is_amx_tile_supported")


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512_BF16 or AMX) that torch's kernels use."""
    return _cpu_has("_is_avx512_bf16_supported") or amx()


@functools.cache
def cpu_name() -> str:
    """The CPU's model name, with family and model numbers (virtual machines often say only "AMD EPYC")."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def cpu_features() -> str:
    """The vector features that decide CPU speed, e.g. ``AVX2 AVX512 AVX512_BF16`` (no AMX)."""
    names = {"AVX2": "_is_avx2_supported", "AVX512": "_is_avx512_supported",
             "AVX512_BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    found = [name for name, probe in names.items() if _cpu_has(probe)]
    return " ".join(found) or "no AVX2"


def missing_numerics(path: NumericPath) -> str:
    """What this machine lacks to make images on ``path`` ("" when nothing), said as the end of a sentence."""
    if path.device == "cuda" and not torch.cuda.is_available():
        return "has no CUDA device"
    if path.device == "mps" and not torch.backends.mps.is_available():
        return "has no Apple (MPS) device"
    if path.device == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return "has no Intel XPU device"
    if path.device == "cpu" and path.dtype == "bfloat16" and not native_bfloat16():
        return f"computes bfloat16 only by emulation ({cpu_name()}: {cpu_features()})"
    return ""
