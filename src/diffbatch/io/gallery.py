"""A gallery of an output folder, for people who would rather look than read the manifest.

``index.html``: a static page (no server, no network, works from ``file://``) with a card per image —
thumbnail, prompt, seed and parameters — a text filter over all of it, and a click to see the full image.
``grid.png``: a contact sheet of the first ``GRID_LIMIT`` images with the prompt under each.
``xyz.png`` (a sweep, io/sweep.py): AUTOMATIC1111's X/Y/Z plot, X values as columns and Y values as rows with
their labels, the prompt, seed and Z value above; one grid per image of the prompts and Z value (``xyz.png``
when there is one, else ``xyz-001.png``, ...). The page shows the axes and filters by axis value.
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
XYZ_PNG = "xyz.png"
XYZ_LIMIT = 200  # xyz grids written (a sweep of many prompts: the first 200 pages)
XYZ_CELL = 256  # each image of an xyz grid fitted into XYZ_CELL x XYZ_CELL pixels
XYZ_FONT_SIZE = 18
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
.axis{padding:5px;background:#222;color:#eee;border:1px solid #444}
.xyz{padding:8px 16px}.xyz a{color:#9cf;margin-right:8px}
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
const axes = [...document.querySelectorAll('select.axis')];
function applyFilter() {
  const words = filter.value.toLowerCase().split(/\\s+/).filter(Boolean);
  let shown = 0;
  for (const card of cards) {
    const match = words.every(w => card.dataset.search.includes(w))
      && axes.every(a => !a.value || card.dataset[a.dataset.axis] === a.value);
    card.hidden = !match;
    shown += match;
  }
  count.textContent = shown + ' of ' + cards.length;
}
filter.addEventListener('input', applyFilter);
for (const a of axes) a.addEventListener('change', applyFilter);
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
    """Write ``out/index.html``, ``out/grid.png`` and a sweep's ``xyz*.png`` (atomically) from the folder's
    manifest."""
    records = [r for r in manifest_records(out) if isinstance(r.get("file"), str) and (out / r["file"]).is_file()]
    index, grid = out / INDEX_HTML, out / GRID_PNG
    pages = xyz_pages(records)
    names = xyz_names(len(pages))
    for name, page in zip(names, pages, strict=True):
        write_bytes_atomic(out / name, render_xyz(out, page))
    for stale in set(p.name for p in out.glob("xyz*.png")) - set(names):  # a sweep rerun with fewer pages
        (out / stale).unlink(missing_ok=True)
    write_bytes_atomic(index, render_html(records, names).encode("utf-8"))
    write_bytes_atomic(grid, render_grid(out, records[:GRID_LIMIT]))
    return index, grid


def xyz_pages(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The sweep's records grouped into grids: one per image of the prompts and Z value, in job order."""
    pages: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for record in records:
        cell = record.get("sweep")
        if isinstance(cell, dict) and isinstance(cell.get("x"), list):
            pages.setdefault((cell.get("image"), _axis(cell, "z")[0]), []).append(record)
    return list(pages.values())[:XYZ_LIMIT]


def xyz_names(count: int) -> list[str]:
    return [XYZ_PNG] if count == 1 else [f"xyz-{n:03d}.png" for n in range(1, count + 1)]


def _axis(cell: dict[str, Any], name: str) -> tuple[int, str]:
    """(position, label) of a sweep cell on axis ``name``; (0, "") where the sweep has no such axis."""
    value = cell.get(name)
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], int):
        return value[0], str(value[1])
    return 0, ""


