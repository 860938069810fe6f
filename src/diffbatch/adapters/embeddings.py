"""Textual-inversion embeddings per request, as AUTOMATIC1111 uses them: files in a folder (``--embeddings-dir``),
each named by its file name; where a prompt's tokens spell an embedding's name, its vectors take their place in
the text encoder's input (A1111's ``EmbeddingsWithFixes``: the token embeddings at those positions replaced), and
a prompt without one is encoded as it would be without the folder. Formats: A1111's ``.pt`` (``string_to_param``)
and ``.safetensors`` (``emb_params``; SDXL's ``clip_l`` and ``clip_g``), diffusers' ``learned_embeds`` (one
token's vectors). A name that matches no file stays text, as in A1111.

Every embedding of the folder is loaded when the engine starts (as A1111 loads its folder), so whether a prompt's
tokens spell one never depends on what was asked before; a file that is not an embedding for this model is kept
aside, and a prompt that names it is refused naming it (never its path).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, SpecError, shown
from .lora import file_hash

SUFFIXES = (".safetensors", ".pt", ".bin")
MAX_VECTORS = 75  # an embedding fills at most one chunk


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: tuple[torch.Tensor, ...]  # per text encoder (SD: one; SDXL: CLIP-L's, CLIP-G's), each [n, D]
    hash: str  # A1111's short hash of the file (TI hashes)

    @property
    def length(self) -> int:
        return int(self.vectors[0].shape[0])


class EmbeddingBank:
    """The embeddings of a folder, loaded when a prompt names one; ``dims``: each text encoder's hidden size."""

    def __init__(self, folder: str | Path | None, dims: Sequence[int]) -> None:
        self.folder = None if folder is None else Path(folder)
        self.dims = tuple(dims)
        self._loaded: dict[str, Embedding] = {}
        self._refused: dict[str, SpecError] = {}  # files that are no embedding for this model, by name
        self._files: dict[str, Path] | None = None
        for name in self.files():
            try:
                self._load(name)
            except SpecError as exc:
                self._refused[name] = exc

    def files(self) -> dict[str, Path]:
        """Embedding name -> file, listed once (names compared as CLIP reads them: lower case); a folder that
        is not one, or cannot be read, is refused in one line."""
        if self._files is None:
            found: dict[str, Path] = {}
            if self.folder is not None:
                try:
                    for path in sorted(self.folder.iterdir()):
                        if path.suffix in SUFFIXES and path.is_file():
                            found.setdefault(path.stem.lower(), path)
                except OSError as exc:
                    raise ModelLoadError(f"--embeddings-dir {self.folder}: cannot read it as a folder "
                                         f"({exc.strerror or exc})") from None
            self._files = found
        return self._files

    def _named_in(self, names: Sequence[str], *texts: str) -> list[str]:
        """Those of ``names`` that appear in the texts as words (CLIP lower-cases)."""
        lowered = " ".join(texts).lower()
        return [name for name in names if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", lowered)]

    def ensure(self, *texts: str) -> None:
        """``SpecError`` naming the embedding (never its path) where the texts name a file of the folder that is
        not an embedding for this model."""
        for name in self._named_in(list(self._refused), *texts):  # the refused files only: usually none
            raise self._refused[name]

    def loaded(self) -> list[Embedding]:
        return list(self._loaded.values())

    def finder(self, tokenize: Any) -> Finder | None:
        """The loaded embeddings' ``Finder`` under ``tokenize`` (made again once another embedding loads)."""
        if not self._loaded:
            return None
        key = (len(self._loaded), tokenize.__qualname__)
        if getattr(self, "_finder_key", None) != key:
            self._finder, self._finder_key = Finder(self.loaded(), tokenize), key
        return self._finder

    def _load(self, name: str) -> Embedding:
        if not self.dims:
            raise SpecError(f"prompt: names the textual-inversion embedding {shown(name)}, which this model cannot "
                            "read (embeddings are read on Stable Diffusion 1.x/2.x, SDXL and SD3)", field="prompt",
                            value=name, reason="embeddings on CLIP models only")
        if name not in self._loaded:
            path = self.files()[name]
            try:
                vectors = _vectors(path, self.dims)
            except Exception as exc:  # noqa: BLE001 - torch and safetensors raise assorted errors for bad files
                raise SpecError(f"prompt: embedding {shown(name)} is not a textual-inversion embedding A1111 or "
                                f"diffusers writes ({type(exc).__name__})", field="prompt", value=name,
                                reason="not an embedding file") from None
            dims = tuple(int(v.shape[-1]) for v in vectors)
            if dims != self.dims or not 1 <= vectors[0].shape[0] <= MAX_VECTORS:
                raise SpecError(f"prompt: embedding {shown(name)} has vectors of width {dims} ({vectors[0].shape[0]} "
                                f"of them); this model's text encoders take {self.dims}", field="prompt",
                                value=name, reason="an embedding for another model")
            self._loaded[name] = Embedding(name, vectors, file_hash(path))
        return self._loaded[name]


def _vectors(path: Path, dims: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """An embedding file's vectors per text encoder, each [n, D] float32: SDXL's ``clip_l`` and ``clip_g`` for
    its two encoders, or the one of them as wide as a single encoder (the SDXL refiner's is CLIP-G)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        data: dict[str, Any] = load_file(str(path))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_param" in data:  # A1111's .pt
        (tensor,) = data["string_to_param"].values()
        found = [tensor]
    elif "clip_l" in data and "clip_g" in data:  # SDXL (A1111's and diffusers' both)
        pair = [data["clip_l"], data["clip_g"]]
        found = pair if len(dims) == 2 else [v for v in pair if v.shape[-1] in dims][:1] or pair[:1]
    elif "emb_params" in data:
        found = [data["emb_params"]]
    else:  # diffusers' learned_embeds: {token: vectors}
        (tensor,) = [v for v in data.values() if isinstance(v, torch.Tensor)]
        found = [tensor]
    vectors = tuple(v.detach().float().reshape(-1, v.shape[-1]) for v in found)
    if len(vectors) != len(dims):
        raise ValueError(f"{len(vectors)} sets of vectors for {len(dims)} text encoders")
    return vectors


class Finder:
    """Where an embedding's name starts among a prompt's tokens, as A1111's ``find_embedding_at_position``: the
    name's own tokens at that position, the longest name first."""

    def __init__(self, embeddings: list[Embedding], tokenize: Any) -> None:
        self.by_first: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        for embedding in embeddings:
            ids = tuple(tokenize([embedding.name])[0])
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, embedding))
        for candidates in self.by_first.values():
            candidates.sort(key=lambda pair: -len(pair[0]))

    def __call__(self, tokens: Sequence[int], position: int) -> tuple[Embedding, int] | None:
        for ids, embedding in self.by_first.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return embedding, len(ids)
        return None


@contextlib.contextmanager
def token_fixes(encoder: Any, index: int, rows: Sequence[Sequence[tuple[int, Embedding]]]) -> Iterator[None]:
    """Around a call of text encoder ``index`` on ``rows`` of chunks: each row's token embeddings at each fix's
    position (after BOS) replaced by the embedding's vectors for that encoder."""
    if not any(rows):
        yield
        return

    def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, fixes in enumerate(rows):
            for offset, embedding in fixes:
                vectors = embedding.vectors[index]
                output[row, offset + 1 : offset + 1 + vectors.shape[0]] = vectors.to(output.dtype)
        return output

    handle = encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
