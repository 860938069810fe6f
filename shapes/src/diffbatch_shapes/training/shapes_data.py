"""Procedural 64x64 shapes data set: one flat shape on a plain background, with a caption.

Everything is a pure function of a seed (``random.Random``), so the data set, and the model trained on
it, can be regenerated anywhere. Shapes are drawn 4x larger and box-filtered down, for clean edges.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 30),
    "green": (40, 170, 50),
    "blue": (35, 70, 225),
    "purple": (140, 45, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
SIZES = {"small": 18.0, "large": 32.0}  # bounding-box side in pixels
POSITIONS = ("left", "right", "top", "bottom", "centre")
# centre offset (dx, dy) of a shape as a fraction of the free room between it and the image border
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "centre": (0, 0)}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "on the top"),
    "bottom": ("at the bottom", "on the bottom"),
    "centre": ("in the centre", "in the center", "in the middle"),
}


@dataclass(frozen=True)
class ShapeScene:
    """The ground truth of one image."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    cx: float  # shape centre, pixels
    cy: float
    side: float  # bounding-box side, pixels


def sample_scene(rng: random.Random) -> ShapeScene:
    """Draw attributes uniformly; the background always differs from the shape's colour."""
    colour = rng.choice(list(COLOURS))
    background = rng.choice([c for c in COLOURS if c != colour])
    size, position = rng.choice(list(SIZES)), rng.choice(POSITIONS)
    side = SIZES[size] * rng.uniform(0.92, 1.08)
    room = (IMAGE_SIZE - side) / 2 - 2  # how far the centre may move before the shape leaves the image
    dx, dy = _DIRECTIONS[position]
    cx = IMAGE_SIZE / 2 + dx * room + rng.uniform(-1.5, 1.5)
    cy = IMAGE_SIZE / 2 + dy * room + rng.uniform(-1.5, 1.5)
    return ShapeScene(rng.choice(SHAPES), colour, background, size, position, cx, cy, side)


def shape_polygons(shape: str, cx: float, cy: float, side: float) -> list[list[tuple[float, float]]]:
    """Outline(s) of a shape as polygons; a ring is [outer, inner] (the inner one is cut out)."""
    r = side / 2
    if shape == "square":
        r *= 0.9  # equal visual weight with the circle
        return [[(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]]
    if shape == "triangle":
        return [[(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]]
    if shape == "star":
        return [[_polar(cx, cy, r if k % 2 == 0 else r * 0.42, k * math.pi / 5) for k in range(10)]]
    if shape == "cross":
        a = r / 3
        return [[(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
                 (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
                 (cx - r, cy - a), (cx - a, cy - a)]]
    circle = [_polar(cx, cy, r, k * math.pi / 32) for k in range(64)]
    if shape == "ring":
        return [circle, [_polar(cx, cy, r * 0.55, k * math.pi / 32) for k in range(64)]]
    return [circle]


def _polar(cx: float, cy: float, r: float, angle: float) -> tuple[float, float]:
    """A point at ``angle`` clockwise from straight up (so stars and triangles point up)."""
    return (cx + r * math.sin(angle), cy - r * math.cos(angle))


def shape_mask(shape: str, cx: float, cy: float, side: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage in [0, 1] of a shape on a ``size`` x ``size`` grid (anti-aliased)."""
    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    for k, polygon in enumerate(shape_polygons(shape, cx, cy, side)):
        scaled = [(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in polygon]
        draw.polygon(scaled, fill=0 if k else 255)  # later polygons are holes
    small = big.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(scene: ShapeScene) -> Image.Image:
    """The 64x64 RGB picture of a scene."""
    alpha = shape_mask(scene.shape, scene.cx, scene.cy, scene.side)[..., None]  # [H, W, 1]
    fg = np.array(COLOURS[scene.colour], dtype=np.float32)
    bg = np.array(COLOURS[scene.background], dtype=np.float32)
    pixels = alpha * fg + (1 - alpha) * bg
    return Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")


def caption(scene: ShapeScene, rng: random.Random, drop: float = 0.0) -> str:
    """A caption from a small grammar; each of size, position and background is left out with
    probability ``drop`` so that short prompts ("a blue square") are in-distribution too."""
    size = "" if rng.random() < drop else scene.size + " "
    noun = f"{size}{scene.colour} {scene.shape}"
    where = "" if rng.random() < drop else rng.choice(_POSITION_PHRASES[scene.position])
    bg = "" if rng.random() < drop else scene.background
    forms = [_caption_noun_first, _caption_background_first, _caption_on_background]
    return rng.choice(forms)(rng.choice(["a ", "a ", ""]) + noun, where, bg)


def _caption_noun_first(noun: str, where: str, bg: str) -> str:
    parts = [noun + (" " + where if where else "")]
    return ", ".join(parts + ([f"{bg} background"] if bg else []))


def _caption_background_first(noun: str, where: str, bg: str) -> str:
    head = f"{bg} background, " if bg else ""
    return head + noun + (" " + where if where else "")


def _caption_on_background(noun: str, where: str, bg: str) -> str:
    text = noun + (f" on a {bg} background" if bg else "")
    return text + (", " + where if where else "")


def full_caption(scene: ShapeScene) -> str:
    """The canonical caption with every attribute, e.g. "a small red circle on the left, blue background"."""
    return f"a {scene.size} {scene.colour} {scene.shape} {_POSITION_PHRASES[scene.position][0]}, " \
           f"{scene.background} background"


def make_dataset(count: int, seed: int = 0) -> tuple[np.ndarray, list[ShapeScene]]:
    """``count`` images as uint8 [N, 64, 64, 3] and their scenes; the same seed gives the same data."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(count)]
    images = np.stack([np.asarray(render(s)) for s in scenes])
    return images, scenes


def caption_vocabulary() -> list[str]:
    """Every word the caption grammar can produce (for the tokenizer)."""
    words = {"a", "background", "on", "the", "at", "in", *COLOURS, *SHAPES, *SIZES}
    for phrases in _POSITION_PHRASES.values():
        for phrase in phrases:
            words.update(phrase.split())
    return sorted(words)
