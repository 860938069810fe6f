"""Authoring inputs (dynamic templates, wildcards, sweeps, numbers typed anywhere) cannot take the machine: a
template that expands too slowly is stopped and refused, a Prompt S/R is measured before it is built, numbers are
ASCII digits of a bounded length, recursion is refused by name, wildcard files are read as prompts files are. Every
refusal is one line with exit 2, in the CLI (``--dry-run``: no model) as in the library."""

from __future__ import annotations

import codecs
import json

import pytest

from diffbatch.caching import canonical_cache, parse_cache
from diffbatch.cli import main
from diffbatch.io import expansion
from diffbatch.io.dynamic import Dynamic
from diffbatch.io.expansion import Template, expand_all
from diffbatch.numbers import loads_json, parse_int, parse_number

NESTED = "${a0=xxxx}" + "".join(f"${{a{i}=${{a{i - 1}}}${{a{i - 1}}}}}" for i in range(1, 9)) + "${a8}"


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def refused(capsys, *argv, says: str) -> None:
    code, err = run(capsys, *argv)
    assert code == 2 and says in err and err.count("\n") == 1, err


def test_a_template_that_expands_too_slowly_is_stopped_and_the_worker_serves_the_next(capsys, monkeypatch):
    monkeypatch.setattr(expansion, "BUDGET_S", 0.5)  # the nested template took the library 16 s unbounded
    refused(capsys, "generate", "--prompt", NESTED, "--dynamic", "--dry-run", "--out", "unused",
            says="took longer than 0.5 s to expand")
    assert expand_all([Template("{red|blue} circle", 0, "t")], Dynamic(), None, 1000) == [["red circle",
                                                                                          "blue circle"]]


@pytest.mark.parametrize(("template", "says"), [
    ("{" * 400 + "a" + "}" * 400, "nests too deeply"),
    ("${a=${a}}${a}", "refers to itself"),
])
def test_recursion_in_a_template_is_refused_by_name(capsys, template, says):
    refused(capsys, "generate", "--prompt", template, "--dynamic", "--dry-run", "--out", "unused", says=says)


def test_a_wildcard_file_that_names_itself_is_refused(capsys, tmp_path):
    (tmp_path / "loop.txt").write_text("a __loop__\n")
    refused(capsys, "generate", "--prompt", "__loop__", "--dynamic", "--wildcards", tmp_path, "--dry-run", "--out",
            "unused", says="refers to itself")


def test_wildcard_files_are_read_as_prompts_files(capsys, tmp_path):
    (tmp_path / "bom.txt").write_bytes(codecs.BOM_UTF8 + "café\nthé\n".encode())
    (tmp_path / "wide.txt").write_bytes(codecs.BOM_UTF16_LE + "crème\n".encode("utf-16-le"))
    (tmp_path / "latin.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    found = expand_all([Template("__bom__ __wide__", 0, "t")], Dynamic(None, str(tmp_path)), None, 1000)
    assert found == [["café crème", "thé crème"]]  # the mark dropped, UTF-16 read
    refused(capsys, "generate", "--prompt", "__latin__", "--dynamic", "--wildcards", tmp_path, "--dry-run",
            "--out", "unused", says=f"wildcard file {tmp_path / 'latin.txt'}: not UTF-8 text")
    refused(capsys, "generate", "--prompt", "__empty__", "--dynamic", "--wildcards", tmp_path, "--dry-run",
            "--out", "unused", says="empty.txt holds no values")


def test_a_symlink_loop_in_the_wildcards_folder_is_walked_once(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "colour.txt").write_text("red\n")
    (tmp_path / "sub" / "again").symlink_to(tmp_path, target_is_directory=True)
    found = expand_all([Template("__sub/colour__", 0, "t")], Dynamic(None, str(tmp_path)), None, 1000)
    assert found == [["red"]]


def test_a_prompt_sr_is_measured_before_it_is_built(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join("a" * 400 for _ in range(10)))  # each S/R cell would be 800,000 characters
    refused(capsys, "generate", prompts, "--sweep", "prompt=a," + "b" * 2000, "--dry-run", "--out", "unused",
            says="Prompt S/R would make a prompt of 800,000 characters, over the limit of 100,000")


def test_a_dynamic_prompt_longer_than_the_limit_is_refused(capsys):
    refused(capsys, "generate", "--prompt", "{" + "x" * 100_001 + "|y}", "--dynamic", "--dry-run", "--out", "unused",
            says="makes a prompt of 100,001 characters")


@pytest.mark.parametrize(("flags", "says"), [
    (["--sweep", "seed=1-" + "1" * 400], "must be an integer of the digits 0-9, at most 40"),  # 40: no range
    (["--sweep", "guidance=1-" + "9" * 400 + " (+1)"], "must be a number of the digits 0-9"),
    (["--sweep", "steps=1-" + "9" * 40], "at most 1000"),
    (["--sweep", "steps=٣"], "must be an integer of the digits 0-9"),
    (["--dynamic", "random:²"], "random:N with N from 1"),
    (["--dynamic", "random:" + "9" * 5000], "random:N with N from 1"),
    (["--batch-size", "٣"], "must be auto or an integer"),
    (["--cache", "deepcache:٣"], "is invalid: must be off, auto"),
    (["--cache", "deepcache:３"], "is invalid: must be off, auto"),
    (["--cache", "deepcache: 3"], "is invalid: must be off, auto"),
    (["--cache", "deepcache:0_3"], "is invalid: must be off, auto"),
])
def test_numbers_are_ascii_digits_of_a_bounded_length(capsys, flags, says):
    code, err = run(capsys, "generate", "--prompt", "x", "--dry-run", "--out", "unused", *flags)
    assert code == 2 and says in err and err.count("\n") == 1 and len(err) < 600, err


def test_a_cache_value_is_recorded_in_one_form():
    assert canonical_cache("deepcache:05") == "deepcache:5" and canonical_cache("fbcache:0.10") == "fbcache:0.1"
    assert canonical_cache("off") == "off" and parse_cache("deepcache:3").value == 3


def test_a_jsonl_line_with_a_5000_digit_seed_is_a_one_line_error(capsys, tmp_path):
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "x"})[:-1] + ', "seed": ' + "7" * 5000 + "}\n")
    refused(capsys, "generate", job, "--dry-run", "--out", "unused", says="job.jsonl:1: an integer of 5000 digits")


