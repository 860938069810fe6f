"""LoRAs per request, in one batch: every row of a denoiser (or text-encoder) call may carry its own LoRAs and
weights.

Loading is diffusers' own (``load_lora_weights``: diffusers/PEFT and kohya safetensors, UNet and text-encoder
LoRAs), each LoRA as a PEFT adapter of the pipeline, loaded on first use and kept in an LRU. What PEFT's
forward cannot do is weight adapters per row (its mixed-batch ``adapter_names`` takes one adapter per row and
its own scale), so every LoRA layer's forward is replaced by a per-row one: the base layer on all rows, then
for each LoRA only on the rows that use it, ``lora_B(lora_A(x)) * (weight * alpha / r)`` added — the same
operations diffusers runs for one image after ``set_adapters(names, weights)``. Rows without a LoRA pay
nothing; a LoRA branch never runs on one row (invariance.py: some kernels take another path at N = 1), so an
image is the same alone and in any batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SpecError, shown
from .invariance import make_batch_invariant
from .layers import LayerStack

Loras = tuple[tuple[str, float], ...]  # a spec's LoRAs: ((name, weight), ...)
# The running call's rows (LoraBank.rows sets it around a model call)
_ROWS: ContextVar[_CallRows | None] = ContextVar("diffbatch_lora_rows", default=None)
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def file_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's short LoRA hash: the first 12 hex digits of the file's sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


class LoraBank:
    """The LoRAs loaded into one pipeline, by path; at most ``capacity``, least recently used dropped."""

    def __init__(self, pipe: Any, find: Callable[[str], Path], invariant: bool, layers: LayerStack,
                 capacity: int = 16) -> None:
        self.pipe = pipe
        self.layers = layers  # the pipeline's model-call layers: the LoRA rows are layer 3 (layers.py)
        self._find = find  # a LoRA name -> its file (Resolver.lora_path: file-system checks)
        self._paths: dict[str, Path] = {}  # found once per name: rows() runs for every model call
        self.invariant = invariant
        self.capacity = capacity
        self._loaded: OrderedDict[Path, str] = OrderedDict()  # file -> adapter name in the pipeline
        self._hashes: dict[Path, str] = {}

    def ensure(self, loras: Loras) -> None:
        """Load the LoRAs not loaded yet (``SpecError`` naming the LoRA when one cannot be loaded)."""
        if loras:
            _require_peft()
        for name, _ in loras:
            path = self.find(name)
            if path in self._loaded:
                self._loaded.move_to_end(path)
                continue
            adapter = "lora_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
            try:
                self.pipe.load_lora_weights(str(path), adapter_name=adapter)
            except Exception as exc:  # noqa: BLE001 - diffusers and PEFT raise assorted errors for bad files
                with contextlib.suppress(Exception):
                    self.pipe.delete_adapters([adapter])
                # The name, not the file's path (diffusers' own message may hold it): a server's clients have no
                # business knowing its folders
                detail = f"{type(exc).__name__}: {exc}".replace(str(path), "the LoRA's file")
                raise SpecError(f"loras: {shown(name)} cannot be loaded into this model: {detail}", field="loras",
                                value=name, reason="not a LoRA for this model") from None
            self._loaded[path] = adapter
            self.layers.install("lora", self._patch)
        self._evict(keep={self.find(name) for name, _ in loras})

    def _evict(self, keep: set[Path]) -> None:
        """Least recently used first, never one of ``keep`` (the LoRAs the caller is about to run)."""
        for path in list(self._loaded):
            if len(self._loaded) <= self.capacity:
                return
            if path not in keep:
                self.pipe.delete_adapters([self._loaded.pop(path)])

    def find(self, name: str) -> Path:
        if name not in self._paths:
            self._paths[name] = self._find(name)
        return self._paths[name]

    def hashes(self, loras: Loras) -> tuple[tuple[str, str], ...]:
        """(name, AUTOMATIC1111's short hash) of each LoRA, for the PNG metadata."""
        found = []
        for name, _ in loras:
            path = self.find(name)
            if path not in self._hashes:
                self._hashes[path] = file_hash(path)
            found.append((name, self._hashes[path]))
        return tuple(found)

    @contextlib.contextmanager
    def rows(self, per_row: Sequence[Loras]) -> Iterator[None]:
        """Run the calls inside with these LoRAs per row (one entry per row of the call, padding included)."""
        if not any(per_row):
            yield
            return
        names = sorted({name for loras in per_row for name, _ in loras})
        self.ensure(tuple((name, 1.0) for name in names))  # loaded again if evicted since admission
        columns: dict[str, list[float]] = {}  # in name order, as each spec lists its LoRAs: the same sums
        for name in names:
            columns[self._loaded[self.find(name)]] = [float(dict(loras).get(name, 0.0)) for loras in per_row]
        token = _ROWS.set(_CallRows(columns))
        try:
            yield
        finally:
            _ROWS.reset(token)

    def _patch(self) -> None:
        """Per-row forwards on every LoRA layer (new ones included); the invariant kernels on their A and B."""
        from peft.tuners.lora import LoraLayer

        modules = [getattr(self.pipe, n, None) for n in LORA_COMPONENTS]
        for module in (m for m in modules if m is not None):
            for layer in module.modules():
                if isinstance(layer, LoraLayer) and hasattr(layer, "lora_A") and isinstance(layer, nn.Module):
                    layer.forward = types.MethodType(_rowwise_forward, layer)
            if self.invariant:
                make_batch_invariant([module], module.device)


def _require_peft() -> None:
    try:
        import peft  # noqa: F401 - diffusers loads LoRAs through PEFT
    except ImportError:
        raise SpecError("loras: LoRAs need PEFT: pip install 'diffbatch[lora]'", field="loras",
                        reason="PEFT is not installed") from None


class _CallRows:
    """One call's LoRA rows, worked out once for all its layers: per adapter, the rows that use it (all, or
    an index, padded to two rows) and their weights; the per-row scale tensors are cached by layer scaling."""

    def __init__(self, columns: dict[str, list[float]]) -> None:
        self.adapters: list[tuple[str, list[float], torch.Tensor | None, torch.Tensor | None]] = []
        for adapter, weights in columns.items():
            picked = [i for i, w in enumerate(weights) if w != 0.0]
            if len(picked) == len(weights):
                self.adapters.append((adapter, weights, None, None))
            elif picked:
                take = picked if len(picked) > 1 else picked * 2  # never a one-row call (invariance.py)
                self.adapters.append((adapter, [weights[i] for i in picked], torch.tensor(picked),
                                      torch.tensor(take)))
        self._scales: dict[tuple, torch.Tensor] = {}

    def scale(self, adapter: str, weights: list[float], scaling: float, like: torch.Tensor) -> torch.Tensor:
        """Each row's ``weight * alpha / r`` (diffusers' set_adapters scale, one Python float per image)."""
        key = (adapter, scaling, like.dtype, like.dim())
        if key not in self._scales:
            self._scales[key] = torch.tensor([w * scaling for w in weights], dtype=like.dtype,
                                             device=like.device).view(-1, *[1] * (like.dim() - 1))
        return self._scales[key]


def _rowwise_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    result = self.base_layer(x, *args, **kwargs)
    rows = _ROWS.get()
    if rows is None:
        return result
    dtype = result.dtype
    for adapter, weights, index, take in rows.adapters:
        if adapter not in self.lora_A:
            continue
        lora_a, lora_b, dropout = self.lora_A[adapter], self.lora_B[adapter], self.lora_dropout[adapter]
        if index is None:  # every row uses it
            delta = lora_b(lora_a(dropout(self._cast_input_dtype(x, lora_a.weight.dtype))))
            scaled = delta * rows.scale(adapter, weights, self.scaling[adapter], delta)
            # In place where the dtypes agree (the same one addition; ``result`` is this call's own tensor):
            # an out-of-place add copied the whole output once per LoRA and layer (issue 22)
            result = result.add_(scaled) if scaled.dtype == result.dtype else result + scaled
            continue
        xs = self._cast_input_dtype(x.index_select(0, take), lora_a.weight.dtype)
        delta = lora_b(lora_a(dropout(xs)))[: len(index)]
        scaled = delta * rows.scale(adapter, weights, self.scaling[adapter], delta)
        if scaled.dtype == result.dtype:
            result.index_add_(0, index, scaled)
        else:
            result = result.index_copy(0, index, result.index_select(0, index) + scaled)
    return result.to(dtype)
