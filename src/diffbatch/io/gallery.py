"""A gallery of an output folder, for people who would rather look than read the manifest.

``index.html``: a static page (no server, no network, works from ``file://``) with a card per image —
thumbnail, prompt, seed and parameters — a text filter over all of it, and a click to see the full image.
``grid.png``: a contact sheet of the first ``GRID_LIMIT`` images with the prompt under each.
Both come from ``manifest.jsonl`` (the latest line per index, in index order, images whose file exists) and
hold nothing run-specific (no times), so the same images give the same gallery files.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .resume import manifest_records
from .writer import write_bytes_atomic

INDEX_HTML = "index.html"
GRID_PNG = "grid.png"
HTML_LIMIT = 10_000  # cards in index.html: a page of a million images would not open
GRID_LIMIT = 100  # images in grid.png
CELL = 128  # grid.png: each image fitted into CELL x CELL pixels
CAPTION_LINES = 2
FONT_SIZE = 11
GRID_COLUMNS = 10

STYLE = """
body{font:14px system-ui,sans-serif;margin:0;background:#111;color:#ddd}
header{position:sticky;top:0;background:#1b1b1b;padding:10px 16px;display:flex;gap:12px;align-items:center;z-index:1}
h1{font-size:16px;margin:0;font-weight:600}
#filter{flex:1;max-width:480px;padding:6px 8px;font-size:14px;background:#222;color:#eee;border:1px solid #444}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px;padding:16px}
.card{margin:0;background:#1b1b1b;padding:8px;border-radius:6px}
.card img{width:100%;height:200px;object-fit:contain;background:#000;display:block;cursor:zoom-in}
.card p{margin:4px 0;overflow-wrap:anywhere}
.prompt{color:#fff}.neg{color:#c99}.params{color:#999;font-size:12px}
[hidden]{display:none!important}
#viewer{position:fixed;inset:0;background:rgba(0,0,0,.92);display:flex;flex-direction:column;
align-items:center;justify-content:center;z-index:2;cursor:zoom-out}
#viewer img{max-width:95vw;max-height:85vh;image-rendering:auto}
"""

SCRIPT = """
const cards = [...document.querySelectorAll('.card')];
const filter = document.getElementById('filter'), count = document.getElementById('count');
const viewer = document.getElementById('viewer'), full = viewer.querySelector('img');
function applyFilter() {
  const words = filter.value.toLowerCase().split(/\\s+/).filter(Boolean);
  let shown = 0;
  for (const card of cards) {
    const match = words.every(w => card.dataset.search.includes(w));
    card.hidden = !match;
    shown += match;
  }
  count.textContent = shown + ' of ' + cards.length;
}
filter.addEventListener('input', applyFilter);
for (const link of document.querySelectorAll('.card a')) {
  link.addEventListener('click', event => {
    event.preventDefault();
    full.src = link.getAttribute('href');
    viewer.querySelector('p').textContent = link.dataset.caption;
    viewer.hidden = false;
  });
}
viewer.addEventListener('click', () => { viewer.hidden = true; });
document.addEventListener('keydown', e => { if (e.key === 'Escape') viewer.hidden = true; });
applyFilter();
"""


def write_gallery(out: Path) -> tuple[Path, Path]:
    """Write ``out/index.html`` and ``out/grid.png`` (atomically) from the folder's manifest."""
    records = [r for r in manifest_records(out) if isinstance(r.get("file"), str) and (out / r["file"]).is_file()]
    index, grid = out / INDEX_HTML, out / GRID_PNG
    write_bytes_atomic(index, render_html(records).encode("utf-8"))
    write_bytes_atomic(grid, render_grid(out, records[:GRID_LIMIT]))
    return index, grid


def parameters_line(record: dict[str, Any]) -> str:
    """``seed 7 · 20 steps · CFG 7.5 · 512x512 · euler_a · model`` (img2img: strength and init image too; a step
    cache when on)."""
    parts = [f"seed {record.get('seed')}", f"{record.get('num_inference_steps')} steps",
             f"CFG {record.get('guidance_scale')}", f"{record.get('width')}x{record.get('height')}",
             record.get("scheduler") or "default sampler", str(record.get("model", ""))]
    if record.get("image") is not None:
        parts += [f"strength {record.get('strength')}", f"init {record.get('image')}"]
    if record.get("cache", "off") != "off":  # a line written before the field has none: off
        parts.append(f"cache {record['cache']}")
    return " · ".join(parts)


def render_html(records: list[dict[str, Any]]) -> str:
    """The page; it names no folder, so a job's gallery is the same file wherever it was made."""
    shown = records[:HTML_LIMIT]
    more = f" (the first {HTML_LIMIT} shown)" if len(records) > HTML_LIMIT else ""
    heading = f"diffbatch: {len(records)} images{more}"
    cards = "\n".join(_card(r) for r in shown)
    e = html.escape
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{e(heading)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<header><h1>{e(heading)}</h1>\n"
            '<input id="filter" type="search" placeholder="filter: words in prompt, seed, parameters" autofocus>\n'
            f'<span id="count"></span></header>\n<main>\n{cards}\n</main>\n'
            '<div id="viewer" hidden><img alt="full image"><p></p></div>\n'
            f"<script>{SCRIPT}</script>\n</body>\n</html>\n")


def _card(record: dict[str, Any]) -> str:
    e = html.escape
    prompt, negative, params = str(record.get("prompt", "")), str(record.get("negative_prompt") or ""), \
        parameters_line(record)
    search = " ".join([prompt, negative, params, record["file"]]).lower()
    neg = f'<p class="neg">negative: {e(negative)}</p>' if negative else ""
    caption = f"{prompt} — {params}"
    return (f'<figure class="card" data-index="{e(str(record.get("index")))}" data-search="{e(search)}">'
            f'<a href="{e(record["file"])}" data-caption="{e(caption)}">'
            f'<img src="{e(record["file"])}" alt="{e(prompt)}" loading="lazy"></a>'
            f'<figcaption><p class="prompt">{e(prompt)}</p>{neg}<p class="params">{e(params)}</p></figcaption>'
            "</figure>")


def render_grid(out: Path, records: list[dict[str, Any]]) -> bytes:
    """The contact sheet's PNG bytes: the folder's images with their prompts."""
    images = [_read_rgb(out / record["file"]) for record in records]
    return _png_bytes(contact_sheet(images, [str(record.get("prompt", "")) for record in records]))


def contact_sheet(images: Sequence[Image.Image | None], captions: Sequence[str], cell: int = CELL,
                  columns: int = GRID_COLUMNS, resample: Image.Resampling = Image.Resampling.LANCZOS
                  ) -> Image.Image:
    """The one grid renderer (gallery grid.png, eval-shapes grid.png): each image fitted into a ``cell``
    square, centred, its caption (up to two lines) under it; a missing image leaves its cell empty."""
    font = _font()
    line_height = FONT_SIZE + 3
    columns = max(1, min(columns, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    cell_w, cell_h = cell + 8, cell + 8 + CAPTION_LINES * line_height + 4
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (17, 17, 17))
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        if image is not None:
            _paste_fitted(sheet, image, x, y, cell, resample)
        for n, line in enumerate(_wrap(caption, font, cell)):
            draw.text((x, y + cell + 4 + n * line_height), line, fill=(230, 230, 230), font=font)
    return sheet


def _read_rgb(path: Path) -> Image.Image | None:
    """The image at ``path``; None for a cut or foreign file (the gallery still gets written)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError):
        return None


def _paste_fitted(sheet: Image.Image, image: Image.Image, x: int, y: int, cell: int,
                  resample: Image.Resampling) -> None:
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    sheet.paste(image.resize(size, resample), (x + (cell - size[0]) // 2, y + (cell - size[1]) // 2))


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Up to ``CAPTION_LINES`` lines of at most ``width`` pixels; an ellipsis where text was cut."""
    shown = CAPTION_LINES * width  # characters: more cannot fit (zero-width marks aside), so the rest is not measured
    lines: list[str] = []
    words = text[:shown].split()
    while words and len(lines) < CAPTION_LINES:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if lines and (words or len(text) > shown or font.getlength(lines[-1]) > width):
        lines[-1] = _ellipsized(lines[-1], font, width)
    return lines


def _ellipsized(line: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """The longest start of ``line`` that fits ``width`` pixels with "…" after it: a binary search, since each
    measure costs the length measured (trimming a character at a time was quadratic)."""
    low, high = 0, len(line)
    while low < high:
        middle = (low + high + 1) // 2
        if font.getlength(line[:middle] + "…") <= width:
            low = middle
        else:
            high = middle - 1
    return line[:low] + "…"


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(FONT_SIZE)  # Pillow's embedded font: the same everywhere (FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

