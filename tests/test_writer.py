"""Outputs: PNG names, A1111 ``parameters`` chunk, atomic writes, manifest lines, progress bar."""

import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from diffbatch.io.progress import Progress
from diffbatch.io.writer import MANIFEST, OutputWriter, format_parameters, png_name
from diffbatch.result import Result
from diffbatch.spec import GenerationSpec
from helpers import made

TXT2IMG = GenerationSpec(prompt="a red circle", seed=7, num_inference_steps=20, guidance_scale=7.0,
                         height=64, width=96, scheduler="euler_a")


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / MANIFEST).read_text(encoding="utf-8").splitlines()]


def test_png_name_is_index_then_seed() -> None:
    assert png_name(3, 1234) == "00003-1234.png"
    assert png_name(123456, 0) == "123456-0.png"


def test_parameters_follow_a1111_without_negative_prompt_line_when_empty() -> None:
    assert format_parameters(TXT2IMG, "Euler a", "tiny-sd") == (
        "a red circle\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 7, Size: 96x64, Model: tiny-sd")


def test_parameters_of_img2img_have_negative_prompt_and_denoising_strength() -> None:
    spec = GenerationSpec(prompt="a cat", negative_prompt="blurry, dark", seed=1, num_inference_steps=10,
                          guidance_scale=7.5, height=32, width=32, image="in.png", strength=0.5)
    assert format_parameters(spec, "DPM++ 2M Karras", "sd") == (
        "a cat\n"
        "Negative prompt: blurry, dark\n"
        "Steps: 10, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 32x32, Model: sd, "
        "Denoising strength: 0.5, Init image: in.png")


def test_parameter_values_with_commas_or_colons_are_quoted_as_a1111_does() -> None:
    text = format_parameters(TXT2IMG, "Euler a", "C:/models/sd, v2")
    assert text.endswith('Model: "C:/models/sd, v2"')


def test_write_puts_png_with_parameters_chunk_then_manifest_line(tmp_path: Path) -> None:
    image = Image.new("RGB", (96, 64), (255, 0, 0))
    with OutputWriter(tmp_path, "tiny-sd") as writer:
        path = writer.write(0, made(TXT2IMG, image, "Euler a", seconds=1.23456))
    assert path == tmp_path / "00000-7.png"
    with Image.open(path) as png:
        assert png.text["parameters"] == format_parameters(TXT2IMG, "Euler a", "tiny-sd")
        assert png.getpixel((0, 0)) == (255, 0, 0)
    assert manifest(tmp_path) == [{"index": 0, "file": "00000-7.png", **TXT2IMG.to_record(), "model": "tiny-sd",
                                   "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "seconds": 1.2346}]


def test_manifest_gets_one_line_per_image_in_finishing_order_and_is_appended_to(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 8))
    with OutputWriter(tmp_path, "m") as writer:
        for index in (2, 0):
            writer.write(index, made(GenerationSpec(prompt="é ✓", seed=index, height=8, width=8), image))
    with OutputWriter(tmp_path, "m") as writer:
        writer.write(1, made(GenerationSpec(prompt="x", seed=1, height=8, width=8), image))
    assert [(r["index"], r["file"]) for r in manifest(tmp_path)] == [
        (2, "00002-2.png"), (0, "00000-0.png"), (1, "00001-1.png")]
    with Image.open(tmp_path / "00000-0.png") as png:
        assert png.text["parameters"].startswith("é ✓\n")  # non-Latin-1 text survives (as iTXt)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000-0.png", "00001-1.png", "00002-2.png", MANIFEST]  # no temporary files left


class BrokenImage:
    def save(self, file: io.BufferedWriter, **kwargs: object) -> None:
        file.write(b"\x89PNG half")
        raise OSError("disk full")


def test_failed_write_leaves_no_file_and_no_manifest_line(tmp_path: Path) -> None:
    with OutputWriter(tmp_path, "m") as writer, pytest.raises(OSError, match="disk full"):
        writer.write(0, Result(0, TXT2IMG, BrokenImage(), None, 0.1, "DDIM", "m"))  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_progress_shows_images_done_rate_and_eta() -> None:
    stream = io.StringIO()
    with Progress(3, stream=stream) as progress:
        progress.update()
        progress.update(2)
    assert progress.done == 3
    text = stream.getvalue()
    assert "3/3" in text and "img/s" in text and "<00:00" in text
