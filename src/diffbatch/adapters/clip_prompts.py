"""A prompt read in AUTOMATIC1111's language (prompt_language.py) on CLIP text encoders: its chunks of the
encoder's window each encoded as a sequence of its own (BOS, up to ``window - 2`` tokens, EOS, padding), each
chunk's hidden states multiplied by its tokens' weights (``emphasis``), the chunks concatenated along the
sequence. A prompt that A1111's language reads as itself and that fits one window takes diffusers' own
``encode_prompt`` instead, so its image is the one diffusers makes, bit for bit.

The families with CLIP encoders (Stable Diffusion 1.x/2.x, SDXL) mix this in and say, per encoder, which
tokenizer and model it is and how its hidden states are taken (``clip_skip``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..prompt_language import BREAK, Chunk, chunk, pieces
from .embeddings import Embedding, token_fixes

WINDOW_CACHE = 4096  # prompts whose chunks are kept (tokenizing is cheap, but prompts repeat a lot in jobs)


@dataclass(frozen=True)
class Windows:
    """A prompt's chunks as encoder input: ``ids [k, E, L]`` (chunk, encoder, token) and ``weights [k, L]``."""

    ids: torch.Tensor
    weights: torch.Tensor
    uniform: bool  # every weight 1: the hidden states are used as they are
    fixes: tuple[tuple[tuple[int, Embedding], ...], ...] = ()  # per chunk: its embeddings (adapters/embeddings.py)
    text: str = ""  # the prompt with the language's syntax taken out (what an encoder without it reads: SD3's T5)


@dataclass(frozen=True)
class Encoder:
    tokenizer: Any
    model: Any


