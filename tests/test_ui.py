"""The browser UI (GET /ui) in a real headless Chromium: generate 4 images, refine image 3 with an extended
prompt (same seed; pixels equal ``diffbatch generate`` of that spec), the history survives a reload and a
server restart, a wrong key shows an error and no image. With DIFFBATCH_DOCS=1 the screenshot goes to
docs/ui.png (linked from the README); otherwise to the test's temporary folder."""

from __future__ import annotations

from extras import need

need("fastapi", "httpx", "uvicorn")  # before the imports that need them: a clear skip without the extra

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from diffbatch import Engine
from diffbatch.cli import main
from diffbatch.server import ServerConfig, create_app
from server_helpers import LiveServer
from test_gallery import browser  # noqa: F401 - the shared headless Chromium fixture

KEY = "ui-key"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def ui_server(model: Path, data_dir: Path) -> LiveServer:
    config = ServerConfig(data_dir=data_dir, api_key=KEY)
    return LiveServer(create_app(config, Engine.from_pretrained(model, device="cpu", dtype="float32")))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def server(tiny_sd_path, data_dir) -> Iterator[LiveServer]:
    with ui_server(tiny_sd_path, data_dir) as live:
        yield live


def open_ui(browser, url: str, key: str):  # noqa: ANN001, F811 - playwright objects
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{url}/ui")
    page.wait_for_selector("#key-dialog[open]")  # the key is asked for once
    page.fill("#key-input", key)
    page.click("#key-save")
    return page


def cards(page) -> list[dict]:  # noqa: ANN001
    return page.eval_on_selector_all(".card", "cs => cs.map(c => ({seed: Number(c.dataset.seed), url: c.dataset.url,"
                                               " meta: c.querySelector('.meta').textContent}))")


