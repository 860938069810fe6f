"""Per-key limits (``serve --api-keys FILE``): one client cannot fill the queue for all.

The file has one key per line, with optional limits, ``#`` starting a comment::

    sk-alice-7f3a  rpm=60 images=16 name=alice
    sk-batch-91c2  images=64

``rpm``: requests per minute (every endpoint but /health and /ui; a sliding 60-second window). ``images``:
images of this key's online requests (``/v1/images/...``) waiting or running at once. Batch jobs are not
counted: the job runner feeds the engine a bounded number of their images, so they never crowd out online
requests. A limit left out is not enforced. ``name`` (default ``key-LINE``) is what logs show; a key never is.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

OPTIONS = ("rpm", "images", "name")
WINDOW_S = 60.0


@dataclass(frozen=True)
class KeyLimit:
    key: str = field(repr=False)  # a secret: never in a repr, a log line or an error
    name: str
    rpm: int | None = None
    images: int | None = None

    @property
    def tenant(self) -> str:
        """Who owns this key's history, files and batch jobs in the store: a digest of the key (stable across
        restarts and edits of the file's other fields; the key itself is never stored)."""
        return hashlib.sha256(self.key.encode()).hexdigest()[:32]


def load_keys(path: Path) -> dict[str, KeyLimit]:
    """The keys of ``path``; a bad line is an ``InputError`` naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--api-keys {path}: cannot read the file ({exc})", field="api_keys") from None
    keys: dict[str, KeyLimit] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        limit = _parse_line(words, number, f"--api-keys {path} line {number}")
        if limit.key in keys:
            raise InputError(f"--api-keys {path} line {number}: the key is listed twice", field="api_keys")
        keys[limit.key] = limit
    if not keys:
        raise InputError(f"--api-keys {path}: the file lists no key", field="api_keys")
    return keys


def _parse_line(words: list[str], number: int, where: str) -> KeyLimit:
    options = {}
    for word in words[1:]:
        option, sep, value = word.partition("=")
        if not sep or option not in OPTIONS:
            raise InputError(f"{where}: {word!r} is not one of {', '.join(o + '=...' for o in OPTIONS)}",
                             field="api_keys")
        options[option] = value
    limits = {}
    for option in ("rpm", "images"):
        if option in options:
            if not options[option].isdigit() or int(options[option]) < 1:
                raise InputError(f"{where}: {option}={options[option]!r} must be a whole number >= 1",
                                 field="api_keys")
            limits[option] = int(options[option])
    return KeyLimit(words[0], options.get("name", f"key-{number}"), **limits)


class KeyLimiter:
    """Counts each key's requests (last minute) and online images in flight; thread-safe."""

    def __init__(self, keys: dict[str, KeyLimit], clock=time.monotonic) -> None:
        self.keys = keys
        self.clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._images: collections.Counter[str] = collections.Counter()

    def admit_request(self, limit: KeyLimit) -> float | None:
        """Count a request; None if within ``rpm``, else the seconds until one more is allowed."""
        if limit.rpm is None:
            return None
        now = self.clock()
        with self._lock:
            times = self._requests[limit.key]
            while times and times[0] <= now - WINDOW_S:
                times.popleft()
            if len(times) >= limit.rpm:
                return times[0] + WINDOW_S - now
            times.append(now)
            return None

    def reserve_images(self, limit: KeyLimit, n: int) -> int | None:
        """Hold ``n`` image slots of the key; None if they fit, else how many it has in flight."""
        with self._lock:
            held = self._images[limit.key]
            if limit.images is not None and held + n > limit.images:
                return held
            self._images[limit.key] += n
            return None

    def release_images(self, limit: KeyLimit, n: int = 1) -> None:
        with self._lock:
            self._images[limit.key] -= n

    def in_flight(self, limit: KeyLimit) -> int:
        with self._lock:
            return self._images[limit.key]
