"""Whole-store file operations that need no Zarr: publishing a staged store, removing one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from maskhub.storage import remote


def remove_tree(path: Path | str) -> None:
    """Remove a store directory, or everything under a store URL, if present (no error when
    absent)."""
    if remote.is_url(path):
        remote.remove_prefix(str(path))
        return
    shutil.rmtree(path, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Move a completed store from its staging place to its final place atomically."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
