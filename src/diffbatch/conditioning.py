"""Prompt conditioning for the runner: each request's prompt and negative prompt encoded once (an LRU cache: prompts
repeat a lot in batch jobs), in batched text-encoder calls of the device's call shape, with each row's LoRAs;
prompts diffusers' ``encode_prompt`` encodes as they are go through it, the others (A1111's prompt language,
prompts longer than the encoder's window, clip skip, textual-inversion embeddings) by their chunks
(adapters/clip_prompts.py)."""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .adapters import Adapter, Cond
from .adapters.invariance import batch_rows, pad_rows, run_in_calls
from .adapters.lora import Loras
from .request import Request
from .spec import GenerationSpec

PROMPT_BATCH = 64  # texts per text-encoder call
# (is a negative prompt, text, LoRAs (text-encoder LoRAs change it), emphasis, clip skip (prompts only, as diffusers))
PromptKey = tuple[bool, str, Loras, str, int]


def prompt_keys(spec: GenerationSpec) -> tuple[PromptKey, PromptKey]:
    """The keys of a resolved spec's prompt and negative prompt conditioning (GenerationSpec.prompt_texts)."""
    texts = spec.prompt_texts()
    (prompt, skip), (negative, negative_skip) = texts["prompt"], texts["negative_prompt"]
    return ((False, prompt, spec.loras, spec.emphasis, skip),
            (True, negative, spec.loras, spec.emphasis, negative_skip))


class PromptCache:
    """LRU cache of text conditioning: prompts repeat a lot in batch jobs (``-n``, negative prompts)."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._items: OrderedDict[PromptKey, Cond] = OrderedDict()

    def get(self, key: PromptKey) -> Cond:
        self._items.move_to_end(key)
        return self._items[key]

    def missing(self, keys: Sequence[PromptKey]) -> list[PromptKey]:
        return [k for k in dict.fromkeys(keys) if k not in self._items]

    def put(self, text: PromptKey, cond: Cond) -> None:
        self._items[text] = cond
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


class PromptEncoder:
    """The runner's prompt conditioning; ``lora_rows(per_row)``: the context that gives a model call's rows
    their LoRAs (runner.py)."""

    def __init__(self, adapter: Adapter, lora_rows: Callable[[list[Loras]], contextlib.AbstractContextManager]
                 ) -> None:
        self.adapter = adapter
        self.lora_rows = lora_rows
        self.cache = PromptCache()

    def attach(self, requests: list[Request]) -> None:
        """Each request's conditioning (``cond``, and ``uncond`` where it uses CFG), encoded where not cached."""
        guided = [r for r in requests if self.adapter.uses_cfg(r.spec)]
        self._encode_missing([prompt_keys(r.spec)[0] for r in requests])
        self._encode_missing([prompt_keys(r.spec)[1] for r in guided])
        for r in requests:
            r.cond = self.adapter.request_cond(self.cache.get(prompt_keys(r.spec)[0]), r.spec)
        for r in guided:
            r.uncond = self.adapter.request_cond(self.cache.get(prompt_keys(r.spec)[1]), r.spec, True)

    def _encode_missing(self, keys: list[PromptKey]) -> None:
        """Encode the keys not cached yet: those diffusers' ``encode_prompt`` encodes as they are, in batches by
        clip skip; the others (A1111's language, long prompts) by their chunks (clip_prompts.py)."""
        for negative in (False, True):
            missing = self.cache.missing([k for k in keys if k[0] == negative])
            field = "negative_prompt" if negative else "prompt"
            windows = {k: self.adapter.windows(k[1], k[3], field, k[4]) for k in missing}
            by_skip: dict[int, list[PromptKey]] = {}
            for k in missing:
                by_skip.setdefault(k[4], []).append(k)
            for clip_skip, group in by_skip.items():
                plain = [k for k in group if windows[k] is None]
                for i in range(0, len(plain), PROMPT_BATCH):
                    batch = plain[i : i + PROMPT_BATCH]
                    conds = run_in_calls(self.adapter.call_shapes.text, len(batch), functools.partial(
                        self._encode_call, batch, negative, clip_skip))
                    for key, cond in zip(batch, conds, strict=True):
                        self.cache.put(key, cond)
                chunked = [k for k in group if windows[k] is not None]
                for i in range(0, len(chunked), PROMPT_BATCH):
                    self._encode_chunks(chunked[i : i + PROMPT_BATCH], windows, clip_skip)

    def _encode_call(self, batch: list[PromptKey], negative: bool, clip_skip: int, real: slice, size: int
                     ) -> list[Cond]:
        keys = batch[real]
        keys = keys + keys[-1:] * (size - len(keys))  # padded to the call shape
        with self.lora_rows([k[2] for k in keys]):
            return self.adapter.encode_prompts([k[1] for k in keys], negative, clip_skip)

    def _encode_chunks(self, keys: list[PromptKey], windows: dict[PromptKey, Any], clip_skip: int) -> None:
        """Prompts encoded by their chunks: every chunk a row of the text encoders' calls (with its prompt's
        LoRAs), then each prompt's rows joined (clip_prompts.py)."""
        ids = batch_rows([windows[k].ids for k in keys])  # [R, E, L]
        loras = [k[2] for k in keys for _ in range(len(windows[k].ids))]
        fixes = [f for k in keys for f in windows[k].fixes]  # each row's textual-inversion embeddings

        def call(real: slice, size: int) -> dict[str, torch.Tensor]:
            rows, fixed = loras[real], fixes[real]
            with self.lora_rows(rows + rows[-1:] * (size - len(rows))):
                return self.adapter.encode_windows(pad_rows(ids[real], size), clip_skip,
                                                   fixed + fixed[-1:] * (size - len(fixed)))

        out = run_in_calls(self.adapter.call_shapes.text, len(ids), call)
        start = 0
        for k in keys:
            n = len(windows[k].ids)
            rows = {name: value[start : start + n] for name, value in out.items()}
            self.cache.put(k, self.adapter.join_windows(rows, windows[k], k[3]))
            start += n
