"""The paper in miniature (``maskhub study``): real TRL runs on a small model, every table and
figure of the paper measured with maskhub's public API. See docs/study.md. Needs the
``study`` extra (transformers, trl, datasets, accelerate, matplotlib)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from maskhub.study.requirements import check_requirements

if TYPE_CHECKING:
    from maskhub.study.hub import HubStudy
    from maskhub.study.report import StudyReport

__all__ = ["study"]


def study(output: str | os.PathLike[str], **kwargs: Any) -> StudyReport | HubStudy:
    """Run the whole study into directory ``output``: see :func:`maskhub.study.run.study`
    (``quick``, ``size``, ``lr``, ``steps``, ``seeds``, ``from_hub``, ``name``, ``home``,
    ``seed``, ``say``). A missing library of the ``study``
    extra is a one-line :class:`~maskhub.errors.UsageError` before anything runs."""
    check_requirements()
    from maskhub.study.run import study as run_study

    return run_study(output, **kwargs)
