"""``--from`` PNGs (and JPEGs) as AUTOMATIC1111 writes them, hand-made with its exact keys: each one either makes
its image or is refused in one line naming the key; none is changed silently (io/a1111.py)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from diffbatch.cli import main
from diffbatch.io.infotext import parse_infotext, png_parameters
from helpers import noise_image

PROMPT = "a red circle\nNegative prompt: blurry\n"
# What A1111 1.10 writes for a plain txt2img (its defaults: no RNG key = GPU noise)
BASE = ("Steps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 11, Size: 32x32, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def png(path: Path, settings: str, prompt: str = PROMPT) -> Path:
    info = PngInfo()
    info.add_text("parameters", prompt + settings)
    noise_image(16, 2).save(path, pnginfo=info)
    return path


def made(capsys, tmp_path: Path, model: Path, source: Path, *extra: str) -> tuple[int, str]:
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
    return run(capsys, "generate", "--from", source, "--out", out, "--model", model, "--no-gallery", *extra)


def test_a_plain_a1111_png_is_made_and_says_once_that_a1111s_image_differs(capsys, tmp_path, tiny_sd_path):
    code, err = made(capsys, tmp_path, tiny_sd_path, png(tmp_path / "a.png", BASE + ", RNG: CPU, ENSD: 31337"))
    assert code == 0, err
    assert err.count("made by AUTOMATIC1111 v1.10.1") == 1 and "will differ from A1111's" in err


# Keys A1111 (and its common extensions) write that change pixels and diffbatch does not honour: each refused by
# name, and made with --ignore KEY
REFUSED = {
    "Tiling: True": "Tiling", "Face restoration: CodeFormer": "Face restoration",
    "Token merging ratio: 0.5": "Token merging ratio", "Refiner: sd_xl_refiner_1.0": "Refiner",
    "Seed resize from: 64x64": "Seed resize from", "Eta: 0.67": "Eta",
    "NGMS: 0.2": "NGMS", "VAE hash: 63aeecb90f": "VAE hash", "Pad conds: True": "Pad conds",
    "Hires upscale: 2, Hires upscaler: 4x-UltraSharp, Denoising strength: 0.5": "Hires upscaler",
    "Hires upscale: 2, Hires resize: 64x64, Denoising strength: 0.5": "Hires resize",
    "Hires upscale: 2, Hires CFG Scale: 5, Denoising strength: 0.5": "Hires CFG Scale",
    "Schedule type: Exponential": "Schedule type",
    "ADetailer model: face_yolov8n.pt": "ADetailer model",  # an extension's: unknown, so possibly pixels
}


@pytest.mark.parametrize("extra", REFUSED, ids=REFUSED.values())
def test_a_key_that_changes_pixels_is_refused_by_name_or_ignored_on_request(capsys, tmp_path, tiny_sd_path, extra):
    key = REFUSED[extra]
    settings = BASE.replace("Schedule type: Automatic", extra) if key == "Schedule type" else f"{BASE}, {extra}"
    source = png(tmp_path / "a.png", settings)
    code, err = made(capsys, tmp_path, tiny_sd_path, source)
    assert code == 2 and f"not honoured: {key}:" in err and "--ignore" in err, err
    assert len(err.strip().splitlines()) == 1
    code, err = made(capsys, tmp_path, tiny_sd_path, source, "--ignore", key)
    assert code == 0, err
    if key == "Hires upscaler":  # or the flag that sets it
        assert made(capsys, tmp_path, tiny_sd_path, source, "--hires-upscaler", "lanczos")[0] == 0


def test_an_embedding_the_png_names_and_this_machine_lacks_is_refused_by_name(capsys, tmp_path, tiny_sd_path):
    source = png(tmp_path / "ti.png", BASE + ', TI hashes: "bad-hands: 6f5a2c3d4e5f"')
    code, err = made(capsys, tmp_path, tiny_sd_path, source)
    assert code == 2 and "made with the embedding bad-hands of hash 6f5a2c3d4e5f" in err
    assert made(capsys, tmp_path, tiny_sd_path, source, "--ignore", "TI hashes")[0] == 0


def test_settings_diffbatch_honours_are_read(capsys):
    found = parse_infotext(PROMPT + BASE.replace("Euler a, Schedule type: Automatic", "DPM++ 2M, Schedule type: Karras")
                           + ", Clip skip: 2, Emphasis: No norm")
    assert found.fields["scheduler"] == "dpm++_2m" and found.fields["schedule"] == "karras"
    assert found.fields["clip_skip"] == 2
    ddim = parse_infotext(PROMPT + BASE.replace("Euler a", "DDIM") + ", Eta DDIM: 0.3")
    assert ddim.fields["scheduler"] == "ddim" and ddim.fields["eta"] == 0.3 and not ddim.refused
    old = parse_infotext(PROMPT + BASE.replace("Euler a, Schedule type: Automatic", "DPM2 a Karras"))  # A1111 < 1.9
    assert (old.fields["scheduler"], old.fields["schedule"]) == ("dpm2_a", "karras")
    assert found.fields["emphasis"] == "no_norm" and not found.refused
    assert found.a1111 == "v1.10.1"
    assert "schedule" not in parse_infotext(PROMPT + BASE).fields  # Schedule type: Automatic, the sampler's own


def test_an_a1111_img2img_png_asks_for_its_init_image_and_checks_it(capsys, tmp_path, tiny_sd_path):
    init = tmp_path / "init.png"
    picture = noise_image(32, 9)
    picture.save(init)
    digest = hashlib.md5(picture.tobytes()).hexdigest()  # A1111's Init image hash
    source = png(tmp_path / "i2i.png", BASE + f", Denoising strength: 0.6, Init image hash: {digest}")
    code, err = made(capsys, tmp_path, tiny_sd_path, source)
    assert code == 2 and "give it with --image FILE" in err
    code, err = made(capsys, tmp_path, tiny_sd_path, source, "--image", init)
    assert code == 0, err
    other = tmp_path / "other.png"
    noise_image(32, 10).save(other)
    code, err = made(capsys, tmp_path, tiny_sd_path, source, "--image", other)
    assert code == 2 and "is not the init image it was made from" in err
    assert made(capsys, tmp_path, tiny_sd_path, source, "--image", other, "--ignore", "Init image hash")[0] == 0


@pytest.mark.parametrize("form", ["JPEG", "WEBP"])
def test_a1111_jpegs_and_webps_carry_their_settings_in_exif(tmp_path, form):
    exif = Image.Exif()
    text = PROMPT + BASE
    exif[0x8769] = {0x9286: b"UNICODE\x00" + text.encode("utf-16-be")}  # what piexif's UserComment.dump writes
    path = tmp_path / f"a.{form.lower()}"
    noise_image(16, 1).save(path, format=form, exif=exif)
    assert png_parameters(path) == text
    assert parse_infotext(png_parameters(path)).fields["seed"] == 11
    with pytest.raises(ValueError, match="EXIF UserComment"):
        buffer = io.BytesIO()
        noise_image(16, 1).save(buffer, format=form)
        png_parameters(io.BytesIO(buffer.getvalue()))


def test_a_diffbatch_png_of_another_model_or_lora_file_is_refused_unless_ignored(capsys, tmp_path):
    first = tmp_path / "first"
    code, err = run(capsys, "generate", "--prompt", "a red circle", "--out", first, "--steps", "2", "--no-gallery")
    assert code == 0, err
    made_png = next(first.glob("0*.png"))
    text = png_parameters(made_png)
    forged = png(tmp_path / "forged.png", text.replace("Model hash: ", "Model hash: 0"), prompt="")
    out = tmp_path / "again"
    code, err = run(capsys, "generate", "--from", forged, "--out", out, "--no-gallery")
    assert code == 2 and "made with model hash 0" in err and "--ignore 'Model hash'" in err
    assert not out.exists()  # nothing written
    code, err = run(capsys, "generate", "--from", forged, "--out", out, "--no-gallery", "--ignore", "Model hash")
    assert code == 0, err


def test_an_a1111_sdxl_pngs_clip_skip_is_not_applied_as_a1111_applies_none(capsys, tmp_path):
    from tiny_sdxl import save_tiny_sdxl

    model = save_tiny_sdxl(tmp_path / "sdxl")
    source = png(tmp_path / "xl.png", BASE + ", Clip skip: 2")
    code, err = made(capsys, tmp_path, model, source)
    assert code == 0, err
    assert "Clip skip: 2 is not applied: AUTOMATIC1111 applies no clip skip on SDXL" in err
    out = sorted(p for p in tmp_path.iterdir() if p.name.startswith("out-"))[-1]
    assert "Clip skip" not in png_parameters(next(out.glob("0*.png")))
