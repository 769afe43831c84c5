"""Small helpers every stage uses: logging set-up and seeding."""

from __future__ import annotations

import logging
import os
import random


def setup_logging(level: str | int = "INFO") -> None:
    logging.basicConfig(
        level=os.environ.get("METEOR_LOG_LEVEL", level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # The HTTP clients log every request URL at INFO; keep stage logs readable.
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so CPU runs are bit-for-bit repeatable.

    The string-hash seed cannot be set from inside a running process, so nothing saved may depend
    on the iteration order of a set of strings (see ``meteor.training.lora._sort_target_modules``)."""
    import numpy as np  # here, not at the top: stages that only log (judge, report) skip torch
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
