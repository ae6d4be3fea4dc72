"""Train only a mask's subnetwork with PyTorch: ``from maskhub.torch import apply_mask``.

Example::

    from maskhub import Registry
    from maskhub.torch import apply_mask

    mask = Registry().get("tulu-dpo")
    handle = apply_mask(model, mask)        # after DDP / fully_shard, before training
    ...                                     # any loop, any torch.optim optimizer
    handle.remove()

See :mod:`maskhub.training.masking` and docs/training.md.
"""

from maskhub.training.masked_optim import MaskedAdamW, MaskedSGD
from maskhub.training.masking import (
    DictMask,
    MaskedParameter,
    MaskHandle,
    MaskLike,
    StoreMask,
    apply_mask,
    canonical_name,
    match_parameters,
    resolve_mask,
    unwrap_model,
)
from maskhub.training.recorder import Recorder

__all__ = [
    "DictMask",
    "MaskedAdamW",
    "MaskedSGD",
    "MaskHandle",
    "MaskLike",
    "MaskedParameter",
    "Recorder",
    "StoreMask",
    "apply_mask",
    "canonical_name",
    "match_parameters",
    "resolve_mask",
    "unwrap_model",
]
