"""What a registered mask is: its row of the ``masks`` table, and its store, opened on first
use. Reading the row costs one SQL query; reading the bits imports zarr (only then)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskhub.schemas.metadata import MaskMetadata, TensorStats

if TYPE_CHECKING:
    import numpy as np

    from maskhub.storage.store import MaskStore


class MaskRecord:
    """A registered mask: its metadata, per-tensor stats and bits (see :class:`maskhub.Mask`,
    which adds torch and Hub conveniences)."""

    def __init__(self, registry: Any, row: dict[str, Any], path: Path | str) -> None:
        """Built by :meth:`maskhub.core.home.Home.get`: ``registry`` is the home it belongs
        to, ``row`` the mask's row of the ``masks`` table, ``path`` its store."""
        self.registry = registry
        self.row = row
        self.id: str = row["id"]
        self.name: str = row["name"]
        #: The store: a directory under the home, or a URL (``s3://...``) for a remote store.
        self.path: Path | str = path
        self._store: MaskStore | None = None
        #: True when a ``diff`` found this mask already registered and returned it.
        self.reused = False

    @property
    def store(self) -> MaskStore:
        """The Zarr store, opened on first use."""
        if self._store is None:
            from maskhub.storage.store import MaskStore

            self._store = MaskStore(self.path)
        return self._store

    @property
    def metadata(self) -> MaskMetadata:
        """Metadata as stored with the bits (hub fields come from the index)."""
        return self.store.metadata

    @property
    def n_params(self) -> int:
        """Parameters covered by the mask."""
        return int(self.row["n_params"])

    @property
    def n_updated(self) -> int:
        """Parameters marked updated."""
        return int(self.row["n_updated"])

    @property
    def sparsity(self) -> float:
        """1 - density."""
        return float(self.row["sparsity"])

    @property
    def density(self) -> float:
        """Fraction of parameters updated."""
        return self.n_updated / self.n_params if self.n_params else 0.0

    def tensor_names(self) -> list[str]:
        """Tensor names in checkpoint order."""
        return list(self.store.names)

    def tensor_stats(self) -> list[TensorStats]:
        """Per-tensor stats in checkpoint order."""
        return list(self.store.iter_stats())

    def __getitem__(self, tensor: str) -> np.ndarray:
        """Boolean mask of one tensor, shaped like the parameter."""
        if tensor not in self.store.names:
            raise KeyError(tensor)
        return self.store.unpacked(tensor)

    def packed(self, tensor: str) -> np.ndarray:
        """Packed bits of one tensor (uint8, little bit order)."""
        return self.store.packed(tensor)

    def __repr__(self) -> str:
        return (f"Mask(name={self.name!r}, id={self.id[:12]!r}, "
                f"sparsity={self.sparsity:.2%}, n_params={self.n_params})")
