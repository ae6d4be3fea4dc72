"""Replaying sparse patches over a base, one tensor at a time, without a dense target.

The state of a tensor along a chain ``base, P1 ... Pn`` is a sparse map: the sorted flat
positions any patch so far has touched, with their current values and the base's values
there (read from the base's ``mmap`` at those positions only). Everywhere else the tensor
still holds the base's bits, so it is updated against the base nowhere and against the
previous step nowhere: the per-step counts of :mod:`maskhub.analytics.trajectory` only need
the kernel on the entries a patch sets. Each step costs ``O(nnz)`` kernel work plus an
``O(touched)`` merge; no dense checkpoint is ever built.

The bits are :class:`~maskhub.kernels.kernel.DiffKernel`'s, on the gathered entries: the
same definition (``|θk − θ0| > tol``, exact, ``±0`` equal, NaN vs NaN unchanged) as a
dense diff, so a chain's counts equal the dense trajectory's of the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from maskhub.checkpoints.patches import PatchTensor
from maskhub.kernels.kernel import DiffKernel
from maskhub.schemas.metadata import BITORDER


def diff_entries(kernel: DiffKernel, a: np.ndarray, b: np.ndarray, dtype: str) -> np.ndarray:
    """Boolean ``updated`` of ``b`` against ``a``, two raw arrays of gathered entries of
    ``dtype``."""
    n = int(a.shape[0])
    if n == 0:
        return np.zeros(0, dtype=bool)
    d = kernel.run_raw(np.ascontiguousarray(a).view(np.uint8),
                       np.ascontiguousarray(b).view(np.uint8), dtype, dtype, n)
    return np.unpackbits(d.packed, count=n, bitorder=BITORDER).view(bool)


def pack_positions(positions: np.ndarray, numel: int) -> np.ndarray:
    """The packed mask (little bit order) of a tensor whose set entries are ``positions``."""
    bits = np.zeros(numel, dtype=bool)
    bits[positions] = True
    return np.packbits(bits, bitorder=BITORDER)


@dataclass
class StepCounts:
    """One step's counts for one tensor (the columns of ``trajectory_points``)."""

    vs_first: int
    vs_prev: int
    ever: int
    not_in_final: int


@dataclass
class SparseTensorState:
    """Touched positions of one tensor along a chain, with their current and base values,
    and per position: updated against the base now, ever updated, outside the final mask."""

    base: np.ndarray  # the base tensor's raw unsigned view (an mmap: read where indexed)
    dtype: str
    final: np.ndarray | None = None  # sorted positions of the final mask (the second pass)
    idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    val: np.ndarray = field(init=False)
    at_base: np.ndarray = field(init=False)
    upd: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    ever: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    outside: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    n_upd: int = 0
    n_ever: int = 0
    n_outside: int = 0

    def __post_init__(self) -> None:
        self.val = np.zeros(0, self.base.dtype)
        self.at_base = np.zeros(0, self.base.dtype)

    def step(self, pt: PatchTensor | None, kernel: DiffKernel) -> StepCounts:
        """Apply one patch's entries (``None``: the patch leaves the tensor alone)."""
        if pt is None or pt.nnz == 0:
            return StepCounts(self.n_upd, 0, self.n_ever, self.n_outside)
        p_idx, p_val = pt.indices, pt.values
        pos = np.searchsorted(self.idx, p_idx)
        hit = pos < self.idx.shape[0]
        hit[hit] = self.idx[pos[hit]] == p_idx[hit]
        miss = ~hit
        hpos = pos[hit]
        miss_idx = p_idx[miss]
        base_at = np.empty_like(p_val)
        base_at[hit] = self.at_base[hpos]
        miss_base = self.base[miss_idx]
        base_at[miss] = miss_base
        prev = base_at.copy()
        prev[hit] = self.val[hpos]
        vs_prev = int(np.count_nonzero(diff_entries(kernel, prev, p_val, self.dtype)))
        new = diff_entries(kernel, base_at, p_val, self.dtype)
        old = np.zeros_like(new)
        old[hit] = self.upd[hpos]
        old_ever = np.zeros_like(new)
        old_ever[hit] = self.ever[hpos]
        outside = np.zeros_like(new)
        outside[hit] = self.outside[hpos]
        if self.final is not None and miss_idx.size:
            fpos = np.searchsorted(self.final, miss_idx)
            inside = fpos < self.final.shape[0]
            inside[inside] = self.final[fpos[inside]] == miss_idx[inside]
            outside[miss] = ~inside
        self.n_upd += int(np.count_nonzero(new)) - int(np.count_nonzero(old))
        self.n_ever += int(np.count_nonzero(new & ~old_ever))
        self.n_outside += int(np.count_nonzero(new & outside)) \
            - int(np.count_nonzero(old & outside))
        # write the hits in place, insert the misses (both sides sorted: one merge)
        self.val[hpos] = p_val[hit]
        self.upd[hpos] = new[hit]
        self.ever[hpos] = self.ever[hpos] | new[hit]
        if miss_idx.size:
            at = np.searchsorted(self.idx, miss_idx)
            self.idx = np.insert(self.idx, at, miss_idx)
            self.val = np.insert(self.val, at, p_val[miss])
            self.at_base = np.insert(self.at_base, at, miss_base)
            self.upd = np.insert(self.upd, at, new[miss])
            self.ever = np.insert(self.ever, at, new[miss])
            self.outside = np.insert(self.outside, at, outside[miss])
        return StepCounts(self.n_upd, vs_prev, self.n_ever, self.n_outside)

    def updated_positions(self) -> np.ndarray:
        """Sorted positions updated against the base now."""
        return self.idx[self.upd]

    def ever_positions(self) -> np.ndarray:
        """Sorted positions updated against the base at some step so far."""
        return self.idx[self.ever]
