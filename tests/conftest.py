import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny_sd  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def pytest_collection_modifyitems(items):
    """A test that drives Chromium (the ``browser`` fixture of test_ui.py and test_gallery.py) is marked
    ``browser``, so ``-m "not browser"`` leaves it out."""
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)


def pytest_collection_finish(session):
    """Where a collected test starts CLI processes forked from a pre-imported interpreter (tests/forked.py), that
    interpreter starts now: its import of torch runs on the other core while the first tests run."""
    if any(hasattr(getattr(item, "module", None), "start_cli") for item in session.items):
        import forked

        forked.warm_up()


@pytest.fixture(autouse=True)
def _default_torch_threads():
    """Tests run at torch's default thread count, as users do (2 on CI); a test that changes it is undone."""
    import torch

    default = torch.get_num_threads()
    yield
    torch.set_num_threads(default)
