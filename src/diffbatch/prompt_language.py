"""AUTOMATIC1111's prompt language, read as A1111 reads it: ``(x)`` x1.1, ``[x]`` /1.1, ``(x:1.3)``, escapes
``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\``, ``BREAK``, and prompts longer than the text encoder's window split into
chunks of its length (75 tokens for CLIP) at a comma where one is near. Pure Python: the parse and the chunking;
the encoders' side is adapters/clip_prompts.py.

What is A1111's, and what is ours (README, "The prompt language"):
- the parse is ``modules/prompt_parser.py`` ``parse_prompt_attention``'s (its documented examples are tests),
  computed in time linear in the prompt (A1111's multiplies every piece again for every bracket around it); a
  piece nested deeper than ``MAX_DEPTH`` brackets is refused (no prompt does that but an attack on the server);
- the chunks are ``sd_hijack_clip``'s ``tokenize_line``'s, with its default comma backtrack (20 tokens);
- emphasis is applied per prompt and chunk, as A1111 computes it for a batch of one prompt: A1111's "Original"
  takes the mean over the whole batch of prompts, which would make an image depend on its batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from .errors import SpecError, shown

# The ``emphasis`` field's values and how A1111 writes each in its ``Emphasis`` key ("Original" is its default,
# written only when it is not what ran, as A1111 does)
EMPHASES = {"original": "Original", "no_norm": "No norm", "ignore": "Ignore", "none": "None"}
ORIGINAL, NONE = "original", "none"
EMPHASIS_RULE = "must be one of " + ", ".join(EMPHASES)
MAX_DEPTH = 100  # brackets around a piece of text
MAX_BRACKETS = 10_000  # in a prompt: A1111's prompts have tens (bounds the parse of a hostile one)
MAX_WEIGHT = 1000.0  # a token's weight, in size: past it the hidden states overflow into a NaN image
MAX_BREAKS = 31  # in a prompt: each starts a window, so a short prompt could make thousands (a prompt's length
# bounds its other windows: the server's --max-prompt-chars, the CLI's authoring limit)
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default: move up to 20 tokens after a comma to the next chunk
ROUND, SQUARE = 1.1, 1 / 1.1

# A1111's re_attention, its alternatives in its order, each a group: an escape (a lone backslash escapes nothing),
# brackets, a weight closing a round bracket (the number: its group), a closer, a run of text or a colon
ATTENTION = re.compile(r"(\\[()\[\]\\]|\\)|(\()|(\[)|:\s*([+-]?[.\d]+)\s*\)|(\))|(])|([^\\()\[\]:]+|:)")
ESCAPE, OPEN_ROUND, OPEN_SQUARE, WEIGHT, CLOSE_ROUND, CLOSE_SQUARE, TEXT = range(1, 8)
BREAK_WORD = re.compile(r"\bBREAK\b")
BLANKS = re.compile(r"\s*")
BLANK = re.compile(r"\s")
BREAK = "BREAK"  # a piece ("BREAK", -1.0) starts a new chunk, as in A1111 (a BREAK inside brackets is text)


Piece = tuple[str, float]


def has_syntax(text: str) -> bool:
    """Whether A1111's reading could differ from the literal text: brackets, escapes or BREAK (A1111 writes
    ``Emphasis`` only for a prompt with a bracket)."""
    return any(c in text for c in "()[]\\") or BREAK in text


def parse_attention(text: str, field: str = "prompt") -> list[Piece]:
    """The text's pieces and their weights, as ``parse_prompt_attention`` returns them (a ``BREAK`` piece has
    weight -1, times the brackets around it); ``SpecError`` naming ``field`` for a weight that is not a finite
    number or brackets nested deeper than ``MAX_DEPTH``."""
    brackets = sum(map(text.count, "()[]"))
    if brackets > MAX_BRACKETS:
        raise SpecError(f"{field}: {brackets} brackets; a prompt may have at most {MAX_BRACKETS}", field=field,
                        value=text[:200], reason=f"at most {MAX_BRACKETS} brackets")
    parts: list[list[str]] = []
    weights = _weights(*_scan(text, field, parts), field, text)
    if not parts:
        return [("", 1.0)]
    starts = [0, *(np.flatnonzero(weights[1:] != weights[:-1]) + 1).tolist()]  # runs of equal weights merged
    ends = [*starts[1:], len(parts)]
    merged = [("".join(chain.from_iterable(parts[a:b])), w)
              for a, b, w in zip(starts, ends, weights[starts].tolist(), strict=True)]
    breaks = sum(1 for piece, w in merged if piece == BREAK and w == -1)  # as the chunker tells one
    if breaks > MAX_BREAKS:
        raise SpecError(f"{field}: {breaks} BREAKs; a prompt may have at most {MAX_BREAKS}", field=field,
                        value=text[:200], reason=f"at most {MAX_BREAKS} BREAKs")
    return merged


def _scan(text: str, field: str, parts: list[list[str]]) -> tuple[list[float], list[tuple[int, int, float]]]:
    """One pass over A1111's tokens: each piece's text into ``parts`` and its weight before the brackets (1, or
    -1 for a BREAK), and each bracket's range of pieces with its multiplier, in the order A1111 multiplies them.
    A run of text with no bracket between is one piece (A1111 merges such runs: equal weights)."""
    weights: list[float] = []
    ranges: list[tuple[int, int, float]] = []  # (first piece, end, multiplier)
    open_round: list[int] = []  # the first piece of each open bracket
    open_square: list[int] = []
    joinable = False  # the last piece takes more text (no bracket since it began)
    for match in ATTENTION.finditer(text):
        kind = match.lastindex
        if kind == OPEN_ROUND or kind == OPEN_SQUARE:
            (open_round if kind == OPEN_ROUND else open_square).append(len(weights))
            joinable = False
            continue
        if kind != TEXT and kind != ESCAPE:
            closed = _close(match, kind, open_round, open_square, len(weights), field, text)
            if closed is not None:
                ranges.append(closed)
                joinable = False
                continue
        token = match[0][1:] if kind == ESCAPE else match[0]  # (a closer with nothing open is text)
        split = kind != ESCAPE and "BREAK" in token
        if joinable and not split:
            parts[-1].append(token)
            continue
        if len(open_round) + len(open_square) > MAX_DEPTH:
            raise _too_deep(field, text, token)
        for i, part in enumerate(split_break(token) if split else (token,)):
            if i:
                weights.append(-1.0)
            weights.append(1.0)
            parts += [[BREAK], [part]] if i else [[part]]
        joinable = True
    end = len(weights)
    ranges += [(start, end, ROUND) for start in open_round] + [(start, end, SQUARE) for start in open_square]
    return weights, ranges


def _weights(weights: list[float], ranges: list[tuple[int, int, float]], field: str, text: str) -> np.ndarray:
    """Each piece's weight: multiplied once per bracket around it (at most MAX_DEPTH times), in A1111's order."""
    array = np.array(weights, dtype=np.float64)
    for start, stop, multiplier in ranges:
        if stop - start == 1:
            array[start] *= multiplier
        elif stop > start:
            array[start:stop] *= multiplier
    if not np.isfinite(array).all() or (len(array) and np.abs(array).max() > MAX_WEIGHT):
        raise SpecError(f"{field}: a weight reaches {np.abs(array).max():g} in {shown(text[:200])}; at most "
                        f"{MAX_WEIGHT:g} in size", field=field, value=text[:200],
                        reason=f"weights at most {MAX_WEIGHT:g} in size")
    return array


def _close(match: re.Match, kind: int, open_round: list[int], open_square: list[int], end: int, field: str,
           text: str) -> tuple[int, int, float] | None:
    """A closing token's range, or None: a closer with nothing open is text."""
    if kind == WEIGHT and open_round:
        return open_round.pop(), end, _weight(match[WEIGHT], field, text)
    if kind == CLOSE_ROUND and open_round:
        return open_round.pop(), end, ROUND
    if kind == CLOSE_SQUARE and open_square:
        return open_square.pop(), end, SQUARE
    return None


