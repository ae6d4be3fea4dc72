"""Versioned metadata of a mask, stored in the Zarr group attributes and mirrored in SQL."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

#: Version of the on-disk mask format. Readers refuse stores with a newer version.
FORMAT_VERSION = 1
#: Marker stored in the group attributes so that a maskhub store can be told from any Zarr group.
STORE_KIND = "maskhub.mask"
#: Bit order of the packed arrays (``numpy.packbits(..., bitorder=BITORDER)``).
BITORDER = "little"


@dataclass(frozen=True)
class TensorStats:
    """Per-tensor counts of one mask."""

    tensor: str
    shape: tuple[int, ...]
    numel: int
    n_updated: int
    layer: int | None = None
    module: str = ""
    base_dtype: str = ""
    target_dtype: str = ""
    #: The largest ``|θ1 − θ0|`` over the updated entries (None: not a float pair, or not
    #: measured); and the precision null (:mod:`maskhub.kernels.precision`): entries that could
    #: not have changed at the mask's budget, and how many of those are updated anyway.
    max_abs_delta: float | None = None
    n_null: int | None = None
    n_null_updated: int | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of entries not updated (1.0 for an empty tensor)."""
        return 1.0 - (self.n_updated / self.numel) if self.numel else 1.0

    @property
    def sparsity_movable(self) -> float | None:
        """Sparsity among the entries outside the precision null (None: no null known, or
        no entry could move)."""
        if self.n_null is None or self.n_null >= self.numel:
            return None
        movable = self.numel - self.n_null
        return 1.0 - (self.n_updated - (self.n_null_updated or 0)) / movable

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (lists, not tuples)."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorStats:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["shape"] = tuple(int(s) for s in kw.get("shape", ()))
        return cls(**kw)


@dataclass(frozen=True)
class MaskMetadata:
    """Everything known about a mask apart from its bits.

    ``tol`` is the tolerance of the stored mask: a parameter is updated iff
    ``|target - base| > tol``. ``sweep`` is the list of extra tolerances whose
    per-tensor counts were recorded in the same pass.
    """

    id: str
    name: str
    base_model: str
    target_model: str
    n_params: int
    n_updated: int
    tol: float = 1e-5
    base_revision: str | None = None
    target_revision: str | None = None
    algorithm: str | None = None
    seed: int | None = None
    dataset: str | None = None
    dtype: str = ""
    created_at: str = ""
    hub_repo: str | None = None
    hub_revision: str | None = None
    tags: tuple[str, ...] = ()
    sweep: tuple[float, ...] = ()
    parents: tuple[str, ...] = ()
    operation: str | None = None
    notes: str | None = None
    # Content identity (:mod:`maskhub.checkpoints.fingerprint`): "xxh3-128:<hex>" of the
    # compared tensors of each side; None for masks made before, or not by a diff.
    base_fingerprint: str | None = None
    target_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    #: A patch: the store also holds the target's values at the set bits (``values/``).
    has_values: bool = False

    @property
    def sparsity(self) -> float:
        """1 - n_updated / n_params (a fraction in [0, 1])."""
        return 1.0 - (self.n_updated / self.n_params) if self.n_params else 1.0

    @property
    def density(self) -> float:
        """n_updated / n_params (a fraction in [0, 1])."""
        return self.n_updated / self.n_params if self.n_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, with ``kind`` so that readers can recognise a maskhub store."""
        d = asdict(self)
        for key in ("tags", "sweep", "parents"):
            d[key] = list(d[key])
        d["kind"] = STORE_KIND
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MaskMetadata:
        """Inverse of :meth:`to_dict`. Raises ``ValueError`` for a missing required key."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        missing = [k for k in ("id", "name", "base_model", "target_model", "n_params",
                               "n_updated") if k not in kw]
        if missing:
            raise ValueError(f"mask metadata lacks {', '.join(missing)}")
        for key in ("tags", "parents"):
            kw[key] = tuple(kw.get(key) or ())
        kw["sweep"] = tuple(float(t) for t in kw.get("sweep") or ())
        kw["extra"] = dict(kw.get("extra") or {})
        kw["has_values"] = bool(kw.get("has_values", False))
        return cls(**kw)


#: The mask algebra of ``combine``, as recorded in ``masks.operation``.
COMBINE_OPERATIONS = ("intersect", "union", "difference", "consensus")
