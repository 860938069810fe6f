"""AUTOMATIC1111's prompt language (prompt_language.py, adapters/clip_prompts.py): the parse as A1111 documents
it, the chunks, and images: a prompt read in the language equals diffusers given the same prompt embeddings, alone
and in a mixed batch; a prompt without the language's syntax is the image diffusers makes of it."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffbatch import Engine, GenerationSpec
from diffbatch.errors import SpecError
from diffbatch.io.infotext import parse_infotext
from diffbatch.io.writer import format_parameters
from diffbatch.prompt_language import BREAK, chunk, parse_attention, split_break
from diffbatch.spec import ModelDefaults
from helpers import DiffusersOracle
from tiny import tiny_sd_components

# parse_prompt_attention's docstring examples (modules/prompt_parser.py), weights to the last bit
DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize(("text", "expected"), DOCUMENTED)
def test_parse_is_a1111s_documented_reading(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("a) b] c", [("a) b] c", 1.0)]),  # a closer with nothing open is text
    ("[x", [("x", 1 / 1.1)]),
    ("(x:1e309)", [("x:1e309", 1.1)]),  # not a weight A1111's expression reads: text, then ")" closes as x1.1
    ("(x: 1.5 )", [("x", 1.5)]),
    ("(x:-1)", [("x", -1.0)]),
    ("\\\\ and \\", [("\\ and ", 1.0)]),
    ("a BREAK b", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), (BREAK, -1.1), ("b", 1.1)]),  # inside brackets a BREAK is text, as in A1111
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_is_lenient_as_a1111(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize(("text", "says"), [
    ("(x:1.2.3)", "not a number"),
    ("(x:.)", "not a number"),
    ("((x:" + "9" * 300 + "):" + "9" * 300 + ")", "at most 1000 in size"),  # 1e300 twice: inf
    ("(x:" + "9" * 400 + ")", "not a finite"),
    ("(x:1001)", "at most 1000 in size"),  # the hidden states would overflow into a NaN image
    ("((x:-40):30)", "reaches 1200"),
    ("(" * 101 + "x", "nested more than 100"),
    ("(a)" * 5001, "10002 brackets; a prompt may have at most 10000"),
    ("x BREAK " * 32, "32 BREAKs; a prompt may have at most 31"),
    ("(x:-1)" * 40 + "x BREAK " * 32, "32 BREAKs"),  # a weight of -1 is no BREAK
])
def test_bad_weights_and_nesting_are_refused_naming_the_field(text, says):
    with pytest.raises(SpecError, match=says) as caught:
        parse_attention(text, "negative_prompt")
    assert caught.value.field == "negative_prompt"


def test_break_splits_as_a1111s_expression():
    expression = re.compile(r"\s*\bBREAK\b\s*", re.S)  # A1111's re_break, here on short texts only
    rng = random.Random(0)
    alphabet = [" ", "\t", "\n", "\u3000", "BREAK", "a", "B", "_", "BREAKS", "x BREAK", "é"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        assert split_break(text) == expression.split(text), text


def _by_char(texts: list[str]) -> list[list[int]]:
    return [[ord(c) for c in t] for t in texts]


def test_chunks_break_at_the_window_at_a_nearby_comma_and_at_break():
    comma = ord(",")
    # windows of 5: the window is full at "abc,d"; the comma is 2 tokens from its end, so "d" moves on
    chunks = chunk([("abc,defg", 1.0)], _by_char, 5, comma)
    assert ["".join(map(chr, c.tokens)) for c in chunks] == ["abc,", "defg"]
    chunks = chunk([("a,bcdefg", 1.0)], _by_char, 5, comma, backtrack=2)  # a comma further back stays put
    assert ["".join(map(chr, c.tokens)) for c in chunks] == ["a,bcd", "efg"]
    chunks = chunk([("abc,de", 1.0), ("fg", 2.0)], _by_char, 5, comma)  # the 6th token, a full chunk: backtrack
    assert ["".join(map(chr, c.tokens)) for c in chunks] == ["abc,", "defg"]
    assert chunks[1].weights == (1.0, 1.0, 2.0, 2.0)
    chunks = chunk([("abcdefg", 1.0)], _by_char, 5, comma, backtrack=0)
    assert ["".join(map(chr, c.tokens)) for c in chunks] == ["abcde", "fg"]
    chunks = chunk([("ab", 1.0), (BREAK, -1.0), ("cd", 1.0)], _by_char, 5, comma)
    assert ["".join(map(chr, c.tokens)) for c in chunks] == ["ab", "cd"]
    assert [c.tokens for c in chunk([("", 1.0)], _by_char, 5, comma)] == [()]  # an empty prompt: one empty chunk


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The tiny SD with a learned-looking final layer norm: at its initial weight 1 and bias 0 every token's
    hidden state has mean 0, and "Original" emphasis, which divides by the chunk's mean, is 0 / 0 (a real CLIP's
    is not)."""
    folder = tmp_path_factory.mktemp("tiny-sd-emphasis")
    components = tiny_sd_components(folder / "tokenizer", seed=3)
    with torch.no_grad():
        components["text_encoder"].final_layer_norm.bias.normal_(0.5, 0.2)
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(
        folder / "model", safe_serialization=True)
    return folder / "model"


