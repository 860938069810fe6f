"""LoRAs per request, in one batch: every row of a denoiser (or text-encoder) call may carry its own LoRAs and
weights.

Loading is diffusers' own (``load_lora_weights``: diffusers/PEFT and kohya safetensors, UNet and text-encoder
LoRAs), each LoRA as a PEFT adapter of the pipeline, loaded on first use and kept in an LRU. What PEFT's
forward cannot do is weight adapters per row (its mixed-batch ``adapter_names`` takes one adapter per row and
its own scale), so every LoRA layer's forward is replaced by a per-row one: the base layer on all rows, then
each row's own LoRAs, ``sum of lora_B(lora_A(x)) * (weight * alpha / r)`` added, in name order, as diffusers
sums them for one image after ``set_adapters(names, weights)``. On linear layers (attention and MLP
projections) a row's LoRAs run fused: their down-projections side by side and their scaled up-projections
stacked, zero-padded to a rank bucket that depends on the row's own LoRAs, all LoRA rows of the call in one
pair of batched GEMMs (``bmm``: each row its own GEMM of a fixed shape, measured row-invariant by
benchmarks/invariance_probe.py); other layers (convolutions, DoRA) loop over the call's LoRAs. Rows without a
LoRA pay nothing; a LoRA branch never runs on one row (invariance.py: some kernels take another path at N = 1),
so an image is the same alone and in any batch.
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
        self._generation = 0  # counts loads and evictions: the layers' fused LoRA weights are made again after one

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
            self._generation += 1
            self.layers.install("lora", self._patch)
        self._evict(keep={self.find(name) for name, _ in loras})

    def _evict(self, keep: set[Path]) -> None:
        """Least recently used first, never one of ``keep`` (the LoRAs the caller is about to run)."""
        for path in list(self._loaded):
            if len(self._loaded) <= self.capacity:
                return
            if path not in keep:
                self.pipe.delete_adapters([self._loaded.pop(path)])
                self._generation += 1

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
        token = _ROWS.set(_CallRows(columns, self._generation))
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


# A row's LoRA ranks (summed) are padded up to one of these: one bmm shape per bucket
FUSED_RANKS = (8, 16, 32, 64, 128, 256)


class _CallRows:
    """One call's LoRA rows, worked out once for all its layers. Two forms: per adapter, the rows that use it
    (all, or an index padded to two rows) and their weights, for layers the fused form does not take; and per
    layer coverage, the rows grouped by the rank bucket of their own LoRA set (``plan``), for the fused form."""

    def __init__(self, columns: dict[str, list[float]], generation: int) -> None:
        self.generation = generation  # LoraBank's: a changed set of loaded LoRAs drops the layers' fused weights
        self.adapters: list[tuple[str, list[float], torch.Tensor | None, torch.Tensor | None]] = []
        for adapter, weights in columns.items():
            picked = [i for i, w in enumerate(weights) if w != 0.0]
            if len(picked) == len(weights):
                self.adapters.append((adapter, weights, None, None))
            elif picked:
                take = picked if len(picked) > 1 else picked * 2  # never a one-row call (invariance.py)
                self.adapters.append((adapter, [weights[i] for i in picked], torch.tensor(picked),
                                      torch.tensor(take)))
        count = len(next(iter(columns.values()), []))
        # each row's LoRA set: ((adapter, weight), ...) in name order, the order diffusers adds them in
        self.row_sets = [tuple((a, w[i]) for a, w in columns.items() if w[i] != 0.0) for i in range(count)]
        self.order = {adapter: k for k, adapter in enumerate(columns)}
        self._scales: dict[tuple, torch.Tensor] = {}
        self._plans: dict[tuple, list[_Group]] = {}

    def scale(self, adapter: str, weights: list[float], scaling: float, like: torch.Tensor) -> torch.Tensor:
        """Each row's ``weight * alpha / r`` (diffusers' set_adapters scale, one Python float per image)."""
        key = (adapter, scaling, like.dtype, like.dim())
        if key not in self._scales:
            self._scales[key] = torch.tensor([w * scaling for w in weights], dtype=like.dtype,
                                             device=like.device).view(-1, *[1] * (like.dim() - 1))
        return self._scales[key]

    def plan(self, ranks: dict[str, int]) -> list[_Group]:
        """The rows of a layer whose adapters have these ranks, grouped by the bucket of each row's own rank
        sum: a row's bucket, and so its bmm shape, depends on its LoRAs alone, never on the call's other rows."""
        key = tuple(ranks.items())
        if key not in self._plans:
            buckets: dict[int, list[tuple[int, tuple]]] = {}
            for row, found in enumerate(self.row_sets):
                own = tuple((a, w) for a, w in found if a in ranks)
                if own:
                    total = sum(ranks[a] for a, _ in own)
                    bucket = next((k for k in FUSED_RANKS if k >= total), 0)  # 0: too large, not fused
                    buckets.setdefault(bucket, []).append((row, own))
            self._plans[key] = [_Group(bucket, members, len(self.row_sets))
                                for bucket, members in sorted(buckets.items())]
        return self._plans[key]


class _Group:
    """Rows of one rank bucket: their indices (``index``), the rows computed (``take``: padded to two rows)
    and each computed row's LoRA set."""

    def __init__(self, bucket: int, members: list[tuple[int, tuple]], count: int) -> None:
        self.bucket = bucket
        rows = [row for row, _ in members]
        self.whole = rows == list(range(count))  # every row of the call, in order: no gather, no scatter
        self.sets = [own for _, own in members]
        if len(members) == 1:  # never a one-row call (invariance.py)
            self.sets *= 2
            rows *= 2
        self.index = torch.tensor(rows[: len(members)])
        self.take = torch.tensor(rows)


