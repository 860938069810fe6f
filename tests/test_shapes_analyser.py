"""The deterministic shapes analyser judges the data set's own pictures correctly, and the scoring fails
images that do not match their prompt."""

import random

import numpy as np
from diffbatch_shapes.evaluation.shapes import (
    ATTRIBUTES,
    EVAL_PROMPTS,
    analyse,
    analyser_accuracy,
    evaluate,
    parse_prompt,
)
from diffbatch_shapes.training.shapes_data import SIZES, ShapeScene, make_dataset, render
from PIL import Image


def test_analyser_reads_ground_truth_pictures():
    accuracy = analyser_accuracy(count=300, seed=2024)
    assert all(accuracy[a] >= 0.98 for a in ATTRIBUTES), accuracy


def test_analyser_tolerates_pixel_noise():
    images, scenes = make_dataset(100, seed=11)
    noise = np.random.default_rng(0).normal(0, 12, images.shape)
    hits = 0
    for pixels, scene in zip(np.clip(images + noise, 0, 255).astype(np.uint8), scenes, strict=True):
        found = analyse(Image.fromarray(pixels))
        hits += (found.background, found.colour, found.shape, found.position) == \
            (scene.background, scene.colour, scene.shape, scene.position)
    assert hits >= 95


def test_a_plain_picture_has_no_shape():
    found = analyse(Image.new("RGB", (64, 64), (35, 70, 225)))
    assert found.background == "blue" and found.shape is None and found.colour is None


def test_prompt_parsing_finds_each_attribute_in_any_order():
    assert parse_prompt("blue background, a large yellow star in the middle") == {
        "background": "blue", "colour": "yellow", "shape": "star", "position": "centre", "size": "large"}
    assert parse_prompt("A red square on a green background, at the top") == {
        "background": "green", "colour": "red", "shape": "square", "position": "top", "size": None}
    assert parse_prompt("a blue square")["background"] is None


def _render_prompt(prompt: str, colour_override: str | None = None) -> Image.Image:
    want = parse_prompt(prompt)
    offsets = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "centre": (0, 0)}
    side = SIZES[want["size"]]
    room = (64 - side) / 2 - 2
    dx, dy = offsets[want["position"]]
    scene = ShapeScene(want["shape"], colour_override or want["colour"], want["background"], want["size"],
                       want["position"], 32 + dx * room, 32 + dy * room, side)
    return render(scene)


def test_evaluation_scores_faithful_images_perfectly():
    result, images = evaluate(lambda prompts, seeds: [_render_prompt(p) for p in prompts], EVAL_PROMPTS, [0, 1])
    assert len(images) == 2 * len(EVAL_PROMPTS)
    assert result.accuracy == dict.fromkeys(ATTRIBUTES, 1.0)


def test_evaluation_catches_wrong_colours():
    rng = random.Random(0)

    def wrong(prompts, seeds):
        return [_render_prompt(p, rng.choice([c for c in ("red", "green") if c not in p])) for p in prompts]

    result, _ = evaluate(wrong, EVAL_PROMPTS, [0])
    assert result.accuracy["colour"] < 0.2 and result.accuracy["shape"] == 1.0
