"""Keep benchmarks/RESULTS.md current: each benchmark replaces its own ``## `` section, leaving the others."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
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


def interleaved_best(strategies: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Each strategy's best time over ``repeats`` rounds, the strategies interleaved within a round (machine
    noise hits all alike); each time printed to stderr as it is measured."""
    times: dict[str, list[float]] = {k: [] for k in strategies}
    for _ in range(repeats):
        for key, fn in strategies.items():
            began = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - began)
            print(f"  {key:34s} {times[key][-1]:8.2f} s", file=sys.stderr, flush=True)
    return {k: min(v) for k, v in times.items()}


def rates(best: dict[str, float], images: int) -> dict[str, dict[str, float]]:
    """Seconds and images/s of each strategy, rounded for a results file."""
    return {k: {"seconds": round(t, 2), "images_per_s": round(images / t, 3)} for k, t in best.items()}


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