def render_xyz(out: Path, page: list[dict[str, Any]]) -> bytes:
    """One X/Y grid: X labels over the columns, Y labels left of the rows, the prompt, seed and Z above."""
    font = _font(XYZ_FONT_SIZE)
    line = XYZ_FONT_SIZE + 4
    columns = {_axis(r["sweep"], "x") for r in page}
    rows = {_axis(r["sweep"], "y") for r in page}
    xs, ys = sorted(columns), sorted(rows)
    left = 8 + (min(200, max(int(font.getlength(label)) for _, label in ys)) if any(lb for _, lb in ys) else 0)
    first = page[0]
    z = _axis(first["sweep"], "z")[1]
    title = [str(first.get("prompt", "")), f"seed {first.get('seed')}" + (f" · {z}" if z else "")]
    top = (len(title) + CAPTION_LINES) * line + 8
    cell = XYZ_CELL + 8
    sheet = Image.new("RGB", (left + len(xs) * cell, top + len(ys) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for n, text in enumerate(title):
        draw.text((4, 4 + n * line), _ellipsized(text, font, sheet.width - 8) if font.getlength(text) > sheet.width - 8
                  else text, fill=(0, 0, 0), font=font)
    for i, (_, label) in enumerate(xs):  # centred over its column, as A1111 draws them
        for n, text in enumerate(_wrap(label, font, XYZ_CELL)):
            x = left + i * cell + 4 + (XYZ_CELL - int(font.getlength(text))) // 2
            draw.text((x, (len(title) + n) * line + 4), text, fill=(0, 0, 0), font=font)
    for j, (_, label) in enumerate(ys):
        for n, text in enumerate(_wrap(label, font, left - 8)):
            draw.text((4, top + j * cell + XYZ_CELL // 2 + n * line), text, fill=(0, 0, 0), font=font)
    for record in page:
        image = _read_rgb(out / record["file"])
        if image is not None:
            x, y = xs.index(_axis(record["sweep"], "x")), ys.index(_axis(record["sweep"], "y"))
            _paste_fitted(sheet, image, left + x * cell + 4, top + y * cell + 4, XYZ_CELL, Image.Resampling.LANCZOS)
    return _png_bytes(sheet)


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


def render_html(records: list[dict[str, Any]], grids: Sequence[str] = ()) -> str:
    """The page; it names no folder, so a job's gallery is the same file wherever it was made. A sweep's
    grids are linked at the top, and each of its axes gets a select that shows only the cards of one value."""
    shown = records[:HTML_LIMIT]
    more = f" (the first {HTML_LIMIT} shown)" if len(records) > HTML_LIMIT else ""
    heading = f"diffbatch: {len(records)} images{more}"
    cards = "\n".join(_card(r) for r in shown)
    e = html.escape
    axes = _axis_selects(shown)
    links = " ".join(f'<a href="{e(name)}">{e(name)}</a>' for name in grids)
    sweep = f'<nav class="xyz">grids: {links}</nav>\n' if grids else ""
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{e(heading)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<header><h1>{e(heading)}</h1>\n"
            '<input id="filter" type="search" placeholder="filter: words in prompt, seed, parameters" autofocus>\n'
            f'{axes}<span id="count"></span></header>\n{sweep}<main>\n{cards}\n</main>\n'
            '<div id="viewer" hidden><img alt="full image"><p></p></div>\n'
            f"<script>{SCRIPT}</script>\n</body>\n</html>\n")


def _axis_selects(records: list[dict[str, Any]]) -> str:
    """A select per sweep axis (X, Y, Z) listing its values in order; empty without a sweep."""
    selects = []
    for name in ("x", "y", "z"):
        values = sorted({_axis(r["sweep"], name) for r in records if isinstance(r.get("sweep"), dict)
                         and name in r["sweep"]})
        if values:
            options = "".join(f'<option value="{html.escape(label)}">{html.escape(label)}</option>'
                              for _, label in values)
            selects.append(f'<select class="axis" data-axis="{name}" aria-label="{name.upper()} axis">'
                           f'<option value="">{name.upper()}: all</option>{options}</select>')
    return "".join(selects) + ("\n" if selects else "")


def _card(record: dict[str, Any]) -> str:
    e = html.escape
    prompt, negative, params = str(record.get("prompt", "")), str(record.get("negative_prompt") or ""), \
        parameters_line(record)
    search = " ".join([prompt, negative, params, record["file"]]).lower()
    neg = f'<p class="neg">negative: {e(negative)}</p>' if negative else ""
    caption = f"{prompt} — {params}"
    cell = record.get("sweep") if isinstance(record.get("sweep"), dict) else {}
    labels = [_axis(cell, name)[1] for name in ("x", "y", "z") if name in cell]
    axes = "".join(f' data-{name}="{e(_axis(cell, name)[1])}"' for name in ("x", "y", "z") if name in cell)
    template = record.get("template")
    params += "".join(f" · {label}" for label in labels) if labels else ""
    neg += f'<p class="params">template: {e(str(template))}</p>' if template else ""
    return (f'<figure class="card" data-index="{e(str(record.get("index")))}" data-search="{e(search)}"{axes}>'
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


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)  # Pillow's embedded font: the same everywhere (FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

