"""What a mask records about where it came from: model names and timestamps."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path


def model_name(ref: str) -> str:
    """The name recorded for a checkpoint given as ``ref``: the absolute path of a local
    checkpoint, else the Hub repo id as given."""
    path = Path(ref).expanduser()
    if path.exists():
        return str(path.resolve())
    return ref


def timestamp() -> str:
    """Now, in UTC, as the ISO string stored in ``created_at`` / ``computed_at`` columns."""
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds")


def iso(value: object) -> str:
    """A timestamp read back from the index, as an ISO string."""
    return value.isoformat(timespec="seconds") if isinstance(value, datetime) else str(value)
