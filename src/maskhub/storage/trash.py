"""The trash of a home (``<home>/tmp/trash``): where recovery puts what it must delete, so that
a bulky deletion never holds up the command that found it.

Deleting a staging directory that a killed writer left can mean tens of thousands of chunk
files (one import left ~93,000: minutes of unlinking). Recovery at open only renames such a
directory into the trash (one rename, whatever its size), which settles the registry's state
at once; the files themselves are then deleted a bounded amount at a time
(:func:`empty_trash`: at most :data:`OPEN_FILES` files or :data:`OPEN_SECONDS` seconds per
open), or all at once by ``maskhub fsck --repair``. Nothing reads the trash: what lies there
is never part of a mask.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

TRASH_DIR = "trash"

#: Files (or empty directories) one open of a home deletes from the trash, at most.
OPEN_FILES = 2000
#: Seconds one open of a home spends deleting from the trash, at most.
OPEN_SECONDS = 0.25


def trash_dir(tmp_dir: Path) -> Path:
    """The trash under a home's ``tmp/`` directory."""
    return tmp_dir / TRASH_DIR


def to_trash(tmp_dir: Path, path: Path) -> bool:
    """Move ``path`` (a file or a whole directory tree on the same file system) into the
    trash under ``tmp_dir`` in one rename; ``False`` when ``path`` is gone (someone else moved
    or deleted it first). The name it gets there is unique. Where ``path`` lies on another
    file system than the trash (a ``masks/`` that is a mount of its own), it is deleted at
    once instead."""
    if not os.path.lexists(path):
        return False
    trash = trash_dir(tmp_dir)
    trash.mkdir(parents=True, exist_ok=True)
    dest = trash / f"{path.name}.{os.getpid()}.{time.time_ns()}"
    try:
        os.replace(path, dest)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.rmtree(path, ignore_errors=True)
    return True


def empty_trash(tmp_dir: Path, max_files: int | None = None,
                seconds: float | None = None) -> tuple[int, bool]:
    """Delete what is in the trash under ``tmp_dir``, deepest first, stopping after
    ``max_files`` deletions or ``seconds`` seconds (``None``: no bound). Returns ``(deleted,
    done)``: how many files and directories were deleted, and whether the trash is now gone.
    Safe to run from several processes at once (what another deleted is skipped); an entry
    that cannot be deleted (another user's) is left."""
    trash = trash_dir(tmp_dir)
    deadline = None if seconds is None else time.monotonic() + seconds
    deleted = 0

    def spent() -> bool:
        return ((max_files is not None and deleted >= max_files)
                or (deadline is not None and time.monotonic() >= deadline))

    for root, dirs, files in os.walk(trash, topdown=False):
        for name in files:
            if spent():
                return deleted, False
            try:
                os.unlink(os.path.join(root, name))
            except FileNotFoundError:
                continue
            except OSError:
                continue
            deleted += 1
        for name in dirs:  # symlinks to directories are listed here and not walked into
            path = os.path.join(root, name)
            try:
                if os.path.islink(path):
                    os.unlink(path)
                else:
                    os.rmdir(path)
            except OSError:
                continue
            deleted += 1
    try:
        trash.rmdir()
    except FileNotFoundError:
        return deleted, True
    except OSError:
        return deleted, False
    return deleted, True


def count_trash(tmp_dir: Path) -> int:
    """Files (not directories) in the trash under ``tmp_dir``."""
    return sum(len(files) for _, _, files in os.walk(trash_dir(tmp_dir)))
