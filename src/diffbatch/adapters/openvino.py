"""The OpenVINO backend (``backend="openvino"``, CPU only; ``pip install "diffbatch[openvino]"``): the
denoiser, the VAE (encoder and decoder) and the text encoders run as OpenVINO compiled models converted from
the loaded diffusers and transformers modules (``openvino.convert_model``: no hub export step, no optimum
pins). The samplers, the VAE's latent distribution and the engine's step-level batching stay in torch.

Shapes: every call of a stage runs a fixed row count (``DENOISER_ROWS``, ``VAE_IMAGES``, ``TEXT_ROWS``; the
last call padded), so one conversion serves each latent size, and a row's result does not depend on its
neighbours (measured bit-identical). One
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
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError

DENOISER_ROWS = 4  # rows per OpenVINO denoiser call: 2 images with CFG; measured 1.5x torch at this size
VAE_IMAGES = 1  # images per OpenVINO VAE encode/decode: one conversion per image size; batching gains little
TEXT_ROWS = 1  # texts per OpenVINO text-encoder call: prompts are cached, so a call rarely has company
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


class OpenVINOModule:
    """One method of a module (``forward``, ``decode``, ``_encode``) as OpenVINO compiled models, called like
    the method it replaces and returning what it returns (tensors, tuples, transformers' ``ModelOutput``):
    one conversion per input signature (tensor shapes and the non-tensor arguments)."""

    def __init__(self, module: nn.Module, method: str, dtype: torch.dtype, device: torch.device,
                 weights: str | None = None) -> None:
        """``weights``: ``weights_digest(module)`` when the caller has it already (two methods of one module)."""
        check_openvino(device, dtype)
        self.ov = import_openvino()
        self.core = self.ov.Core()
        self.module = _Method(module, method)
        self.dtype = dtype
        self.hint = PRECISIONS[dtype]
        self.folder = cache_root() / _fingerprint(self.module, self.ov.__version__, weights or weights_digest(module))
        self._compiled: dict[str, tuple[Any, Any]] = {}

    @classmethod
    def install(cls, module: nn.Module, method: str, dtype: torch.dtype, device: torch.device,
                weights: str | None = None) -> OpenVINOModule:
        """Route ``module.<method>`` through OpenVINO (an instance attribute over the class's method, which
        the conversion traces)."""
        compiled = cls(module, method, dtype, device, weights)
        object.__setattr__(module, method, compiled)
        return compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        template, tensors = _flatten((args, kwargs))
        key = _signature(template, tensors)
        if key not in self._compiled:
            model, outputs = self._model(key, template, tensors)
            compiled = self.core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": self.hint})
            self._compiled[key] = compiled, outputs
        compiled, outputs = self._compiled[key]
        results = compiled([_example(t).numpy() for t in tensors])
        out = [torch.from_numpy(results[i].copy()) for i in range(len(results))]
        return _rebuild(outputs, [t.to(self.dtype) if t.is_floating_point() else t for t in out])

    def _model(self, key: str, template: Any, tensors: Sequence[torch.Tensor]) -> tuple[Any, Any]:
        """The converted model for one signature and the template of its outputs: from the disk cache, or
        converted now and cached."""
        path = self.folder / f"{key}.xml"
        if path.is_file() and path.with_suffix(".json").is_file():
            return self.core.read_model(path), _decode(json.loads(path.with_suffix(".json").read_text()))
        module = self.module if self.module.dtype == torch.float32 else _float_copy(self.module)
        example = tuple(_example(t) for t in tensors)
        flat = _Flat(module, template)
        with torch.no_grad():
            model = self.ov.convert_model(flat, example_input=example, input=[list(t.shape) for t in example])
        self._save(model, flat.outputs, path)
        return model, flat.outputs

    def _save(self, model: Any, outputs: Any, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        try:  # whole or not at all: a reader never sees half an IR (the .xml, written last, marks it whole)
            self.ov.save_model(model, scratch / path.name, compress_to_fp16=False)
            (scratch / path.with_suffix(".json").name).write_text(json.dumps(_encode(outputs)))
            for suffix in (".bin", ".json", ".xml"):
                os.replace(scratch / path.with_suffix(suffix).name, path.with_suffix(suffix))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def install(pipe: Any, denoiser: nn.Module, dtype: torch.dtype, device: torch.device) -> OpenVINOModule:
    """Move ``pipe``'s models to OpenVINO: the denoiser (returned: the adapter calls it), the VAE's decoder
    and encoder (``decode``, ``_encode``: ``encode`` still builds its distribution in torch) and every text
    encoder's ``forward``. Each converts on its first call, tracing the module as it is then."""
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            OpenVINOModule.install(encoder, "forward", encoder.dtype, device)
    vae = weights_digest(pipe.vae)  # read once for both of its methods
    OpenVINOModule.install(pipe.vae, "decode", pipe.vae.dtype, device, vae)
    OpenVINOModule.install(pipe.vae, "_encode", pipe.vae.dtype, device, vae)
    return OpenVINOModule(denoiser, "forward", dtype, device)


class _Method(nn.Module):
    """One method of a module as a module's ``forward``: what OpenVINO converts. It calls the class's method,
    never the instance attribute ``install`` puts over it."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module = module
        self.method = method

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(type(self.module), self.method)(self.module, *args, **kwargs)


class _Flat(nn.Module):
    """A method with its inputs and its outputs as flat tuples of tensors (what ``convert_model`` traces);
    ``outputs`` is the template that rebuilds the method's return value from the flat outputs."""

    def __init__(self, module: nn.Module, template: Any) -> None:
        super().__init__()
        self.module = module
        self.template = template
        self.outputs: Any = None

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = _rebuild(self.template, tensors)
        self.outputs, flat = _flatten(self.module(*args, **kwargs))
        return tuple(flat)


def _float_copy(method: _Method) -> _Method:
    """A float32 copy to trace (OpenVINO converts float32; the hint sets the precision it runs in), without
    the compiled models ``install`` put on the module (they are not copyable, and the copy calls the class's
    methods anyway)."""
    module = method.module
    installed = {k: v for k, v in vars(module).items() if isinstance(v, OpenVINOModule)}
    for name in installed:
        delattr(module, name)
    try:
        return _Method(copy.deepcopy(module).float(), method.method)
    finally:
        for name, compiled in installed.items():
            object.__setattr__(module, name, compiled)


def _example(tensor: torch.Tensor) -> torch.Tensor:
    """What OpenVINO gets for an input: floating tensors in float32 (the hint sets the precision), others
    (token ids) as they are."""
    tensor = tensor.detach()
    return tensor.to(torch.float32) if tensor.is_floating_point() else tensor


class _Slot(int):
    """Where a tensor stood in a call's arguments or results (its index in the flat tuple)."""


@dataclass(frozen=True)
class _Output:
    """A result class that is a dict of named fields (transformers' ``ModelOutput``, diffusers'
    ``BaseOutput``), rebuilt as that class so callers keep ``out.hidden_states`` and ``out[0]``."""

    cls: type
    fields: dict[str, Any]


def _flatten(value: Any, tensors: list[torch.Tensor] | None = None) -> tuple[Any, list[torch.Tensor]]:
    tensors = [] if tensors is None else tensors
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1), tensors
    if isinstance(value, dict):
        fields = {k: _flatten(v, tensors)[0] for k, v in value.items()}
        return (fields if type(value) is dict else _Output(type(value), fields)), tensors
    if isinstance(value, list | tuple):
        return type(value)(_flatten(v, tensors)[0] for v in value), tensors
    return value, tensors