def _rowwise_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    result = self.base_layer(x, *args, **kwargs)
    rows = _ROWS.get()
    if rows is None:
        return result
    dtype = result.dtype
    cache = _LayerCache.of(self, rows.generation)
    if cache.ranks is not None:
        return _fused_rows(self, x, result, rows, cache).to(dtype)
    for adapter, weights, index, take in rows.adapters:
        if adapter not in self.lora_A:
            continue
        lora_a, lora_b, dropout = self.lora_A[adapter], self.lora_B[adapter], self.lora_dropout[adapter]
        if index is None:  # every row uses it
            delta = lora_b(lora_a(dropout(self._cast_input_dtype(x, lora_a.weight.dtype))))
            result = _add_rows(result, None, delta * rows.scale(adapter, weights, self.scaling[adapter], delta))
            continue
        xs = self._cast_input_dtype(x.index_select(0, take), lora_a.weight.dtype)
        delta = lora_b(lora_a(dropout(xs)))[: len(index)]
        result = _add_rows(result, index, delta * rows.scale(adapter, weights, self.scaling[adapter], delta))
    return result.to(dtype)


def _add_rows(result: torch.Tensor, index: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """``result`` with ``delta`` added to its rows ``index`` (None: every row): in place where the dtypes agree
    (the same one addition; ``result`` is this call's own tensor), else out of place. An out-of-place add copied
    the whole output once per LoRA and layer (issue 22)."""
    if delta.dtype != result.dtype:
        if index is None:
            return result + delta
        return result.index_copy(0, index, result.index_select(0, index) + delta)
    return result.add_(delta) if index is None else result.index_add_(0, index, delta)


def _fused_rows(layer: Any, x: torch.Tensor, result: torch.Tensor, rows: _CallRows,
                cache: _LayerCache) -> torch.Tensor:
    """Every LoRA row of the layer in one pair of batched GEMMs per rank bucket: row i computes
    ``(x_i @ A_i) * s_i @ B_i`` where ``A_i`` is its LoRAs' down-projections side by side (zero-padded to the
    bucket), ``B_i`` their up-projections stacked and ``s_i`` each LoRA's ``weight * alpha / r`` over its rank
    columns: diffusers' sum over the row's LoRAs, in the same order, as one reduction of a fixed length. A loop
    over the call's LoRAs (gather, two GEMMs, scale, scatter each) cost 1.7x a plain row on the tiny model, most
    of it per-op overhead (issue 22)."""
    for group in rows.plan(cache.ranks):
        if not group.bucket:  # a rank sum over the largest bucket: each of the group's LoRAs on its rows
            result = _rows_per_adapter(layer, x, result, group, rows.order)
            continue
        down, scale, up = cache.stacked(layer, group)
        xs = x if group.whole else x.index_select(0, group.take)
        xs = layer._cast_input_dtype(xs, down.dtype)
        flat = xs.reshape(xs.shape[0], -1, xs.shape[-1])
        delta = torch.bmm(torch.bmm(flat, down).mul_(scale), up)
        delta = delta.reshape(*xs.shape[:-1], delta.shape[-1])[: len(group.index)]
        result = _add_rows(result, None if group.whole else group.index, delta)
    return result


def _rows_per_adapter(layer: Any, x: torch.Tensor, result: torch.Tensor, group: _Group,
                      order: dict[str, int]) -> torch.Tensor:
    """The group's rows, each LoRA on the rows that use it (gather, its two GEMMs, scale, scatter), in the call's
    LoRA order (by name, as each row's own sum runs); for rank sums too large to pad."""
    count = len(group.index)
    for adapter in sorted({a for own in group.sets[:count] for a, _ in own}, key=order.__getitem__):
        picked = [(i, dict(own)[adapter]) for i, own in enumerate(group.sets[:count]) if adapter in dict(own)]
        positions = [i for i, _ in picked]
        take = group.index[positions * (2 if len(positions) == 1 else 1)]  # never a one-row call
        lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
        delta = lora_b(lora_a(layer._cast_input_dtype(x.index_select(0, take), lora_a.weight.dtype)))
        delta = delta[: len(positions)]
        scale = torch.tensor([w * layer.scaling[adapter] for _, w in picked], dtype=delta.dtype,
                             device=delta.device).view(-1, *[1] * (delta.dim() - 1))
        result = _add_rows(result, group.index[positions], delta * scale)
    return result


class _LayerCache:
    """What a LoRA layer keeps between calls until the loaded LoRAs change (``generation``): whether its rows
    take the fused form (``ranks``), the padded matrices of the LoRA combinations last used (by adapters, not
    weights: bounded by the combinations in use), and the stacked matrices of the last few call compositions
    (a running batch repeats its composition step after step)."""

    SETS = 32  # LoRA combinations kept per layer
    STACKS = 4  # call compositions kept per layer

    def __init__(self, layer: Any, generation: int) -> None:
        self.generation = generation
        self.ranks = _fusable(layer)
        self._sets: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._stacks: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    @classmethod
    def of(cls, layer: Any, generation: int) -> _LayerCache:
        cache = layer.__dict__.get("_diffbatch_lora")
        if cache is None or cache.generation != generation:
            cache = layer.__dict__["_diffbatch_lora"] = cls(layer, generation)
        return cache

    def stacked(self, layer: Any, group: _Group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The group's ``[rows, in, bucket]`` down-projections, ``[rows, 1, bucket]`` scales and
        ``[rows, bucket, out]`` up-projections."""
        key = (group.bucket, tuple(group.sets))
        if key not in self._stacks:
            down, up = zip(*(self._matrices(layer, tuple(a for a, _ in own), group.bucket) for own in group.sets),
                           strict=True)
            scales = [[w * layer.scaling[a] for a, w in own for _ in range(self.ranks[a])] for own in group.sets]
            scale = torch.tensor([row + [0.0] * (group.bucket - len(row)) for row in scales], dtype=down[0].dtype,
                                 device=down[0].device).unsqueeze(1)
            self._stacks[key] = (torch.stack(down), scale, torch.stack(up))
            if len(self._stacks) > self.STACKS:
                self._stacks.popitem(last=False)
        self._stacks.move_to_end(key)
        return self._stacks[key]

    def _matrices(self, layer: Any, adapters: tuple[str, ...], bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoRA combination's ``[in, bucket]`` and ``[bucket, out]`` matrices: down-projections side by side,
        up-projections stacked, zero-padded."""
        key = (adapters, bucket)
        if key not in self._sets:
            downs = [layer.lora_A[a].weight.t() for a in adapters]
            ups = [layer.lora_B[a].weight.t() for a in adapters]
            pad = bucket - sum(d.shape[1] for d in downs)
            down = torch.cat([*downs, downs[0].new_zeros(downs[0].shape[0], pad)], dim=1)
            up = torch.cat([*ups, ups[0].new_zeros(pad, ups[0].shape[1])], dim=0)
            self._sets[key] = (down.contiguous(), up.contiguous())
            if len(self._sets) > self.SETS:
                self._sets.popitem(last=False)
        self._sets.move_to_end(key)
        return self._sets[key]


def _fusable(layer: Any) -> dict[str, int] | None:
    """The ranks of a linear LoRA layer's adapters, if its rows can take the fused form: plain LoRAs (no DoRA,
    no LoRA bias, no dropout in inference) on a linear base layer; None otherwise (the loop per adapter)."""
    if not isinstance(layer.base_layer, nn.Linear) or not layer.lora_A:
        return None
    ranks = {}
    for adapter, lora_a in layer.lora_A.items():
        lora_b = layer.lora_B[adapter]
        if (not isinstance(lora_a, nn.Linear) or not isinstance(lora_b, nn.Linear) or lora_b.bias is not None
                or layer.use_dora.get(adapter, False) or not isinstance(layer.lora_dropout[adapter], nn.Identity)):
            return None
        ranks[adapter] = lora_a.out_features
    return ranks
