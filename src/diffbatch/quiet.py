"""Library noise off: diffbatch keeps stderr for its own progress bar and one-line errors."""

from __future__ import annotations

import logging as std_logging
import warnings


def quiet_loading() -> None:
    """No loading bars or notices from diffusers and transformers (the CLI and each Ray worker call this)."""
    from diffusers.utils import logging as diffusers_logging  # imported here: torch loads with them
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.disable_progress_bar()
        logging.set_verbosity_error()
    # Warnings a user cannot act on: PEFT's about adapter bookkeeping when a LoRA loads, and TorchScript's tracer
    # warnings when the OpenVINO backend converts a model (traced once, at fixed shapes, on purpose)
    warnings.filterwarnings("ignore", module=r"peft(\.|$)")
    from torch.jit import TracerWarning

    warnings.filterwarnings("ignore", category=TracerWarning)
    std_logging.getLogger("peft").setLevel(std_logging.ERROR)
