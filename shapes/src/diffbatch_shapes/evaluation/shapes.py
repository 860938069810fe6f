"""A deterministic analyser for shapes pictures (no neural network) and a GenEval-style evaluation.

The analyser reads the background colour from the image border, takes the largest connected region
that differs from it as the shape, names colours by the nearest named colour of the data set, calls
the position from the shape's bounding-box centre, and the class by overlap with templates drawn by
the data set's own code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from ..training.shapes_data import COLOURS, POSITIONS, SHAPES, SIZES, shape_mask

ATTRIBUTES = ("background", "colour", "shape", "position")
_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)  # [K, 3]
_SHAPE_THRESHOLD = 45.0  # RGB distance from the background that makes a pixel part of the shape
_CENTRE_BAND = 0.1  # |offset| / side under which a shape counts as centred
_GRID = 24  # side of the normalised mask compared with the templates
_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom",
                   "centre": "centre", "center": "centre", "middle": "centre"}


@dataclass(frozen=True)
class Analysis:
    """What the analyser sees in one picture; ``None`` where it found no shape."""

    background: str
    colour: str | None
    shape: str | None
    position: str | None
    size: str | None


def nearest_colour(rgb: np.ndarray) -> str:
    """The named colour closest to ``rgb`` (Euclidean in RGB)."""
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def analyse(image: Image.Image) -> Analysis:
    """Background colour, shape colour, class, position and size of the (single) shape in ``image``."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H, W, 3]
    bg_rgb = np.median(border_band(pixels), axis=0)
    mask = largest_component(np.linalg.norm(pixels - bg_rgb, axis=2) > _SHAPE_THRESHOLD)
    if mask.sum() < 4:
        return Analysis(nearest_colour(bg_rgb), None, None, None, None)
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return Analysis(
        background=nearest_colour(bg_rgb),
        colour=nearest_colour(np.median(pixels[erode(mask)], axis=0)),
        shape=classify_shape(mask[box[1]:box[3], box[0]:box[2]]),
        position=position_of(box, pixels.shape[1], pixels.shape[0]),
        size="large" if max(box[2] - box[0], box[3] - box[1]) / pixels.shape[1] > 25 / 64 else "small",
    )


def border_band(pixels: np.ndarray, inner: int = 2, outer: int = 6) -> np.ndarray:
    """Pixels between ``inner`` and ``outer`` from the edge, as [N, 3]: near the border, where only
    background should be, but past the outermost pixels, where decoders leave frame artifacts."""
    h, w = pixels.shape[:2]
    band = np.zeros((h, w), dtype=bool)
    band[inner:h - inner, inner:w - inner] = True
    band[outer:h - outer, outer:w - outer] = False
    return pixels[band]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (so stray specks do not move the shape); of equal
    regions, the first in raster order."""
    labels, count = ndimage.label(mask)  # the default structure is 4-connectivity; labels in raster order
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours are in the mask too (no anti-aliased edge); the mask if none."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner if inner.any() else mask


def position_of(box: tuple[int, int, int, int], width: int, height: int) -> str:
    dx = (box[0] + box[2]) / 2 / width - 0.5
    dy = (box[1] + box[3]) / 2 / height - 0.5
    if max(abs(dx), abs(dy)) < _CENTRE_BAND:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def classify_shape(crop: np.ndarray) -> str:
    """The template (drawn by the data set code, cropped to its box) that overlaps ``crop`` most."""
    grid = _normalise(crop.astype(np.float32))
    scores = {name: np.minimum(grid, t).sum() / np.maximum(grid, t).sum() for name, t in _templates().items()}
    return max(scores, key=scores.get)


def _normalise(crop: np.ndarray) -> np.ndarray:
    image = Image.fromarray((crop * 255).astype(np.uint8), "L").resize((_GRID, _GRID), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32) / 255.0


@lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    out = {}
    for name in SHAPES:
        mask = shape_mask(name, 48, 48, 80, size=96) > 0.5
        ys, xs = np.nonzero(mask)
        out[name] = _normalise(mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    return out


# ---------------------------------------------------------------------------------------------- prompts

def parse_prompt(prompt: str) -> dict[str, str | None]:
    """Expected attributes named by a prompt: background and shape colour, shape, position, size."""
    words = re.findall(r"[a-z]+", prompt.lower())
    expected: dict[str, str | None] = dict.fromkeys((*ATTRIBUTES, "size"))
    for i, word in enumerate(words):
        ahead = words[i + 1:i + 3]
        if word in COLOURS and "background" in ahead:
            expected["background"] = word
        elif word in COLOURS and expected["colour"] is None:
            expected["colour"] = word
        elif word in SHAPES and expected["shape"] is None:
            expected["shape"] = word
        elif word in _POSITION_WORDS and expected["position"] is None:
            expected["position"] = _POSITION_WORDS[word]
        elif word in SIZES and expected["size"] is None:
            expected["size"] = word
    return expected


# ---------------------------------------------------------------------------------------------- evaluation

EVAL_PROMPTS = (  # every shape, colour and position at least twice; backgrounds vary
    "a small red circle on the left, blue background",
    "a large yellow star on a black background, in the centre",
    "a large green square at the top, white background",
    "a small blue triangle at the bottom, yellow background",
    "a large white ring on the right, purple background",
    "a small orange cross in the centre, green background",
    "a large purple triangle on the left, orange background",
    "a small black circle at the top, red background",
    "a large red star at the bottom, white background",
    "a small yellow square on the right, blue background",
    "a large blue ring in the centre, orange background",
    "a small green cross on the left, black background",
    "a large orange circle on the right, purple background",
    "a small purple square at the bottom, yellow background",
    "a large black triangle in the centre, green background",
    "a small white star at the top, red background",
    "a large green ring at the bottom, black background",
    "a small red cross at the top, white background",
    "a large blue circle at the bottom, yellow background",
    "a small yellow triangle on the right, purple background",
    "a large orange star on the left, blue background",
    "a small white square in the centre, black background",
    "a large purple cross on the right, white background",
    "a small black ring on the left, orange background",
)

GenerateFn = Callable[[Sequence[str], Sequence[int]], list[Image.Image]]


@dataclass
class EvalResult:
    """Per-attribute accuracy (over prompts that name the attribute) and every image's verdict."""

    accuracy: dict[str, float]
    records: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "records": self.records}


