"""Where a training run's mask comes from: anything with packed bits per tensor.

A :class:`MaskLike` is what :func:`~maskhub.training.masking.apply_mask` and
:func:`~maskhub.training.verify.verify_mask` read; :func:`resolve_mask` turns a registered
mask, a store directory, a Hub repo id or a dict of arrays into one. Nothing here imports
torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from maskhub.checkpoints.sources import looks_like_path
from maskhub.core.home import Home
from maskhub.core.masklike import MaskLike, listing  # noqa: F401  (re-exported)
from maskhub.errors import UsageError
from maskhub.schemas.metadata import BITORDER, TensorStats


class StoreMask:
    """A mask store directory (for instance a pulled Hub snapshot) read without a registry."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open the Zarr mask store at ``path``."""
        from maskhub.storage.store import MaskStore

        self.store = MaskStore(Path(path))
        self.name = self.store.metadata.name

    def tensor_names(self) -> list[str]:
        """Tensor names in checkpoint order."""
        return list(self.store.names)

    def packed(self, name: str) -> np.ndarray:
        """Packed bits of one tensor."""
        return self.store.packed(name)

    def tensor_stats(self) -> list[TensorStats]:
        """Per-tensor stats in checkpoint order."""
        return list(self.store.iter_stats())


class DictMask:
    """An in-memory mask from ``{name: boolean array or tensor}``, held packed (1 bit each)."""

    def __init__(self, masks: Mapping[str, Any], name: str = "in-memory") -> None:
        """Pack each boolean array of ``masks`` (True = trainable)."""
        self.name = name
        self._packed: dict[str, np.ndarray] = {}
        self._stats: list[TensorStats] = []
        for key, value in masks.items():
            if hasattr(value, "detach"):  # a torch tensor (torch is not imported here)
                value = value.detach().cpu().numpy()
            arr = np.asarray(value).astype(bool, copy=False)
            packed = np.packbits(arr.reshape(-1), bitorder=BITORDER)
            self._packed[key] = packed
            self._stats.append(TensorStats(key, tuple(arr.shape), arr.size, int(arr.sum())))

    def tensor_names(self) -> list[str]:
        """Tensor names in insertion order."""
        return list(self._packed)

    def packed(self, name: str) -> np.ndarray:
        """Packed bits of one tensor."""
        return self._packed[name]

    def tensor_stats(self) -> list[TensorStats]:
        """Per-tensor shapes and counts."""
        return list(self._stats)


def resolve_mask(spec: Any, home: str | os.PathLike[str] | None = None) -> MaskLike:
    """Turn a mask given in any accepted form into a :class:`MaskLike`.

    ``spec``: a :class:`~maskhub.Mask` (or anything with ``tensor_names``, ``packed`` and
    ``tensor_stats``); a mapping ``{name: bool array}``; a path to a mask store directory; a
    Hub repo id ``org/name[@revision]`` (fetched with ``maskhub.Mask.from_hub``); or the name
    or id prefix of a mask in the registry at ``home``.
    """
    if isinstance(spec, MaskLike):
        return spec
    if isinstance(spec, Mapping):
        return DictMask(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise UsageError(f"cannot use {type(spec).__name__} as a mask: give a Mask, a registry "
                         "name, a Hub repo id or a mask store path")
    text = str(spec)
    if Path(text).expanduser().exists():
        return StoreMask(Path(text).expanduser())
    if isinstance(spec, os.PathLike) or looks_like_path(text):
        raise UsageError(f"{text}: no such mask store directory")
    if "/" in text:
        from maskhub.hub.pull import pull  # the Hub part of the package; only when used

        return pull(Home(home), text).mask
    return Home(home).get(text)