@pytest.fixture(scope="module")
def engine(model) -> Engine:
    return Engine.from_pretrained(model, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def oracle(model) -> DiffusersOracle:
    return DiffusersOracle(model)


def spec(prompt: str, **fields) -> GenerationSpec:
    return GenerationSpec(prompt=prompt, seed=fields.pop("seed", 5), num_inference_steps=3, **fields)


LONG = "a red circle on a blue ground, top left, "  # 42 tokens: three windows of the tiny tokenizer's 14


def test_plain_prompts_are_diffusers_images_whatever_the_emphasis(engine, oracle):
    a, b = engine.generate([spec("a red circle"), spec("a red circle", emphasis="none")])
    assert a.spec.emphasis == "original"  # the default on a CLIP model
    assert np.array_equal(a.pixels, b.pixels)
    assert np.abs(a.pixels - oracle(a.spec)).max() <= 1e-4


def test_a_weight_of_one_is_the_plain_image_and_another_weight_is_not(engine):
    plain, one, more = engine.generate([spec("red ring"), spec("red (ring:1.0)"), spec("red (ring:1.3)")])
    assert np.array_equal(plain.pixels, one.pixels)
    assert not np.array_equal(plain.pixels, more.pixels)
    literal = engine.generate([spec("red (ring:1.3)", emphasis="none")])[0]
    assert not np.array_equal(literal.pixels, more.pixels)  # the brackets read as text


def test_the_end_of_a_long_prompt_changes_the_image(engine):
    a, b = engine.generate([spec(LONG * 2 + "small"), spec(LONG * 2 + "large")])
    assert not np.array_equal(a.pixels, b.pixels)  # past the window: chunked, not cut


def _embeds(pipe: StableDiffusionPipeline, text: str, clip_skip: int = 1) -> torch.Tensor:
    """A1111's reading, written out independently of diffbatch's encoder: its chunks, each [BOS, tokens, EOS,
    padding], encoded alone; each token's hidden state times its weight, the chunk's mean restored."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    window = tokenizer.model_max_length - 2
    chunks = chunk(parse_attention(text), lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], window,
                   tokenizer.get_vocab().get(",</w>"))
    zs = []
    for c in chunks:
        pad = window - len(c.tokens)
        ends = [tokenizer.eos_token_id, *[tokenizer.pad_token_id] * pad]
        ids = torch.tensor([[tokenizer.bos_token_id, *c.tokens, *ends]])
        weights = torch.tensor([1.0, *c.weights, *[1.0] * (pad + 1)])
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        z = out[0] if clip_skip == 1 else encoder.final_layer_norm(out.hidden_states[-clip_skip])
        weighted = z * weights[None, :, None]
        zs.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(zs, dim=1)


@pytest.mark.parametrize(("prompt", "negative"), [
    ("(red:1.4) [dot]", "((green))"),  # one window each (the tiny tokenizer's: 14 characters)
    (LONG + "(small:0.8)", LONG.replace("red", "tan") + "large"),  # both four: diffusers takes one length only
])
def test_a_prompt_in_the_language_is_diffusers_given_its_embeddings(engine, oracle, prompt, negative):
    result = engine.generate([spec(prompt, negative_prompt=negative, guidance_scale=6.0)])[0]
    pipe = oracle.pipe
    reference = pipe(prompt_embeds=_embeds(pipe, prompt), negative_prompt_embeds=_embeds(pipe, negative),
                     num_inference_steps=3, guidance_scale=6.0, generator=torch.Generator().manual_seed(5),
                     output_type="np").images[0]
    assert np.abs(result.pixels - reference).max() <= 1e-4


def test_clip_skip_is_diffusers_clip_skip_one_less(engine, oracle):
    result = engine.generate([spec("a red circle", clip_skip=2, negative_prompt="blue")])[0]
    pipe = oracle.pipe
    # diffusers 0.42 reads text_encoder.text_model, which transformers 5's CLIPTextModel no longer has: alias it
    object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
    try:
        reference = pipe("a red circle", negative_prompt="blue", clip_skip=1, num_inference_steps=3,
                         generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    finally:
        object.__delattr__(pipe.text_encoder, "text_model")
    assert np.abs(result.pixels - reference).max() <= 1e-4
    plain = engine.generate([spec("a red circle", negative_prompt="blue")])[0]
    assert not np.array_equal(plain.pixels, result.pixels)


def test_each_reading_in_a_mixed_batch_is_its_image_alone(engine):
    specs = [spec("a red circle"), spec("a (red:1.5) circle", seed=6), spec(LONG * 2, negative_prompt="dark"),
             spec("red BREAK circle", emphasis="no_norm"), spec("a [red] circle", emphasis="ignore"),
             spec("a red circle", clip_skip=2, negative_prompt=LONG), spec("(a red circle)", emphasis="none"),
             spec("a red circle", guidance_scale=1.0, seed=7)]
    batched = engine.generate(specs)
    for s, result in zip(specs, batched, strict=True):
        assert np.array_equal(result.pixels, engine.generate([s])[0].pixels), s


def test_emphasis_and_clip_skip_are_written_and_read_as_a1111_writes_them():
    made = spec("a (red:1.2) circle", emphasis="no_norm", clip_skip=2).resolve(ModelDefaults(), 5)
    text = format_parameters(made, "DDIM", "tiny")
    assert "Emphasis: No norm" in text and "Clip skip: 2" in text
    read = parse_infotext(text).fields
    assert read["emphasis"] == "no_norm" and read["clip_skip"] == 2
    default = format_parameters(spec("a (red:1.2) circle").resolve(ModelDefaults(), 5), "DDIM", "tiny")
    assert "Emphasis" not in default and "Clip skip" not in default  # A1111's defaults are not written
    assert "emphasis" not in parse_infotext(default).fields  # so the model's default (Original) reads it
    assert "Emphasis" in parse_infotext("x\nSteps: 3, Seed: 1, Emphasis: Loud").refused  # refused by name


def test_a_clip_skip_past_the_text_encoders_layers_is_refused_by_name(engine):
    with pytest.raises(SpecError, match="has 2 layers") as caught:  # the tiny encoder's
        engine.resolve(spec("a dot", clip_skip=3), seed=1)
    assert caught.value.field == "clip_skip"
    assert engine.resolve(spec("a dot", clip_skip=2), seed=1).clip_skip == 2