def score(prompt: str, image: Image.Image) -> dict:
    """The analyser's reading of ``image`` against the prompt's attributes."""
    expected, found = parse_prompt(prompt), asdict(analyse(image))
    checks = {a: found[a] == expected[a] for a in ATTRIBUTES if expected[a] is not None}
    return {"prompt": prompt, "expected": expected, "found": found, "correct": checks}


def evaluate(generate_fn: GenerateFn, prompts: Sequence[str] = EVAL_PROMPTS, seeds: Sequence[int] = (0, 1, 2, 3),
             ) -> tuple[EvalResult, list[Image.Image]]:
    """Generate every prompt with every seed (one call), analyse each image, and average per attribute."""
    pairs = [(p, s) for s in seeds for p in prompts]
    images = generate_fn([p for p, _ in pairs], [s for _, s in pairs])
    records = [{**score(p, img), "seed": s} for (p, s), img in zip(pairs, images, strict=True)]
    return EvalResult(accuracy=accuracy_of(records), records=records), images


def accuracy_of(records: Sequence[dict]) -> dict[str, float]:
    out = {}
    for attribute in ATTRIBUTES:
        verdicts = [r["correct"][attribute] for r in records if attribute in r["correct"]]
        if verdicts:
            out[attribute] = sum(verdicts) / len(verdicts)
    return out


def analyser_accuracy(count: int = 1000, seed: int = 12345) -> dict[str, float]:
    """The analyser on the data set's own pictures against their ground truth (the proof it can judge)."""
    from ..training.shapes_data import make_dataset

    images, scenes = make_dataset(count, seed)
    hits = dict.fromkeys((*ATTRIBUTES, "size"), 0)
    for pixels, scene in zip(images, scenes, strict=True):
        found = analyse(Image.fromarray(pixels))
        truth = {"background": scene.background, "colour": scene.colour, "shape": scene.shape,
                 "position": scene.position, "size": scene.size}
        for key in hits:
            hits[key] += getattr(found, key) == truth[key]
    return {key: value / count for key, value in hits.items()}


__all__ = ["ATTRIBUTES", "EVAL_PROMPTS", "POSITIONS", "Analysis", "EvalResult", "analyse", "analyser_accuracy",
           "evaluate", "parse_prompt", "score"]
