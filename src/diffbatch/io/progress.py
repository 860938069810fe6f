"""A progress bar on stderr: images done of the total, images/s and time left."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO

from tqdm import tqdm


class Progress:
    """Counts finished images; tqdm supplies the rate (img/s) and the ETA."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self._bar = tqdm(total=total, desc="generate", unit="img", file=stream or sys.stderr,
                         disable=not enabled, dynamic_ncols=True, smoothing=0.1)

    def update(self, images: int = 1) -> None:
        self._bar.update(images)

    @property
    def done(self) -> int:
        return int(self._bar.n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
