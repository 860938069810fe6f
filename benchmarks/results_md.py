"""Keep benchmarks/RESULTS.md current: each benchmark replaces its own ``## `` section, leaving the others."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = ("# Benchmark results\n\nMeasured on the development machine (2 CPU cores, no GPU) unless a section says "
          "otherwise. This machine is shared and noisy: compare the ratios measured side by side in one run, "
          "not absolute times across sections.\n")


def replace_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Write ``## title`` + ``body`` into ``path``, replacing an existing section of that title."""
    text = path.read_text() if path.exists() else HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
