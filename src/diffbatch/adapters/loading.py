"""Find a model (local folder, hub id, or the embedded default), pick its adapter, load it on a device."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..hardware import cpu_features, cpu_name, native_bfloat16
from ..models import default_model_path
from ..options import AUTO_DTYPE, BACKENDS
from .base import Adapter
from .config import PipelineConfig
from .hub import denoiser_bytes, looks_like_path, model_fingerprint, read_model_index

# model_index.json ``_class_name`` -> "module:AdapterClass" (imported only when a model of that family loads)
ADAPTERS: dict[str, str] = {
    "StableDiffusionPipeline": "stable_diffusion:StableDiffusionAdapter",
    "StableDiffusionImg2ImgPipeline": "stable_diffusion:StableDiffusionAdapter",
    "StableDiffusionXLPipeline": "sdxl:StableDiffusionXLAdapter",
    "StableDiffusionXLImg2ImgPipeline": "sdxl:StableDiffusionXLAdapter",
    "StableDiffusion3Pipeline": "sd3:StableDiffusion3Adapter",
    "StableDiffusion3Img2ImgPipeline": "sd3:StableDiffusion3Adapter",
    "FluxPipeline": "flux:FluxAdapter",
    "FluxImg2ImgPipeline": "flux:FluxAdapter",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | None) -> torch.device:
    """``None`` picks the best available: CUDA, then Apple's MPS, then the CPU."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"device {device!r} is not a device (use cpu, cuda, cuda:N or mps)",
                             field="device") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available()
                                  or (parsed.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else \
            f"no CUDA (torch {torch.__version__})"
        raise ModelLoadError(f"device {device!r} is not available here: {found}", field="device")
    if parsed.type == "mps" and not _mps_available():
        raise ModelLoadError(f"device {device!r} is not available here: no Apple MPS", field="device")
    return parsed


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


# "auto" on a CPU takes bfloat16 only for denoisers at least this big on disk: measured on an AVX512_BF16 EPYC,
# bfloat16 ran the SD-1.5 UNet (3.4 GB in float32) 2.57x float32, but the embedded 5 MB model 0.73-0.98x.
BF16_MIN_DENOISER_BYTES = 200_000_000


def resolve_dtype(dtype: str | None, device: torch.device, denoiser_bytes: int | None = None) -> torch.dtype:
    """``None`` or "auto": float16 on CUDA; on a CPU bfloat16 where it computes it natively (AVX512_BF16 or
    AMX) and the denoiser is big enough to gain (``denoiser_bytes``, None: assume it is), float32 elsewhere.
    bfloat16 on a CPU that would only emulate it (~30x slower) is refused."""
    if dtype is None or dtype == AUTO_DTYPE:
        if device.type == "cuda":
            return torch.float16
        large = denoiser_bytes is None or denoiser_bytes >= BF16_MIN_DENOISER_BYTES
        return torch.bfloat16 if device.type == "cpu" and native_bfloat16() and large else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is invalid: must be one of {AUTO_DTYPE}, {', '.join(DTYPES)}",
                             field="dtype")
    if dtype == "bfloat16" and device.type == "cpu" and not native_bfloat16():
        raise ModelLoadError(f"dtype 'bfloat16' is refused on this CPU ({cpu_name()}; {cpu_features()}): it has no "
                             "AVX512_BF16 or AMX, so torch emulates bfloat16 (measured 33x slower than float32); "
                             "use float32, or auto", field="dtype")
    return DTYPES[dtype]


def adapter_class(class_name: str, model: str) -> type[Adapter]:
    target = ADAPTERS.get(class_name)
    if target is None:
        raise ModelLoadError(f"model {model!r} is a {class_name}, which diffbatch does not support yet; "
                             f"supported: {', '.join(sorted(set(ADAPTERS)))}")
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module_name}"), cls_name)


def default_model() -> str:
    return str(default_model_path())


def load_adapter(model: str | os.PathLike | None, device: str | None = None, dtype: str | None = None,
                 invariant: bool = True, backend: str = "torch") -> Adapter:
    """``invariant=False`` skips the batch-invariance kernels and fixed call shapes (benchmarks compare);
    ``backend``: what runs the models, torch or OpenVINO (adapters/openvino.py)."""
    model, cls = _find(model)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device, denoiser_bytes(model))
    check_backend(backend, torch_device, torch_dtype)  # before the weights load
    pipe = cls.load_pipeline(model, torch_dtype).to(torch_device)
    pipe.set_progress_bar_config(disable=True)
    adapter = cls(PipelineConfig.of(pipe), _display_name(model), pipe, invariant=invariant, backend=backend)
    adapter.fingerprint = model_fingerprint(model)
    return adapter


def check_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    if backend not in BACKENDS:
        raise ModelLoadError(f"backend {backend!r} is invalid: must be one of {', '.join(BACKENDS)}",
                             field="backend")
    if backend == "openvino":
        from .openvino import check_openvino  # an optional dependency

        check_openvino(device, dtype)


def describe(model: str | os.PathLike | None, backend: str = "torch") -> Adapter:
    """A configuration-only adapter for ``model``: it resolves and checks specs exactly as the model loaded on
    ``backend`` would, from the JSON files alone (no weights read, nothing but JSON downloaded), and makes no
    images."""
    model, cls = _find(model)
    adapter = cls(PipelineConfig.read(model), _display_name(model), backend=backend)
    adapter.fingerprint = model_fingerprint(model)
    return adapter


def _find(model: str | os.PathLike | None) -> tuple[str, type[Adapter]]:
    model = default_model() if model is None else os.fspath(model)
    return model, adapter_class(read_model_index(model).get("_class_name", "?"), model)


def _display_name(model: str) -> str:
    return Path(model).name if looks_like_path(model) else model
