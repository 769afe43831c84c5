"""Where persistent, per-user state lives: outside the repo, so that `dvc exp run --queue` /
`--temp` experiments (which run in a temporary copy of the repo) share it with the workspace.

The teacher's response cache and merge's optuna studies live under :func:`cache_root`.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "METEOR_CACHE_DIR"


def cache_root(configured: str | os.PathLike | None = None) -> Path:
    """The cache root: ``$METEOR_CACHE_DIR`` if set, else ``configured`` (a params value) if
    given, else ``$XDG_CACHE_HOME/meteor`` (``~/.cache/meteor`` when XDG_CACHE_HOME is unset)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "meteor"
