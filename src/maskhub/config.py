"""Where maskhub keeps its files. Read through :func:`home_dir` only."""

from __future__ import annotations

import os
from pathlib import Path


def home_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The maskhub home: ``override``, else ``$MASKHUB_HOME``, else ``$XDG_CACHE_HOME/maskhub``
    (``~/.cache/maskhub``). It holds ``registry.duckdb`` and the local mask stores. A URL
    (``s3://...``) in ``override`` or ``$MASKHUB_HOME`` names a store root (see
    :func:`store_url`), not a home: the default home is used then."""
    if override and not _is_url(str(override)):
        return Path(override).expanduser()
    env = os.environ.get("MASKHUB_HOME")
    if env and not _is_url(env) and not (override and _is_url(str(override))):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "maskhub"


def store_url(override: str | None = None, home: str | os.PathLike[str] | None = None
              ) -> str | None:
    """Where new mask stores go when not under the home: ``override`` (``--store``), else
    ``$MASKHUB_STORE``, else ``home`` (``--home``) or ``$MASKHUB_HOME`` when that is a URL
    such as ``s3://bucket/prefix`` (the index then stays in the default local home, see
    :func:`home_dir`). ``None`` means ``<home>/masks``."""
    if override:
        return override
    env = os.environ.get("MASKHUB_STORE")
    if env:
        return env
    value = str(home) if home else os.environ.get("MASKHUB_HOME")
    return value if value and _is_url(value) else None


def _is_url(value: str) -> bool:
    head, sep, _ = value.partition("://")
    return bool(sep) and head.replace("+", "").replace(".", "").replace("-", "").isalnum() \
        and head.lower() != "file"


#: How long a command waits, by default, for another process (a notebook's own
#: ``duckdb.connect``) that holds ``registry.duckdb`` open, before failing in one line.
FOREIGN_LOCK_WAIT_S = 60.0


def foreign_lock_wait() -> float:
    """Seconds to wait for a process outside maskhub that holds DuckDB's lock on the index:
    ``$MASKHUB_LOCK_WAIT`` when set to a number, else :data:`FOREIGN_LOCK_WAIT_S`."""
    try:
        return max(0.0, float(os.environ["MASKHUB_LOCK_WAIT"]))
    except (KeyError, ValueError):
        return FOREIGN_LOCK_WAIT_S
