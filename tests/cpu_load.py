"""Busy cores for determinism tests: results must not depend on how loaded the machine is."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

# Each burner stops by itself after this long, even if the test that started it dies.
MAX_SECONDS = 900
BURN = f"import time\nend = time.time() + {MAX_SECONDS}\nwhile time.time() < end: pass"


@contextlib.contextmanager
def busy_cores(count: int | None = None):
    """Run ``count`` (default: one per core) CPU-burning processes while the block runs."""
    burners = [subprocess.Popen([sys.executable, "-c", BURN])
               for _ in range(count or os.cpu_count() or 2)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
