"""Every routine that reads user text takes time linear in its length. Each is fed about 1 MB of adversarial
text (long runs of what it matches, unclosed quotes and tags, separators by the hundred thousand) and must
finish within a budget scaled from a linear pass over 1 MB on this machine, now: the quadratic versions these
replaced take hours on such input (60 KB of PNG settings text took 36 s, 150 KB of "<lora:" and blanks 122 s),
and are stopped at the budget rather than waited for."""

from __future__ import annotations

import contextlib
import re
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from diffbatch import GenerationSpec
from diffbatch.io.gallery import contact_sheet, render_html
from diffbatch.io.infotext import parse_infotext, png_parameters
from diffbatch.io.prompts import JobSource, read_job
from diffbatch.io.writer import format_parameters
from diffbatch.resolver import Resolver
from diffbatch.spec import parse_size
from helpers import noise_image

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM to stop a slow routine")
MB = 1_000_000
ONE_STEP_PER_CHARACTER = re.compile(r".", re.DOTALL)


class TooSlow(BaseException):
    """Raised by the timer inside the routine (a BaseException: no ``except Exception`` there swallows it)."""


@pytest.fixture(scope="module")
def budget() -> float:
    """Seconds a linear routine may take over 1 MB: ten times a regular-expression step per character over 1 MB
    (the best of three runs), plus a second for a busy machine."""
    text = "a" * MB
    return 10 * min(_seconds(lambda: sum(1 for _ in ONE_STEP_PER_CHARACTER.finditer(text))) for _ in range(3)) + 1.0


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


@contextlib.contextmanager
def stopped_after(seconds: float, what: str) -> Iterator[None]:
    def stop(*_: object) -> None:
        raise TooSlow

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except TooSlow:
        pytest.fail(f"{what} took more than the {seconds:.1f} s budget: not linear in its input")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_linear(routine: Callable[[str], object], text: str, budget: float) -> None:
    """``routine(text)`` answers (a refusal, any ``ValueError``, is an answer) within ``budget`` seconds."""
    with stopped_after(budget, f"{getattr(routine, '__name__', routine)} on {len(text)} characters {text[:24]!r}..."):
        seconds = _seconds(lambda: _answer(routine, text))
    assert seconds <= budget


def _answer(routine: Callable[[str], object], text: str) -> None:
    with contextlib.suppress(ValueError):
        routine(text)


