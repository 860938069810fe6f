"""Library noise off: diffbatch keeps stderr for its own progress bar and one-line errors."""

from __future__ import annotations


def quiet_loading() -> None:
    """No loading bars or notices from diffusers and transformers (the CLI and each Ray worker call this)."""
    from diffusers.utils import logging as diffusers_logging  # imported here: torch loads with them
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.disable_progress_bar()
        logging.set_verbosity_error()
