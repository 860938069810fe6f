"""The OpenVINO backend (``backend="openvino"``, CPU only; ``pip install "diffbatch[openvino]"``): the
denoiser, the model's dominant cost, and the VAE decoder run as OpenVINO compiled models converted from the
loaded diffusers modules (``openvino.convert_model``: no hub export step, no optimum pins). Prompt encoding
(a cached, small cost), the VAE encoder (image-to-image), the samplers and the engine's step-level batching
stay in torch. The VAE decodes one image per call (``VAE_IMAGES``).

Shapes: every denoiser call runs ``DENOISER_ROWS`` rows (the last call padded), so one conversion serves
each latent size, and a row's result does not depend on its neighbours (measured bit-identical). One
conversion per input signature (latent size, conditioning shapes) is made on first use and cached on disk,
keyed by the module's weights and config and the library versions, so a second run only compiles.

Precision: the adapter's dtype. float32 runs exactly (``INFERENCE_PRECISION_HINT=f32``: max difference to
torch float32 4e-6 on the SD-1.5 UNet); bfloat16 (where native) runs OpenVINO's bfloat16 kernels. Not
thread-count-invariant: OpenVINO splits work by its thread count (its default, one per core), and 1 thread
gave other bits than 2 on the development CPU, so images match across processes with the same thread count
only (Ray actors with one CPU differ from a local run).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError

DENOISER_ROWS = 4  # rows per OpenVINO denoiser call: 2 images with CFG; measured 1.5x torch at this size
VAE_IMAGES = 1  # images per OpenVINO VAE decode: one conversion per image size; batching gains little on a CPU
PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ModelLoadError(f"backend 'openvino' needs OpenVINO: pip install 'diffbatch[openvino]' ({exc})",
                             field="backend") from None
    return openvino


def check_openvino(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse what this backend cannot run, before any weight loads."""
    import_openvino()
    if device.type != "cpu":
        raise ModelLoadError(f"backend 'openvino' runs on the CPU only, not on device {str(device)!r}",
                             field="backend")
    if dtype not in PRECISIONS:
        raise ModelLoadError(f"backend 'openvino' runs float32 or bfloat16, not {str(dtype).removeprefix('torch.')}",
                             field="backend")


def cache_root() -> Path:
    """``$DIFFBATCH_CACHE/openvino``, else ``$XDG_CACHE_HOME/diffbatch/openvino`` or ``~/.cache/...``."""
    if os.environ.get("DIFFBATCH_CACHE"):
        return Path(os.environ["DIFFBATCH_CACHE"]) / "openvino"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffbatch" / "openvino"


class OpenVINODenoiser:
    """Called like the diffusers denoiser it replaces (``module(*args, **kwargs, return_dict=False)[0]``);
    runs the compiled model for the call's input signature."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        check_openvino(device, dtype)
        self.ov = import_openvino()
        self.core = self.ov.Core()
        self.module = module
        self.config = module.config
        self.dtype = dtype
        self.hint = PRECISIONS[dtype]
        self.folder = cache_root() / _fingerprint(module, self.ov.__version__)
        self._compiled: dict[str, Any] = {}

    def __call__(self, *args: Any, return_dict: bool = False, **kwargs: Any) -> tuple[torch.Tensor]:
        template, tensors = _flatten((args, kwargs))
        key = _signature(template, tensors)
        if key not in self._compiled:
            self._compiled[key] = self.core.compile_model(self._model(key, template, tensors), "CPU",
                                                          {"INFERENCE_PRECISION_HINT": self.hint})
        out = self._compiled[key]([t.detach().to(torch.float32).numpy() for t in tensors])[0]
        return (torch.from_numpy(out.copy()).to(self.dtype),)

    def _model(self, key: str, template: Any, tensors: Sequence[torch.Tensor]) -> Any:
        """The converted model for one signature: from the disk cache, or converted now and cached."""
        path = self.folder / f"{key}.xml"
        if path.is_file():
            return self.core.read_model(path)
        module = self.module if self.module.dtype == torch.float32 else copy.deepcopy(self.module).float()
        example = tuple(t.detach().to(torch.float32) for t in tensors)
        with torch.no_grad():
            model = self.ov.convert_model(_Flat(module, template), example_input=example,
                                          input=[list(t.shape) for t in example])
        self._save(model, path)
        return model

    def _save(self, model: Any, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        try:  # whole or not at all: a reader never sees half an IR
            self.ov.save_model(model, scratch / path.name, compress_to_fp16=False)
            os.replace(scratch / path.with_suffix(".bin").name, path.with_suffix(".bin"))
            os.replace(scratch / path.name, path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


class VaeDecoder(nn.Module):
    """``vae.decode`` as a module (what OpenVINO converts); ``install`` routes the VAE's decode through an
    OpenVINO model of it, leaving ``encode`` (image-to-image) to torch."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.config = vae.config

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def forward(self, latents: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        return type(self.vae).decode(self.vae, latents, return_dict=False)  # the class's: install replaces it

    @classmethod
    def install(cls, vae: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        decoder = OpenVINODenoiser(cls(vae), dtype, device)
        vae.decode = lambda latents, return_dict=False: decoder(latents)


class _Flat(nn.Module):
    """The denoiser with its inputs as one flat tuple of tensors (what ``convert_model`` traces)."""

    def __init__(self, module: nn.Module, template: Any) -> None:
        super().__init__()
        self.module = module
        self.template = template

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        args, kwargs = _rebuild(self.template, tensors)
        return self.module(*args, **kwargs, return_dict=False)[0]


class _Slot(int):
    """Where a tensor stood in a call's arguments (its index in the flat tuple)."""


def _flatten(value: Any, tensors: list[torch.Tensor] | None = None) -> tuple[Any, list[torch.Tensor]]:
    tensors = [] if tensors is None else tensors
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1), tensors
    if isinstance(value, dict):
        return {k: _flatten(v, tensors)[0] for k, v in value.items()}, tensors
    if isinstance(value, list | tuple):
        return type(value)(_flatten(v, tensors)[0] for v in value), tensors
    return value, tensors


def _rebuild(template: Any, tensors: Sequence[torch.Tensor]) -> Any:
    if isinstance(template, _Slot):
        return tensors[template]
    if isinstance(template, dict):
        return {k: _rebuild(v, tensors) for k, v in template.items()}
    if isinstance(template, list | tuple):
        return type(template)(_rebuild(v, tensors) for v in template)
    return template


def _signature(template: Any, tensors: Sequence[torch.Tensor]) -> str:
    text = repr((_describe(template), [tuple(t.shape) for t in tensors]))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _describe(template: Any) -> Any:
    if isinstance(template, _Slot):
        return f"<tensor {int(template)}>"
    if isinstance(template, dict):
        return {k: _describe(v) for k, v in sorted(template.items())}
    if isinstance(template, list | tuple):
        return [_describe(v) for v in template]
    return repr(template)


def _fingerprint(module: nn.Module, openvino_version: str) -> str:
    """The module's identity for the disk cache: every weight's bytes, its config, and the versions of the
    libraries that shape the conversion."""
    import diffusers

    from .. import __version__

    digest = hashlib.sha256()
    versions = (__version__, openvino_version, torch.__version__, diffusers.__version__, type(module).__name__)
    digest.update(json.dumps([versions, dict(module.config)], sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())  # no copy
    return digest.hexdigest()[:24]
