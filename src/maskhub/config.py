"""Where maskhub keeps its files. Read through :func:`home_dir` only."""

from __future__ import annotations

import os
from pathlib import Path


def home_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The maskhub home: ``override``, else ``$MASKHUB_HOME``, else ``$XDG_CACHE_HOME/maskhub``
    (``~/.cache/maskhub``). It holds ``registry.duckdb`` and the mask stores."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("MASKHUB_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "maskhub"
