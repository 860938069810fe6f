"""The procedural shapes data set and its tokenizer: deterministic, captions agree with pictures."""

import random

import numpy as np
import pytest
from diffbatch_shapes.evaluation.shapes import parse_prompt
from diffbatch_shapes.training.shapes_data import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    caption,
    caption_vocabulary,
    full_caption,
    make_dataset,
)
from diffbatch_shapes.training.tokenizer import write_tokenizer_files
from transformers import CLIPTokenizer


def test_same_seed_gives_the_same_images_and_scenes():
    images_a, scenes_a = make_dataset(40, seed=7)
    images_b, scenes_b = make_dataset(40, seed=7)
    assert np.array_equal(images_a, images_b)
    assert scenes_a == scenes_b


def test_another_seed_gives_other_images():
    assert not np.array_equal(make_dataset(10, seed=1)[0], make_dataset(10, seed=2)[0])


def test_images_are_64x64_rgb_with_a_background_unlike_the_shape():
    images, scenes = make_dataset(200, seed=3)
    assert images.shape == (200, 64, 64, 3) and images.dtype == np.uint8
    assert all(s.background != s.colour for s in scenes)
    assert {s.shape for s in scenes} == set(SHAPES) and {s.position for s in scenes} == set(POSITIONS)
    assert {s.colour for s in scenes} == set(COLOURS) and {s.size for s in scenes} == set(SIZES)
    assert len(COLOURS) >= 8 and len(SHAPES) >= 6


def test_captions_name_what_the_scene_holds_in_every_word_order():
    _, scenes = make_dataset(200, seed=4)
    rng = random.Random(0)
    for scene in scenes:
        text = caption(scene, rng, drop=0.0)
        expected = {"background": scene.background, "colour": scene.colour, "shape": scene.shape,
                    "position": scene.position, "size": scene.size}
        assert parse_prompt(text) == expected, text
        assert parse_prompt(full_caption(scene)) == expected


def test_short_captions_leave_attributes_out():
    _, scenes = make_dataset(50, seed=5)
    texts = [caption(s, random.Random(k), drop=1.0) for k, s in enumerate(scenes)]
    assert all(parse_prompt(t)["background"] is None and parse_prompt(t)["position"] is None for t in texts)
    assert all(parse_prompt(t)["shape"] is not None for t in texts)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = write_tokenizer_files(tmp_path_factory.mktemp("tokenizer"), caption_vocabulary())
    return CLIPTokenizer.from_pretrained(folder)


def test_every_caption_word_is_one_token(tokenizer):
    for word in caption_vocabulary():
        assert tokenizer.tokenize(word) == [word + "</w>"]


def test_unknown_words_still_tokenize_as_bytes(tokenizer):
    ids = tokenizer("a zebra-crossing über 42").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]  # CLIP's unknown token is its end token
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "azebra-crossingüber42"


def test_prompts_pad_to_the_model_length_with_end_tokens(tokenizer):
    ids = tokenizer("a red square", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == tokenizer.model_max_length
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
