"""What ``maskhub study`` needs beyond maskhub's own dependencies (the ``study`` extra),
checked before anything is imported or trained."""

from __future__ import annotations

import importlib.util

from maskhub.errors import UsageError

#: The libraries of the ``study`` extra.
REQUIRED = ("transformers", "tokenizers", "trl", "datasets", "accelerate", "matplotlib")


def check_requirements() -> None:
    """Raise a one-line :class:`~maskhub.errors.UsageError` naming every missing library."""
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"maskhub study needs {', '.join(missing)}: "
                         "pip install 'maskhub[study]'")