def test_the_number_parsers_refuse_what_int_and_float_would_take():
    for text in ("٣", "３", " 3", "0_3", "1e5", "inf", "nan", "+", ""):
        with pytest.raises(ValueError):
            parse_number(text, "x")
        with pytest.raises(ValueError):
            parse_int(text, "x")
    assert parse_number("-.5", "x") == -0.5 and parse_int("+12", "x") == 12
    assert loads_json('{"seed": 123}') == {"seed": 123}
    with pytest.raises(ValueError, match="41 digits"):
        loads_json('{"seed": ' + "1" * 41 + "}")


def test_a_png_value_a_field_refuses_is_refused_naming_its_key(capsys, tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 3, Seed: 1, Cache: deepcache:٣")
    Image.new("RGB", (8, 8)).save(tmp_path / "bad.png", pnginfo=info)
    refused(capsys, "generate", "--from", tmp_path / "bad.png", "--dry-run", "--out", "unused",
            says="not honoured: Cache: deepcache:٣ (must be off, auto")


def test_an_error_about_a_from_png_prompt_names_the_png(capsys, tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "{unclosed\nSteps: 3, Seed: 1")
    Image.new("RGB", (8, 8)).save(tmp_path / "made.png", pnginfo=info)
    code, err = run(capsys, "generate", "--from", tmp_path / "made.png", "--dynamic", "--dry-run", "--out", "unused")
    assert code == 2 and f"--from {tmp_path / 'made.png'}: malformed dynamic prompt" in err, err


def test_a_cache_value_is_recorded_exactly_and_without_an_exponent():
    assert canonical_cache("fbcache:0.00005") == "fbcache:0.00005"
    assert canonical_cache("fbcache:0.123456789") == "fbcache:0.123456789"
    assert parse_cache(canonical_cache("fbcache:0.00005")).value == 0.00005


def test_a_link_to_a_wildcard_folder_elsewhere_leaves_both_names_working(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "x.txt").write_text("red\n")
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    found = expand_all([Template("__real/x__ __alias/x__", 0, "t")], Dynamic(None, str(tmp_path)), None, 1000)
    assert found == [["red red"]]


def test_the_prompts_of_a_job_are_budgeted_in_the_worker():
    with pytest.raises(Exception, match="over this job's budget of 1,000"):
        expand_all([Template("{a|b}" * 12 + "x" * 100, 0, "t")], Dynamic(), None, 1000, max_total_chars=1000)
