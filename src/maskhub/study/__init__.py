"""The paper in miniature (``maskhub study``): real TRL runs on a small model, every table and
figure of the paper measured with maskhub's public API. See :func:`maskhub.study.run.study`
and docs/study.md. Needs the ``study`` extra (transformers, trl, datasets, matplotlib)."""

from maskhub.study.run import study

__all__ = ["study"]