def test_generate_refine_history_and_a_wrong_key(browser, server, tiny_sd_path, data_dir, tmp_path):  # noqa: F811
    page = open_ui(browser, server.url, KEY)
    page.fill("#prompt", "a red circle")
    page.fill("#n", "4")
    page.fill("#seed", "10")
    page.fill("#num_inference_steps", "3")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.card').length === 4", timeout=60_000)
    assert sorted(c["seed"] for c in cards(page)) == [10, 11, 12, 13]

    third = page.locator(".card[data-seed='12']")
    third.locator("button[data-action='refine']").click()
    third.locator(".edit-prompt").fill("a red circle, highly detailed")
    third.locator(".edit-go").click()
    page.wait_for_function("document.querySelectorAll('.card').length === 5", timeout=60_000)
    refined = cards(page)[0]  # newest first
    assert refined["seed"] == 12 and "highly detailed" in refined["meta"]
    page.screenshot(path=str((DOCS if os.environ.get("DIFFBATCH_DOCS") else tmp_path) / "ui.png"))

    png = httpx.get(refined["url"], headers={"Authorization": f"Bearer {KEY}"}).content
    out = tmp_path / "cli"
    assert main(["generate", "--prompt", "a red circle, highly detailed", "--seed", "12", "--steps", "3",
                 "--model", str(tiny_sd_path), "--out", str(out), "--dtype", "float32", "--no-gallery"]) == 0
    expected = np.asarray(Image.open(out / "00000-12.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), expected)

    page.reload()  # the key stays in the tab: the history comes back without asking
    page.wait_for_function("document.querySelectorAll('.card').length === 5", timeout=30_000)
    page.close()

    server.stop()  # and it survives a restart (the SQLite store)
    again = ui_server(tiny_sd_path, data_dir)
    try:
        page = open_ui(browser, again.url, KEY)
        page.wait_for_function("document.querySelectorAll('.card').length === 5", timeout=30_000)
        page.close()
        wrong = open_ui(browser, again.url, "not-the-key")
        wrong.wait_for_function("document.getElementById('error').textContent.includes('wrong API key')")
        assert wrong.locator(".card").count() == 0
        wrong.close()
    finally:
        again.stop()


def test_the_cache_select_sends_the_field_only_when_on(browser, server):  # noqa: F811
    page = open_ui(browser, server.url, KEY)
    page.fill("#prompt", "a red circle")
    page.fill("#n", "1")
    page.fill("#num_inference_steps", "2")
    assert page.eval_on_selector_all("#cache option", "os => os.map(o => o.value)") == [
        "off", "auto", "deepcache:2", "deepcache:3", "deepcache:5", "fbcache:0.05", "fbcache:0.1"]
    page.select_option("#cache", "deepcache:3")
    with page.expect_request("**/v1/images/generations") as sent:
        page.click("#generate")
    assert json.loads(sent.value.post_data)["cache"] == "deepcache:3"
    page.select_option("#cache", "off")
    with page.expect_request("**/v1/images/generations") as sent:
        page.click("#generate")
    assert "cache" not in json.loads(sent.value.post_data)  # as before the field: older servers take it
    page.close()


def test_a_sweep_submits_one_batch_job_and_shows_its_grid(browser, server, tiny_sd_path, tmp_path):  # noqa: F811
    page = open_ui(browser, server.url, KEY)
    page.fill("#prompt", "a red circle")
    page.fill("#n", "1")
    page.fill("#seed", "7")
    page.fill("#num_inference_steps", "2")
    page.click("#sweep summary")
    page.fill("#sweep-x", "guidance=1,7.5")
    page.fill("#sweep-y", "sampler=ddim,euler_a")
    with page.expect_request("**/v1/batches?*") as sent:
        page.click("#generate")
    assert "sweep=guidance%3D1%2C7.5" in sent.value.url and "sweep=sampler%3Dddim%2Ceuler_a" in sent.value.url
    page.wait_for_function("document.querySelectorAll('.xyz td img').length === 4", timeout=60_000)
    heads = page.eval_on_selector_all(".xyz th", "hs => hs.map(h => h.textContent)")
    assert heads == ["", "guidance 1", "guidance 7.5", "DDIM", "Euler a"]
    # the cell (guidance 7.5, Euler a) is the image `diffbatch generate` makes for that request alone
    src = page.eval_on_selector(".xyz tr:nth-child(3) td:nth-child(3) img", "i => i.src")
    data = page.evaluate("async src => Array.from(new Uint8Array(await (await fetch(src)).arrayBuffer()))", src)
    out = tmp_path / "cli"
    assert main(["generate", "--prompt", "a red circle", "--seed", "7", "--steps", "2", "--guidance-scale", "7.5",
                 "--scheduler", "euler_a", "--model", str(tiny_sd_path), "--out", str(out), "--dtype", "float32",
                 "--no-gallery"]) == 0
    expected = np.asarray(Image.open(out / "00000-7.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(bytes(data))).convert("RGB")), expected)
    page.close()


def test_a_seed_past_what_a_browser_holds_exactly_is_refused_not_rounded(browser, server):  # noqa: F811
    page = open_ui(browser, server.url, KEY)
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url) if request.method == "POST" else None)
    page.fill("#prompt", "a red circle")
    page.fill("#seed", "9007199254740993")  # 2**53 + 1: Number() would send 2**53
    page.click("#generate")
    assert page.eval_on_selector("#seed", "e => e.validity.rangeOverflow")  # the form is not submitted
    page.fill("#seed", "9007199254740990")
    page.fill("#n", "4")  # its images' seeds would pass 2**53 - 1
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.includes('9007199254740991')")
    assert sent == []


def test_a_refine_keeps_every_field_the_card_was_made_with(browser, server):  # noqa: F811
    """The refine form is built from the server's field table: what a card was made with (A1111's fields, hires
    fix, guidance rescale, a variation) is what its refine asks for, with the new prompt."""
    fields = {"prompt": "a red circle", "seed": 21, "num_inference_steps": 2, "guidance_scale": 5.0,
              "scheduler": "euler", "schedule": "karras", "clip_skip": 2, "emphasis": "no_norm",
              "guidance_rescale": 0.3, "variation_seed": 5, "variation_strength": 0.25, "hires_scale": 1.5,
              "hires_steps": 2, "strength": 0.6, "hires_upscaler": "latent_bicubic"}
    headers = {"Authorization": f"Bearer {KEY}"}
    made = httpx.post(f"{server.url}/v1/images/generations", json={**fields, "response_format": "url"},
                      headers=headers, timeout=60)
    assert made.status_code == 200, made.text
    page = open_ui(browser, server.url, KEY)
    page.wait_for_function("document.querySelectorAll('.card').length === 1", timeout=30_000)
    card = page.locator(".card[data-seed='21']")
    card.locator("button[data-action='refine']").click()
    card.locator(".edit-prompt").fill("a red (circle:1.2)")
    card.locator(".edit-go").click()
    page.wait_for_function("document.querySelectorAll('.card').length === 2", timeout=60_000)
    page.close()
    newest = httpx.get(f"{server.url}/v1/images/history?limit=1", headers=headers).json()["data"][0]
    assert newest["prompt"] == "a red (circle:1.2)"
    assert {name: newest[name] for name in fields if name != "prompt"} == {
        name: value for name, value in fields.items() if name != "prompt"}