SETTINGS_TEXTS = {
    "a run of key characters and no colon": "p\n" + "a" * MB,
    "words and blanks": "p\n" + "a " * (MB // 2),
    "key characters of every kind": "p\n" + "Steps - / " * (MB // 10),
    "one line and no prompt": "a" * MB,
    "an unclosed quote": 'p\nSteps: 1, Model: "' + 'a\\"' * (MB // 3),
    "backslashes after a quote": 'p\nSteps: 1, Model: "' + "\\" * MB,
    "a long quoted value": 'p\nSteps: 1, Model: "' + "x, y: " * (MB // 6) + '"',
    "many settings": "p\n" + "Steps: 1, " * (MB // 10),
    "one-letter keys": "p\n" + "a:" * (MB // 2),
    "colons": "p\nSteps: 1, " + ":" * MB,
    "commas": "p\nSteps: 1" + "," * MB,
    "blank lines": "\n" * MB + "Steps: 1",
    "negative prompt lines": "Negative prompt: x\n" * (MB // 19) + "Steps: 1",
    "non-ASCII word characters": "p\n" + "é" * MB,
    "a long number": "p\nSteps: " + "1" * MB,
    "a long size": "p\nSteps: 1, Size: " + " " * MB + "x",
}


@pytest.mark.parametrize("text", SETTINGS_TEXTS.values(), ids=SETTINGS_TEXTS.keys())
def test_png_settings_text_is_read_in_linear_time(budget, text):
    assert_linear(parse_infotext, text, budget)


def test_a_png_with_a_megabyte_of_settings_text_is_read_in_linear_time(budget, tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "p\n" + "a" * (MB - 100_000))  # Pillow reads up to 1 MB of text
    noise_image(16, 1).save(tmp_path / "big.png", pnginfo=info)
    assert_linear(lambda path: parse_infotext(png_parameters(path)), str(tmp_path / "big.png"), budget)


def test_what_diffbatch_writes_is_read_back_in_linear_time(budget):
    spec = GenerationSpec(prompt="a, b: c\n" * (MB // 8), negative_prompt='"x", y: z' * (MB // 9), seed=1,
                          num_inference_steps=2, width=64, height=64, guidance_scale=7.0)
    text = format_parameters(spec, "Euler a", 'model, "quoted": name')
    assert_linear(parse_infotext, text, budget)
    assert parse_infotext(text).fields["prompt"] == spec.prompt


PROMPTS = {
    "a tag opened before a run of blanks": "<lora:" + " " * MB + "x",
    "blanks": " " * MB,
    "blanks and an unclosed tag": " " * MB + "<lora:",
    "blanks of every kind": " \t\n\u3000" * (MB // 4) + "<lora:x",
    "many tags": "<lora:a:1> " * (MB // 11),
    "tag openings": "<lora:" * (MB // 6),
    "colons in a tag": "<lora:" + "a:" * (MB // 2),
    "a long name": "<lora:" + "a" * MB + ">",
    "a long weight": "<lora:a:" + "1" * MB + ">",
    "a long bad weight": "<lora:a:" + "x" * MB + ">",
    "angle brackets": "<" * MB,
    # A1111's prompt language (prompt_language.py), read at resolve time: its parse multiplied each piece once
    # per bracket around it, again at every bracket (quadratic in nesting), and re-split blanks from every blank
    "opening brackets": "(" * MB,
    "closing brackets": ")]" * (MB // 2),
    "nested words, each in brackets": "(a" * 99 + "a(b)" * (MB // 4),
    "crossing brackets": "[a(b]c)" * (MB // 7),
    "weights": "(a:1.1)" * (MB // 7),
    "an unclosed weight": "(a:" + "1" * MB,
    "escapes": "\\(" * (MB // 2),
    "breaks": " BREAK" * (MB // 6),
    "blanks before a word like BREAK": " \t\u3000" * (MB // 3) + "BREAKS",
}


@pytest.fixture(scope="module")
def resolver() -> Resolver:
    return Resolver.for_model(None)  # the embedded model's configuration; no weights


@pytest.mark.parametrize("text", PROMPTS.values(), ids=PROMPTS.keys())
def test_prompts_and_their_lora_tags_are_read_in_linear_time(budget, resolver, text):
    assert_linear(lambda prompt: resolver.resolve(GenerationSpec(prompt=prompt), seed=1), text, budget)
    assert_linear(lambda negative: resolver.resolve(GenerationSpec(prompt="p", negative_prompt=negative), seed=1),
                  text, budget)


@pytest.mark.parametrize("paths", [False, True], ids=["names", "names or paths"])
@pytest.mark.parametrize("name", ["a" * MB, "../" * (MB // 3), "é" * MB], ids=["letters", "parents", "non-ASCII"])
def test_lora_names_are_refused_in_linear_time(budget, tmp_path, paths, name):
    resolver = Resolver(Resolver.for_model(None).adapter, tmp_path, lora_paths=paths)
    assert_linear(resolver.lora_path, name, budget)
    assert_linear(lambda n: GenerationSpec(prompt="p", loras={n: 1.0}), name, budget)


SIZES = {"blanks": " " * MB, "digits": "1" * MB, "blanks after the x": "1x" + " " * MB + "a",
         "digits and blanks": "1 " * (MB // 2), "blanks before the x": "1" + " " * MB + "x1a", "x's": "xX" * (MB // 2),
         "blanks before a size": " " * MB + "1x1 b"}


@pytest.mark.parametrize("text", SIZES.values(), ids=SIZES.keys())
def test_size_strings_are_read_in_linear_time(budget, text):
    assert_linear(parse_size, text, budget)


PROMPT_FILES = {
    "one long line.txt": "a" * MB,
    "blank lines.txt": "\n" * MB,
    "comment lines.txt": "#\n" * (MB // 2),
    "lines of blanks.txt": " \n" * (MB // 2),
    "long lines.txt": ("a, b: c <lora:x " * 40 + "\n") * (MB // 640),
    "a long prompt.jsonl": '{"prompt": "' + "a" * MB + '"}',
    "an unclosed string.jsonl": '{"prompt": "' + "a" * MB,
    "escapes.jsonl": '{"prompt": "' + "\\u00e9" * (MB // 6) + '"}',
    "nested arrays.jsonl": "[" * MB,
    "nested objects.jsonl": '{"a": ' * (MB // 6),
    "blank lines.jsonl": "\n" * MB + '{"prompt": "p"}',
}


@pytest.mark.parametrize("name", PROMPT_FILES)
def test_prompt_files_are_read_in_linear_time(budget, tmp_path, name):
    path = tmp_path / name
    path.write_text(PROMPT_FILES[name], encoding="utf-8")
    assert_linear(lambda file: read_job(JobSource(prompts_file=file)), str(path), budget)


CAPTIONS = {"one long word": "a" * MB, "combining marks": "\u0301" * MB, "words": "a " * (MB // 2),
            "wide letters": "W" * MB, "blanks then a word": " " * MB + "a"}


@pytest.mark.parametrize("caption", CAPTIONS.values(), ids=CAPTIONS.keys())
def test_gallery_captions_are_drawn_in_linear_time(budget, caption):
    assert_linear(lambda text: contact_sheet([None], [text]), caption, budget)
    record = {"file": "00000-1.png", "prompt": caption, "negative_prompt": caption, "seed": 1, "index": 0}
    assert_linear(lambda _: render_html([record]), caption, budget)


def test_a_quadratic_routine_fails_these_tests(budget):
    """The budget and the timer catch what they are for: an old-style pattern is stopped, not waited for."""
    quadratic = re.compile(r"\s*(\w[\w \-/]+):")
    with pytest.raises(pytest.fail.Exception, match="budget"):
        assert_linear(quadratic.findall, "a" * MB, min(budget, 3.0))
