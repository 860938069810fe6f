"""Seeds, decided in one place: the range every entry point accepts, the draw of a random seed, and the
seed of a job's k-th image. Torch-free: the spec, the CLI's job reader, the resolver and the server use it.

Range: a seed is an integer in [0, 2**63) (``SEED_LIMIT``), for ``seed`` and ``variation_seed`` alike. The
image needs less: ``torch.Generator.manual_seed`` (how diffusers, our runner and A1111 seed) takes any integer
in [-2**63, 2**64). The other places a seed goes are narrower: the server's SQLite store keeps signed 64-bit
integers, and the PNG's A1111 infotext and the JSON answers carry it as a plain decimal integer. [0, 2**63) fits
all of them, and a seed read back from any of them makes the same image.

A seed diffbatch draws itself (a request or spec that sets none) is below 2**31 (``RANDOM_SEED_LIMIT``) in every
entry point: the Python API, the server's online requests and its web UI (ui.html draws the same range in the
browser). Such a seed is exact in every client's integer (JavaScript numbers are exact only to 2**53; many
clients read a JSON integer as signed 32-bit; A1111's own random seeds are below 2**32), short enough to type
back, and leaves room below ``SEED_LIMIT`` for ``seed + k``.

Jobs (DESIGN.md): image k of a job, or of a request for n images, gets ``base + k`` unless its spec sets a
seed, so any image can be made again alone.
"""

from __future__ import annotations

import secrets
from typing import Any

SEED_LIMIT = 2**63  # seeds are integers in [0, SEED_LIMIT)
SEED_RULE = "must be an integer in [0, 2**63)"  # what a refused seed's message says is allowed
RANDOM_SEED_LIMIT = 2**31  # seeds diffbatch draws are in [0, RANDOM_SEED_LIMIT)
JOB_BASE_SEED = 0  # a job's base seed when none is given (the CLI's --seed, the server's batch jobs)


def is_seed(value: Any) -> bool:
    """An integer in the seed range (a bool is not one, though Python counts it as an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT


def random_seed() -> int:
    """A seed for an image that was given none: uniform in [0, RANDOM_SEED_LIMIT), from the OS's randomness (two
    servers started together still draw different seeds)."""
    return secrets.randbelow(RANDOM_SEED_LIMIT)


def job_seed(base: int, k: int) -> int:
    """The seed of image ``k`` (0-based) of a job or request whose image 0 has seed ``base``."""
    return base + k
