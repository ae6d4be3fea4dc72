"""Whole-store file operations that need no Zarr: publishing a staged store, removing one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from maskhub.storage import remote

#: A local store being deleted is first renamed ``<id>.zarr`` -> ``<id>.zarr.removing``.
TOMBSTONE_SUFFIX = ".removing"


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


def tombstone(path: Path) -> Path:
    """Where a local store at ``path`` is moved to be deleted."""
    return path.with_name(path.name + TOMBSTONE_SUFFIX)


def discard(path: Path) -> None:
    """Delete the local store at ``path`` so that its name is free at once: rename it to its
    :func:`tombstone`, then delete that (a crash half-way leaves only a tombstone, never a
    half-deleted store under the store's own name). No error when nothing is there."""
    grave = tombstone(path)
    shutil.rmtree(grave, ignore_errors=True)
    try:
        os.replace(path, grave)
    except FileNotFoundError:
        return
    shutil.rmtree(grave, ignore_errors=True)
