"""Integrations with training frameworks (optional extras).

* :mod:`maskhub.integrations.transformers`: ``MaskCallback``, a ``transformers``
  ``TrainerCallback`` (also for TRL trainers) that applies a mask when training begins;
  needs ``pip install 'maskhub[train]'``.

Nothing here is imported by ``import maskhub``.
"""
