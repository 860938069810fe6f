"""The gallery (index.html, grid.png) of an output folder, checked in a real headless Chromium."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from diffbatch.cli import main
from diffbatch.io.gallery import CELL, GRID_COLUMNS, write_gallery
from diffbatch.io.writer import OutputWriter
from diffbatch.spec import GenerationSpec
from helpers import made

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
PROMPTS = ["a red circle", "a blue circle", "a green square", 'a <b>bold</b> & "quoted" star', "a red square",
           "a tiny triangle"]


def write_folder(out: Path) -> None:
    """A job's folder as the writer makes it: six images, one img2img, two sizes."""
    out.mkdir()
    with OutputWriter(out, "tiny-sd") as writer:
        for k, prompt in enumerate(PROMPTS):
            size = (48, 32) if k == 2 else (32, 32)
            spec = GenerationSpec(prompt=prompt, seed=100 + k, num_inference_steps=20, guidance_scale=7.5,
                                  width=size[0], height=size[1], guidance_rescale=0.0,
                                  negative_prompt="blurry" if k == 1 else "",
                                  image="in.png" if k == 5 else None, strength=0.6 if k == 5 else None)
            writer.write(k, made(spec, Image.new("RGB", size, (40 * k, 200 - 30 * k, 90))))


@pytest.fixture
def gallery(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    write_folder(out)
    write_gallery(out)
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (scripts/install.sh installs it with apt-get when run as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def visible_prompts(page) -> list[str]:  # noqa: ANN001 - a playwright Page
    return page.eval_on_selector_all(".card:not([hidden]) .prompt", "els => els.map(e => e.textContent)")


def test_every_image_loads_and_the_filter_hides_cards_that_do_not_match(gallery: Path, browser) -> None:  # noqa: ANN001
    page = browser.new_page(viewport={"width": 1600, "height": 1400})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto((gallery / "index.html").as_uri())
    page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete)", timeout=10_000)
    widths = page.eval_on_selector_all(".card img", "imgs => imgs.map(i => i.naturalWidth)")
    assert widths == [48 if k == 2 else 32 for k in range(len(PROMPTS))]
    assert visible_prompts(page) == PROMPTS  # the markup-like prompt shows as text
    assert page.inner_text("#count") == "6 of 6"

    page.fill("#filter", "circle")
    assert visible_prompts(page) == ["a red circle", "a blue circle"]
    assert page.inner_text("#count") == "2 of 6"
    page.fill("#filter", "RED square")  # every word, any case
    assert visible_prompts(page) == ["a red square"]
    page.fill("#filter", "seed 103")  # parameters are searchable too
    assert visible_prompts(page) == [PROMPTS[3]]
    page.fill("#filter", "strength 0.6")
    assert visible_prompts(page) == ["a tiny triangle"]
    page.fill("#filter", "no such thing")
    assert visible_prompts(page) == [] and page.inner_text("#count") == "0 of 6"
    page.fill("#filter", "")
    assert len(visible_prompts(page)) == 6
    assert errors == []


def test_clicking_a_card_shows_the_full_image_and_escape_closes_it(gallery: Path, browser) -> None:  # noqa: ANN001
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto((gallery / "index.html").as_uri())
    assert page.is_hidden("#viewer")
    page.click(".card:nth-child(3) img")
    page.wait_for_function("document.querySelector('#viewer img').complete")
    assert page.is_visible("#viewer")
    assert page.get_attribute("#viewer img", "src") == "00002-102.png"
    assert page.eval_on_selector("#viewer img", "i => i.naturalWidth") == 48
    assert "a green square" in page.inner_text("#viewer p") and "seed 102" in page.inner_text("#viewer p")
    page.keyboard.press("Escape")
    assert page.is_hidden("#viewer")


def test_cards_show_prompt_negative_prompt_seed_and_parameters(gallery: Path) -> None:
    html = (gallery / "index.html").read_text(encoding="utf-8")
    assert "seed 101 · 20 steps · CFG 7.5 · 32x32 · default sampler · tiny-sd" in html
    assert "negative: blurry" in html
    assert "strength 0.6 · init in.png" in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html


def test_grid_is_a_contact_sheet_of_every_image(gallery: Path) -> None:
    with Image.open(gallery / "grid.png") as grid:
        columns = min(GRID_COLUMNS, len(PROMPTS))
        assert grid.width == columns * (CELL + 8) and grid.height > CELL
        assert grid.getpixel((4 + CELL // 2, 4 + CELL // 2)) == (0, 200, 90)  # the first image, scaled up


def test_gallery_command_writes_both_files_and_refuses_a_folder_without_manifest(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    write_folder(out)
    assert main(["gallery", str(out)]) == 0
    assert (out / "index.html").is_file() and (out / "grid.png").is_file()
    assert main(["gallery", str(tmp_path)]) == 2
    assert "no manifest.jsonl" in capsys.readouterr().err
    (out / "00001-101.png").write_bytes(b"\x89PNG cut")
    assert main(["gallery", str(out)]) == 0  # a damaged image leaves an empty cell, not a crash
