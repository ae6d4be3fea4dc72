"""Integrations with training frameworks (optional extras).

* :mod:`maskhub.integrations.transformers`: ``MaskCallback``, a ``transformers``
  ``TrainerCallback`` (also for TRL trainers) that applies a mask when training begins;
  needs ``pip install 'maskhub[train]'``.
* :mod:`maskhub.integrations.peft`: ``shira_adapter`` (a mask's subnetwork as a PEFT SHiRA
  adapter with the mask's per-layer counts), ``load_shira_adapter``, ``mask_from_adapter``;
  needs ``pip install 'maskhub[peft]'``.

Nothing here is imported by ``import maskhub``; ``maskhub.integrations.transformers`` (or
``.peft``) imports its module on first use, so the README's
``maskhub.integrations.transformers.masked_optimizer(...)`` works after ``import maskhub``.
"""

_SUBMODULES = ("transformers", "peft")


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"maskhub.integrations.{name}")
    raise AttributeError(f"module 'maskhub.integrations' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
