"""The numeric path an image was made on: dtype, device class and backend (``bfloat16 cpu``, ``float32 cpu openvino``,
``float16 cuda``). The same request on another path is another image (bfloat16 rounds differently from float32, each
device class and backend has its own kernels), so a job records it (the manifest's ``numerics``, the PNG's
``Numerics`` key) and resume and ``--from`` check it as they check the model. Pure Python: no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("cpu", "cuda", "mps", "xpu")
BACKENDS = ("torch", "openvino")
KEY = "Numerics"  # the PNG key (diffbatch's own; A1111 has none): written only off the default path


@dataclass(frozen=True)
class NumericPath:
    dtype: str = "float32"
    device: str = "cpu"  # the device class, not an index: cuda:0 and cuda:1 run the same kernels
    backend: str = "torch"

    def __str__(self) -> str:
        return f"{self.dtype} {self.device}" + ("" if self.backend == "torch" else f" {self.backend}")

    @property
    def is_default(self) -> bool:
        """float32 on a CPU with torch: what a PNG without the key was made on (it is not written then)."""
        return self == DEFAULT


DEFAULT = NumericPath()


def parse_numerics(text: str) -> NumericPath:
    """``"bfloat16 cpu"`` -> NumericPath; ``ValueError`` saying what is allowed."""
    words = text.split()
    if len(words) not in (2, 3):
        raise ValueError(f"{KEY} {text[:60]!r} is invalid: must be 'DTYPE DEVICE' or 'DTYPE DEVICE BACKEND'")
    path = NumericPath(*words)
    for value, allowed, what in ((path.dtype, DTYPES, "dtype"), (path.device, DEVICES, "device"),
                                 (path.backend, BACKENDS, "backend")):
        if value not in allowed:
            raise ValueError(f"{KEY} {text[:60]!r}: {what} {value[:20]!r} is not one of {', '.join(allowed)}")
    return path