def _too_deep(field: str, text: str, at: str) -> SpecError:
    return SpecError(f"{field}: brackets nested more than {MAX_DEPTH} deep at {shown(at)}", field=field,
                     value=text[:200], reason=f"nest brackets at most {MAX_DEPTH} deep")


def split_break(text: str) -> list[str]:
    r"""``re.split(r"\s*\bBREAK\b\s*", text)`` (A1111's re_break) in one pass: as that expression, each split
    takes the blanks before and after a BREAK, but it is not retried from every blank of a long run."""
    if "BREAK" not in text:
        return [text]
    parts, start = [], 0
    for match in BREAK_WORD.finditer(text):
        if match.start() < start:  # inside the blanks the last split took
            continue
        cut = match.start()
        while cut > start and BLANK.match(text, cut - 1):
            cut -= 1
        parts.append(text[start:cut])
        start = BLANKS.match(text, match.end()).end()
    parts.append(text[start:])
    return parts


def _weight(text: str, field: str, prompt: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"{field}: the weight {shown(text)} is not a number (write (text:1.3))", field=field,
                        value=prompt[:200], reason=f"weight {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SpecError(f"{field}: the weight {shown(text)} is not a finite number", field=field,
                        value=prompt[:200], reason=f"weight {text!r} is not finite")
    return value