def _rebuild(template: Any, tensors: Sequence[torch.Tensor]) -> Any:
    if isinstance(template, _Slot):
        return tensors[template]
    if isinstance(template, _Output):
        return template.cls(**_rebuild(template.fields, tensors))
    if isinstance(template, dict):
        return {k: _rebuild(v, tensors) for k, v in template.items()}
    if isinstance(template, list | tuple):
        return type(template)(_rebuild(v, tensors) for v in template)
    return template


def _encode(template: Any) -> Any:
    """An output template as JSON (cached beside its model)."""
    if isinstance(template, _Slot):
        return {"slot": int(template)}
    if isinstance(template, _Output):
        return {"output": f"{template.cls.__module__}:{template.cls.__qualname__}", "fields": _encode(template.fields)}
    if isinstance(template, dict):
        return {"dict": {k: _encode(v) for k, v in template.items()}}
    if isinstance(template, list | tuple):
        return {type(template).__name__: [_encode(v) for v in template]}
    return {"value": template}


def _decode(data: dict[str, Any]) -> Any:
    kind = "output" if "output" in data else next(iter(data))
    value = data[kind]
    if kind == "slot":
        return _Slot(value)
    if kind == "output":
        module, _, name = value.partition(":")
        if module.split(".")[0] not in ("transformers", "diffusers"):
            raise ModelLoadError(f"OpenVINO cache: unexpected output class {value!r}", field="backend")
        return _Output(getattr(importlib.import_module(module), name), _decode(data["fields"]))
    if kind == "dict":
        return {k: _decode(v) for k, v in value.items()}
    if kind in ("tuple", "list"):
        return (tuple if kind == "tuple" else list)(_decode(v) for v in value)
    return value


def _signature(template: Any, tensors: Sequence[torch.Tensor]) -> str:
    """An input signature's cache key: the arguments' structure and non-tensor values (as the cached output
    template is written) and every tensor's shape."""
    text = json.dumps([_encode(template), [tuple(t.shape) for t in tensors]], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _fingerprint(method: _Method, openvino_version: str, weights: str) -> str:
    """The method's identity for the disk cache: its module's class, config and weights (``weights_digest``),
    and the versions of the libraries that shape the conversion."""
    import diffusers
    import transformers

    from .. import __version__

    module = method.module
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    versions = (__version__, openvino_version, torch.__version__, diffusers.__version__, transformers.__version__)
    text = json.dumps([versions, type(module).__qualname__, method.method, config, weights], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def weights_digest(module: nn.Module) -> str:
    """Every weight's name, shape, dtype and bytes."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())  # no copy
    return digest.hexdigest()
