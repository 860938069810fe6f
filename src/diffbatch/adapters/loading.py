"""Find a model (local folder, hub id, or the embedded default), pick its adapter, load it on a device."""

from __future__ import annotations

import importlib
import json
import os
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .base import Adapter

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
        raise ModelLoadError(f"--device {device!r} is not a device (use cpu, cuda, cuda:N or mps)") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available()
                                  or (parsed.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else \
            f"no CUDA (torch {torch.__version__})"
        raise ModelLoadError(f"--device {device!r} is not available here: {found}")
    if parsed.type == "mps" and not _mps_available():
        raise ModelLoadError(f"--device {device!r} is not available here: no Apple MPS")
    return parsed


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``None`` means float16 on CUDA and float32 elsewhere."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype!r} is invalid: must be one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that names a file system place is a path.
    return (Path(model).expanduser().exists() or model.startswith((".", "/", "~"))
            or model.count("/") > 1 or "\\" in model)


def read_model_index(model: str) -> dict[str, Any]:
    """The pipeline's model_index.json, from a folder or (cache-aware, offline-aware) from the hub."""
    if _looks_like_path(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"model path {model!r} does not exist")
        index = folder / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"model path {model!r} is not a diffusers pipeline (no model_index.json)")
        return json.loads(index.read_text())
    from diffusers import DiffusionPipeline

    offline = hub_offline()
    try:
        return dict(DiffusionPipeline.load_config(model, local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "cannot load"
        why = "it is not in the local cache and HF_HUB_OFFLINE is set" if offline else type(exc).__name__
        raise ModelLoadError(f"model {model!r} is neither a local folder nor a loadable hub id: {why}") from None


def hub_offline() -> bool:
    """Read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def adapter_class(class_name: str, model: str) -> type[Adapter]:
    target = ADAPTERS.get(class_name)
    if target is None:
        raise ModelLoadError(f"model {model!r} is a {class_name}, which diffbatch does not support yet; "
                             f"supported: {', '.join(sorted(set(ADAPTERS)))}")
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module_name}"), cls_name)


def default_model() -> str:
    from ..models import default_model_path

    return str(default_model_path())


def load_adapter(model: str | os.PathLike | None, device: str | None = None, dtype: str | None = None,
                 invariant: bool = True) -> Adapter:
    """``invariant=False`` skips the batch-invariance kernels and fixed call shapes (benchmarks compare)."""
    model = default_model() if model is None else os.fspath(model)
    index = read_model_index(model)
    cls = adapter_class(index.get("_class_name", "?"), model)
    torch_device = resolve_device(device)
    pipe = cls.load_pipeline(model, resolve_dtype(dtype, torch_device))
    pipe.set_progress_bar_config(disable=True)
    return cls(pipe.to(torch_device), name=Path(model).name if _looks_like_path(model) else model,
               invariant=invariant)


def from_pretrained(pipeline_class: Any, model: str, dtype: torch.dtype, **extra: Any) -> Any:
    """Every family loads alike: safetensors only (never pickle), from the local cache when offline, no remote
    code, and the ``variant="fp16"`` weights when float16 is asked and the model has them."""
    kwargs = dict(dtype=dtype, use_safetensors=True, local_files_only=hub_offline(), **extra)
    if dtype == torch.float16 and has_fp16_variant(model):
        kwargs["variant"] = "fp16"
    return pipeline_class.from_pretrained(model, **kwargs)


FP16_WEIGHTS = "*/*.fp16*.safetensors"  # unet/diffusion_pytorch_model.fp16.safetensors, sharded ones too


def has_fp16_variant(model: str) -> bool:
    """Whether a folder, or a hub repo (its local cache when offline), has ``variant="fp16"`` safetensors."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return any(folder.glob(FP16_WEIGHTS))
    try:
        return _cached_fp16_variant(model) if hub_offline() else _hub_fp16_variant(model)
    except Exception:  # noqa: BLE001 - cannot tell: load the default weights (from_pretrained reports real errors)
        return False


def _hub_fp16_variant(repo: str) -> bool:
    from huggingface_hub import list_repo_files

    return any(fnmatch(name, FP16_WEIGHTS) for name in list_repo_files(repo))


def _cached_fp16_variant(repo: str) -> bool:
    from huggingface_hub import snapshot_download

    return any(Path(snapshot_download(repo, local_files_only=True, allow_patterns=["*.json"])).glob(FP16_WEIGHTS))
