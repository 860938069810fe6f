"""The Hugging Face side of loading: local folder or hub id, offline mode, safetensors-only and fp16-variant
pipeline loading. Shared by ``loading`` and every family's ``load_pipeline``."""

from __future__ import annotations

import hashlib
import json
import os
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError


def hub_offline() -> bool:
    """Read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that names a file system place is a path.
    return (Path(model).expanduser().exists() or model.startswith((".", "/", "~"))
            or model.count("/") > 1 or "\\" in model)


def read_model_index(model: str) -> dict[str, Any]:
    """The pipeline's model_index.json, from a folder or (cache-aware, offline-aware) from the hub."""
    if looks_like_path(model):
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


FINGERPRINT_BLOCKS = 32  # evenly spaced 4 KiB samples of each weights file: a retrained model differs in all
FINGERPRINT_BLOCK = 4096


def model_fingerprint(model: str) -> str:
    """What identifies the weights without reading all of them: a short sha256 over each ``*.safetensors``
    file's path, size, header (tensor names, shapes, dtypes) and 32 evenly spaced 4 KiB samples of its data
    (headers alone are the same for a retrained model of the same architecture). For a hub id, its cached
    snapshot's files; "" when they cannot be found."""
    folder = _local_folder(model)
    if folder is None:
        return ""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as file:
            header = int.from_bytes(file.read(8), "little")
            digest.update(file.read(min(header, 100_000_000)))
            for k in range(FINGERPRINT_BLOCKS):
                file.seek(8 + header + (size - 8 - header) * k // FINGERPRINT_BLOCKS)
                digest.update(file.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()[:10]


def denoiser_bytes(model: str) -> int | None:
    """Size on disk of the denoiser's weights (``unet/`` or ``transformer/`` safetensors); None when unknown
    (a hub id not in the cache)."""
    folder = _local_folder(model)
    if folder is None:
        return None
    sizes = [p.stat().st_size for name in ("unet", "transformer") for p in (folder / name).glob("*.safetensors")]
    return sum(sizes) if sizes else None


def _local_folder(model: str) -> Path | None:
    """The pipeline's files on this machine: the folder itself, or a hub id's cached snapshot."""
    folder = Path(model).expanduser() if looks_like_path(model) else _cached_snapshot(model)
    return folder if folder is not None and folder.is_dir() else None


def _cached_snapshot(repo: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "model_index.json")
    return Path(found).parent if isinstance(found, str) else None