class ClipPrompts:
    """Mixed into an ``Adapter`` whose ``encoders()`` are CLIP tokenizer/model pairs."""

    prompt_language = True

    def encoders(self) -> list[Encoder]:
        raise NotImplementedError

    def select_hidden(self, index: int, out: Any, clip_skip: int) -> torch.Tensor:
        """Encoder ``index``'s hidden states ``[N, L, D]`` from its output, at A1111's ``clip_skip``."""
        raise NotImplementedError

    def windows(self, text: str, emphasis: str, field: str = "prompt", clip_skip: int = 1) -> Windows | None:
        """The chunks ``text`` is encoded as; None where diffusers' own encoding is the same (the language reads
        the text as itself, it fits one window, and no clip skip: diffusers 0.42's Stable Diffusion clip skip reads
        ``text_encoder.text_model``, which transformers 5's CLIPTextModel no longer has)."""
        cache: OrderedDict = self.__dict__.setdefault("_window_cache", OrderedDict())
        key = (text, emphasis, clip_skip > 1)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        found = self._windows(text, emphasis, field, clip_skip > 1)
        cache[key] = found
        while len(cache) > WINDOW_CACHE:
            cache.popitem(last=False)
        return found

    def _windows(self, text: str, emphasis: str, field: str, skips: bool) -> Windows | None:
        encoders = self.encoders()
        tokenizer = encoders[0].tokenizer
        length = tokenizer.model_max_length - 2
        parts = pieces(text, emphasis, field)
        vocab = tokenizer.get_vocab()
        # A prompt past the window is what chunks are for: not transformers' "longer than the maximum" warning
        getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True

        def tokenize(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

        find = self.embeddings.finder(tokenize) if self.embeddings else None
        chunks = chunk(parts, tokenize, length, vocab.get(",</w>"), find=find)
        if len(chunks) == 1 and parts == [(text, 1.0)] and not skips and not chunks[0].fixes:
            return None
        ids = torch.tensor([[_window(c, e.tokenizer, length) for e in encoders] for c in chunks])
        weights = torch.tensor([[1.0, *c.weights, *[1.0] * (length + 1 - len(c.weights))] for c in chunks])
        uniform = emphasis == "ignore" or bool((weights == 1).all())
        # the pieces apart, as CLIP reads each on its own ("a cat BREAK a dog", "(red)dog"), blanks made one
        plain = " ".join(" ".join(t for t, w in parts if not (t == BREAK and w == -1)).split())
        return Windows(ids, weights, uniform, tuple(c.fixes for c in chunks), plain)

    def embeddings_in(self, text: str, emphasis: str, clip_skip: int = 1) -> list[Any]:
        """The textual-inversion embeddings the text is encoded with (A1111's TI hashes name them)."""
        windows = self.windows(text, emphasis, clip_skip=clip_skip)
        return [] if windows is None else [e for fixes in windows.fixes for _, e in fixes]

    def text_dims(self) -> tuple[int, ...]:
        """Each text encoder's hidden size (an embedding's vectors must match)."""
        return tuple(int(e.model.config.hidden_size) for e in self.encoders())

    def encode_windows(self, ids: torch.Tensor, clip_skip: int, fixes: list | None = None) -> dict[str, torch.Tensor]:
        """One batched call per encoder on chunk rows ``ids [N, E, L]`` (``fixes``: each row's embeddings):
        ``hidden{e} [N, L, D_e]`` and, from each encoder with a projection, ``pooled{e} [N, P_e]``."""
        out: dict[str, torch.Tensor] = {}
        for e, encoder in enumerate(self.encoders()):
            with token_fixes(encoder.model, e, fixes or []):
                result = encoder.model(ids[:, e].to(self.device), output_hidden_states=True)
            out[f"hidden{e}"] = self.select_hidden(e, result, clip_skip)
            if result[0].ndim == 2:  # CLIPTextModelWithProjection: its text_embeds (what diffusers pools)
                out[f"pooled{e}"] = result[0]
        return out

    def join_windows(self, rows: dict[str, torch.Tensor], windows: Windows, emphasis: str) -> dict[str, torch.Tensor]:
        """A prompt's conditioning from its chunks' rows (``encode_windows``'s, ``k`` of them): each encoder's
        chunk weighted as ``emphasis`` says, encoders joined along features, chunks along the sequence; the
        pooled output is the first chunk's (as A1111), its encoders' joined (SD3's two)."""
        hidden = []
        for e in range(len(self.encoders())):
            z = rows[f"hidden{e}"]  # [k, L, D]
            if not windows.uniform:
                z = _emphasis(z, windows.weights.to(z.device), emphasis)
            hidden.append(z)
        joined = torch.cat(hidden, dim=-1).to(self.dtype)  # [k, L, D]
        cond = {"encoder_hidden_states": joined.reshape(1, -1, joined.shape[-1])}
        pooled = [rows[f"pooled{e}"][:1] for e in range(len(self.encoders())) if f"pooled{e}" in rows]
        if pooled:
            cond["pooled"] = torch.cat(pooled, dim=-1).to(self.dtype)
        return cond


def _window(c: Chunk, tokenizer: Any, length: int) -> list[int]:
    """BOS, the chunk's tokens, EOS, then padding to ``length + 2``: diffusers' tokenization of a prompt that
    fits (A1111's too: it pads with EOS, and SD 2's encoder reads everything after the first EOS as padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [tokenizer.bos_token_id, *c.tokens, tokenizer.eos_token_id, *[pad] * (length - len(c.tokens))]


def _emphasis(z: torch.Tensor, weights: torch.Tensor, emphasis: str) -> torch.Tensor:
    """A1111's emphasis on one prompt's chunks ``z [k, L, D]`` (float32): "Original" multiplies each token's
    hidden state by its weight and restores each chunk's mean; "No norm" only multiplies."""
    z = z.float()
    weighted = z * weights[:, :, None]
    if emphasis != "original":
        return weighted
    before = z.mean(dim=(1, 2), keepdim=True)
    after = weighted.mean(dim=(1, 2), keepdim=True)
    return weighted * (before / after)
