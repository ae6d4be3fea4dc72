"""Integrations with training frameworks (optional extras).

* :mod:`maskhub.integrations.transformers`: ``MaskCallback``, a ``transformers``
  ``TrainerCallback`` (also for TRL trainers) that applies a mask when training begins;
  needs ``pip install 'maskhub[train]'``.
* :mod:`maskhub.integrations.peft`: ``shira_adapter`` (a mask's subnetwork as a PEFT SHiRA
  adapter with the mask's per-layer counts), ``load_shira_adapter``, ``mask_from_adapter``;
  needs ``pip install 'maskhub[peft]'``.

Nothing here is imported by ``import maskhub``.
"""
