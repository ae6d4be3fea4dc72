"""A ``transformers.TrainerCallback`` that trains only a mask's subnetwork.

Works for ``Trainer`` and the TRL trainers (DPO, GRPO, PPO... subclass ``Trainer``)::

    from maskhub.integrations.transformers import MaskCallback

    trainer = DPOTrainer(..., callbacks=[MaskCallback("org/tulu-dpo-mask")])

The mask is applied at ``on_train_begin``, after the Trainer has wrapped the model (DDP,
FSDP2) and built its optimizer, and removed at ``on_train_end``.
"""

from __future__ import annotations

import os
from typing import Any

from maskhub.errors import UsageError
from maskhub.training.masking import MaskHandle, apply_mask, resolve_mask

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("maskhub.integrations.transformers needs transformers: "
                      "pip install 'maskhub[train]'") from exc


class MaskCallback(TrainerCallback):
    """Apply a mask (gradient masking + exact freeze) to the Trainer's model at train begin.

    ``mask``: a :class:`~maskhub.Mask`, a registry name or id prefix, a Hub repo id
    ``org/name[@revision]`` (fetched with ``maskhub.Mask.from_hub``), a mask store path or a
    ``{name: bool array}`` mapping. ``home``: the registry for names (default
    ``$MASKHUB_HOME``). Other keyword arguments go to :func:`maskhub.torch.apply_mask`
    (``exact``, ``snapshot_device``, ``strip_prefix``, ``add_prefix``, ``name_map``,
    ``missing``, ``extra``).
    """

    def __init__(self, mask: Any, *, home: str | os.PathLike[str] | None = None,
                 **apply_kwargs: Any) -> None:
        """Remember what to apply; nothing is loaded until training begins."""
        self.mask = mask
        self.home = home
        self.apply_kwargs = apply_kwargs
        self.handle: MaskHandle | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        """Resolve the mask and apply it to ``model``."""
        if model is None:
            raise UsageError("MaskCallback got no model at train begin")
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        source = resolve_mask(self.mask, self.home)
        self.handle = apply_mask(model, source, **self.apply_kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remove the hooks and free the mask and snapshot."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
