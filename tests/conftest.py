import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny_sd  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models are overhead-bound: one thread is faster and immune to a busy second core."""
    import torch

    torch.set_num_threads(1)
