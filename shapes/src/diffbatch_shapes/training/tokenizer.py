"""A CLIP-format BPE tokenizer (``vocab.json`` + ``merges.txt``) learned from the caption vocabulary.

The base alphabet is CLIP's 256 byte symbols, each alone and with the end-of-word mark ``</w>``, so any
text still tokenizes (as bytes); merges are learned until every caption word is one token.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 32  # captions are under 20 tokens; shorter contexts train faster


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible map from bytes to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, symbols), strict=True))


def _symbols(word: str) -> tuple[str, ...]:
    """A word as byte symbols, the last one carrying ``</w>`` (as CLIP splits words)."""
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1] + [chars[-1] + "</w>"])


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on the word list until every word is a single symbol (ties broken alphabetically)."""
    corpus = {w: _symbols(w) for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for s in corpus.values() for p in zip(s, s[1:], strict=False))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        corpus = {w: _merge(s, best) for w, s in corpus.items()}


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: bytes, bytes + ``</w>``, merged symbols, then the two special tokens."""
    base = list(bytes_to_unicode().values())
    tokens = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def write_tokenizer_files(folder: str | Path, words: list[str]) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` for ``words``, then save a full CLIPTokenizer folder."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(words)
    (folder / "vocab.json").write_text(json.dumps(build_vocab(merges), ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              pad_token=EOS, model_max_length=MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(str(folder))
    return folder
