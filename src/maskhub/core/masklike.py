"""What every consumer of a mask's bits needs of it (training, verify, compare): the
:class:`MaskLike` protocol, met by a registered mask, a store read without a registry and
an in-memory dict of arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from maskhub.schemas.metadata import TensorStats

if TYPE_CHECKING:
    import numpy as np


def listing(names: Sequence[str], limit: int = 5) -> str:
    """``a, b, c (+2 more)``: the first ``limit`` names of a list, for messages."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


@runtime_checkable
class MaskLike(Protocol):
    """What training and :func:`~maskhub.training.verify.verify_mask` need of a mask."""

    def tensor_names(self) -> list[str]:
        """Tensor names, in checkpoint order."""
        ...

    def packed(self, name: str) -> np.ndarray:
        """Packed bits of one tensor: uint8, little bit order, 1 = updated (trainable)."""
        ...

    def tensor_stats(self) -> list[TensorStats]:
        """Per-tensor shapes and counts."""
        ...
