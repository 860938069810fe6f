"""Init images and prompts files as users hand them over: every mode, bit depth and text encoding is read as
diffusers reads it (``diffusers.utils.load_image`` is the oracle for images) or refused in one line."""

import codecs
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from diffusers.utils import load_image
from PIL import Image

from diffbatch.cli import main

WIDTH, HEIGHT = 16, 24  # not square: a rotation shows in the size


def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def manifest(out: Path) -> list[dict]:
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda r: r["index"])


def rgb(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def oriented(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation
    return exif.tobytes()


def png16(path: Path, channels: int, color_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow writes 16 bits only for grayscale)."""
    samples = np.random.default_rng(3).integers(0, 65536, (HEIGHT, WIDTH * channels)).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in samples)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", WIDTH, HEIGHT, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def write_faithful_inputs(folder: Path) -> None:
    """Files diffusers' load_image reads without losing what they show."""
    folder.mkdir()
    rgb(1).save(folder / "a-exif-rotated.jpg", exif=oriented(6), quality=95)
    rgb(2).save(folder / "b-exif-mirrored.png", exif=oriented(5))
    rgb(3).convert("CMYK").save(folder / "c-cmyk.jpg", quality=95)
    opaque = rgb(4)
    opaque.putalpha(255)
    opaque.save(folder / "d-opaque-rgba.png")
    rgb(5).convert("P").save(folder / "e-palette.png")
    rgb(6).convert("L").save(folder / "f-gray.png")
    png16(folder / "g-rgb16.png", 3, 2)


def test_every_faithful_mode_is_read_as_diffusers_load_image_reads_it(
        capsys: pytest.CaptureFixture, tiny_sd_path: Path, tmp_path: Path) -> None:
    """The job made from the files equals the job made from diffusers' load_image of each, saved as RGB."""
    files, oracle = tmp_path / "files", tmp_path / "oracle"
    write_faithful_inputs(files)
    oracle.mkdir()
    for path in sorted(files.iterdir()):
        load_image(str(path)).save(oracle / f"{path.stem}.png")
    common = ["--prompt", "a shape", "--strength", "0.6", "--model", tiny_sd_path, "--steps", "2", "--no-gallery"]
    assert run(capsys, "generate", "--image", files, "--out", tmp_path / "a", *common)[0] == 0
    assert run(capsys, "generate", "--image", oracle, "--out", tmp_path / "b", *common)[0] == 0
    got, want = manifest(tmp_path / "a"), manifest(tmp_path / "b")
    assert len(got) == len(list(files.iterdir()))
    assert [(r["width"], r["height"]) for r in got] == [(r["width"], r["height"]) for r in want]
    assert (got[0]["width"], got[0]["height"]) == (HEIGHT, WIDTH)  # the EXIF rotation turned it
    for a, b in zip(got, want, strict=True):
        with Image.open(tmp_path / "a" / a["file"]) as x, Image.open(tmp_path / "b" / b["file"]) as y:
            assert np.array_equal(np.asarray(x), np.asarray(y)), a["image"]


def transparent(mode: str) -> Image.Image:
    image = rgb(7).convert("RGBA")
    image.putpixel((3, 3), (10, 20, 30, 0))
    return image.convert(mode) if mode != "RGBA" else image


def palette_with_transparency(path: Path) -> None:
    image = rgb(8).convert("P")
    image.save(path, transparency=image.getpixel((0, 0)))  # an index the picture uses


# name -> (writes the file, words the one-line error must hold)
REFUSED = {
    "16-bit grayscale PNG": (lambda p: Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(p), "16-bit"),
    "32-bit float TIFF": (lambda p: Image.fromarray(np.zeros((8, 8), np.float32)).save(p.with_suffix(".tif")),
                          "32-bit float"),
    "RGBA with a transparent pixel": (lambda p: transparent("RGBA").save(p), "transparent"),
    "LA with a transparent pixel": (lambda p: transparent("LA").save(p), "transparent"),
    "palette with a transparent index": (palette_with_transparency, "transparent"),
    "16-bit RGBA PNG with transparency": (lambda p: png16(p, 4, 6), "transparent"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_an_init_image_that_rgb_would_change_is_refused_in_one_line(
        case: str, capsys: pytest.CaptureFixture, tiny_sd_path: Path, tmp_path: Path) -> None:
    write, words = REFUSED[case]
    write(tmp_path / "init.png")
    (init,) = tmp_path.iterdir()
    out = tmp_path / "out"
    code, err = run(capsys, "generate", "--prompt", "a", "--image", init, "--out", out, "--model", tiny_sd_path,
                    "--steps", "2")
    assert code == 2 and err.count("\n") == 1 and err.startswith("diffbatch: error: "), err
    assert init.name in err and words in err
    assert not out.exists()


ENCODINGS = {
    "UTF-8 with a byte-order mark": ("prompts.txt", "utf-8-sig"),
    "UTF-16 (little-endian mark)": ("prompts.txt", "utf-16-le"),
    "UTF-16 big-endian, jsonl": ("prompts.jsonl", "utf-16-be"),
    "UTF-32": ("prompts.txt", "utf-32"),
}
MARKS = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE}


@pytest.mark.parametrize("case", ENCODINGS)
def test_a_prompts_file_with_a_byte_order_mark_is_read_as_its_text(
        case: str, capsys: pytest.CaptureFixture, tiny_sd_path: Path, tmp_path: Path) -> None:
    name, encoding = ENCODINGS[case]
    prompts = ["café ✓", "naïve"]
    text = ("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\r\n" for p in prompts) if name.endswith("jsonl")
            else "\r\n".join(prompts) + "\r\n")
    path = tmp_path / name
    path.write_bytes(MARKS.get(encoding, b"") + text.encode(encoding))
    out = tmp_path / "out"
    code, err = run(capsys, "generate", path, "--out", out, "--model", tiny_sd_path, "--steps", "2", "--size",
                    "16x16", "--no-gallery")
    assert code == 0, err
    assert [r["prompt"] for r in manifest(out)] == prompts


@pytest.mark.parametrize("data, words", [
    ("café\n".encode("latin-1"), "not UTF-8 text"),
    ("café\n".encode("utf-16-le"), "without a byte-order mark"),
])
def test_stdin_in_another_encoding_is_one_line_exit_2(
        data: bytes, words: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        tiny_sd_path: Path, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    code, err = run(capsys, "generate", "-", "--out", tmp_path / "out", "--model", tiny_sd_path, "--steps", "2")
    assert code == 2 and err.count("\n") == 1 and "<stdin>" in err and words in err
    assert not (tmp_path / "out").exists()
