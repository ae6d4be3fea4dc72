"""Intent records: what a writer leaves in ``<home>/tmp`` while it changes which stores exist,
so that a crash (kill -9) at any instant leaves evidence that recovery can act on.

``tmp/<id>.<pid>.intent`` says "process ``pid`` is adding (``add``) or removing (``rm``) the
store of mask ``id``". It is written (atomically: a rename) before the store moves into or out
of ``masks/`` and deleted after the index transaction is settled. Whoever finds one whose
process is dead settles it from the index: a committed row means the store is the mask's,
no row means the store is an orphan (see :meth:`maskhub.core.home.Home.settle_intent`).
Staging directories (``tmp/<id>.<pid>.partial``) follow the same naming.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from maskhub.errors import environment_errors

PARTIAL_SUFFIX = ".partial"
INTENT_SUFFIX = ".intent"


@dataclass(frozen=True)
class Intent:
    """One intent record: the mask, the process, what it was doing and where the store is
    (``store_url`` for a remote store, else ``None``: ``masks/<id>.zarr`` of the home)."""

    path: Path
    mask_id: str
    pid: int
    op: str
    store_url: str | None = None


def parse_name(name: str, suffix: str) -> tuple[str, int] | None:
    """``(id, pid)`` of a ``<id>.<pid><suffix>`` file name, else ``None``."""
    if not name.endswith(suffix):
        return None
    stem, dot, pid = name[: -len(suffix)].rpartition(".")
    if not dot or not stem or not pid.isdigit():
        return None
    return stem, int(pid)


def write_intent(tmp_dir: Path, mask_id: str, op: str, store_url: str | None = None) -> Path:
    """Record that this process is about to add (``op="add"``) or remove (``"rm"``) the store
    of ``mask_id``; return the record's path. Written aside and renamed, so a crash leaves
    either a whole record or none (a leftover ``.tmp`` is harmless and swept)."""
    path = tmp_dir / f"{mask_id}.{os.getpid()}{INTENT_SUFFIX}"
    part = path.with_name(path.name + ".tmp")
    try:
        with environment_errors(tmp_dir):  # a full disk: one line, the write is abandoned
            tmp_dir.mkdir(parents=True, exist_ok=True)
            part.write_text(json.dumps({"id": mask_id, "op": op, "store_url": store_url}),
                            encoding="utf-8")
            os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return path


def read_intent(path: Path) -> Intent | None:
    """The record at ``path`` (``None`` when it is gone or not an intent record)."""
    parsed = parse_name(path.name, INTENT_SUFFIX)
    if parsed is None:
        return None
    mask_id, pid = parsed
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    url = doc.get("store_url")
    return Intent(path, mask_id, pid, str(doc.get("op") or "add"),
                  url if isinstance(url, str) else None)


def iter_intents(tmp_dir: Path) -> Iterator[Intent]:
    """Every intent record under ``tmp_dir``."""
    if not tmp_dir.is_dir():
        return
    for entry in sorted(tmp_dir.iterdir()):
        if entry.name.endswith(INTENT_SUFFIX):
            intent = read_intent(entry)
            if intent is not None:
                yield intent


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