def pieces(text: str, emphasis: str, field: str = "prompt") -> list[Piece]:
    """How ``emphasis`` reads ``text``: ``none`` literally (one piece), the others by A1111's parse
    (``ignore`` keeps the parse and drops the weights later)."""
    if emphasis == NONE:
        return [(text, 1.0)]
    return parse_attention(text, field)


@dataclass(frozen=True)
class Chunk:
    """One window of the text encoder: up to ``length`` tokens and their weights (BOS, EOS and padding are the
    encoder's: adapters/clip_prompts.py); ``fixes``: (offset, embedding) of each textual-inversion embedding in
    it, whose vectors replace the placeholder tokens there (adapters/embeddings.py)."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[tuple[int, Any], ...] = ()


PLACEHOLDER = 0  # A1111's token under an embedding's vectors


def chunk(parts: Sequence[Piece], tokenize: Callable[[list[str]], list[list[int]]], length: int,
          comma: int | None, backtrack: int = COMMA_BACKTRACK,
          find: Callable[[Sequence[int], int], tuple[Any, int] | None] | None = None) -> list[Chunk]:
    """A1111's ``tokenize_line``: the pieces' tokens in chunks of ``length``; a ``BREAK`` piece ends a chunk;
    a full chunk with a comma among its last ``backtrack`` tokens moves what follows the comma to the next;
    ``find(tokens, i)``: the embedding whose name starts at token i and its name's token count, or None (an
    embedding's vectors go whole into one chunk)."""
    builder = _Chunks(length, comma, backtrack)
    for (text, weight), ids in zip(parts, tokenize([text for text, _ in parts]), strict=True):
        if text == BREAK and weight == -1:
            builder.end()
            continue
        position = 0
        while position < len(ids):
            builder.make_room(ids[position])
            found = find(ids, position) if find is not None else None
            if found is None:
                builder.add([ids[position]], weight)
                position += 1
                continue
            embedding, name_tokens = found
            if len(builder.tokens) + embedding.length > length:
                builder.end()
            builder.fixes.append((len(builder.tokens), embedding))
            builder.add([PLACEHOLDER] * embedding.length, weight)
            position += name_tokens
    if builder.tokens or not builder.chunks:
        builder.end()
    return builder.chunks


class _Chunks:
    """The chunk being filled and those done (``chunk``'s state)."""

    def __init__(self, length: int, comma: int | None, backtrack: int) -> None:
        self.length, self.comma, self.backtrack = length, comma, backtrack
        self.chunks: list[Chunk] = []
        self.tokens: list[int] = []
        self.weights: list[float] = []
        self.fixes: list[tuple[int, Any]] = []
        self.last_comma = -1

    def end(self) -> None:
        self.chunks.append(Chunk(tuple(self.tokens), tuple(self.weights), tuple(self.fixes)))
        self.tokens, self.weights, self.fixes, self.last_comma = [], [], [], -1

    def make_room(self, token: int) -> None:
        """Before ``token``: note a comma, or, the chunk full, move what follows a near comma on, then end it."""
        if token == self.comma:
            self.last_comma = len(self.tokens)
        elif (self.backtrack and len(self.tokens) == self.length and self.last_comma != -1
              and len(self.tokens) - self.last_comma <= self.backtrack):
            cut = self.last_comma + 1
            moved = self.tokens[cut:], self.weights[cut:], [(o - cut, e) for o, e in self.fixes if o >= cut]
            self.tokens, self.weights = self.tokens[:cut], self.weights[:cut]
            self.fixes = [(o, e) for o, e in self.fixes if o < cut]
            self.end()
            self.tokens, self.weights, self.fixes = list(moved[0]), list(moved[1]), moved[2]
        if len(self.tokens) == self.length:
            self.end()

    def add(self, tokens: list[int], weight: float) -> None:
        self.tokens += tokens
        self.weights += [weight] * len(tokens)
