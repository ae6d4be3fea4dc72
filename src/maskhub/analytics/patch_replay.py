"""Replaying sparse patches over a base without building a dense target.

The state of a flat space (one tensor, or several of one dtype laid end to end) along a
chain ``base, P1 ... Pn`` is a sparse map: the positions any patch so far has touched (in
the order first touched), with their current values and a flags byte each, and a slot
table (``int32`` per entry, ``-1`` for untouched) that finds a position's row in O(1); the
base's values are read (from its ``mmap``) at the patched positions only. Everywhere else
the weights still hold the base's bits, so they are updated against the base nowhere and
against the previous step nowhere: the per-step counts of
:mod:`maskhub.analytics.trajectory` only need the kernel on the entries a patch sets. Each
step costs ``O(nnz)`` (kernel, lookups, appends); no dense checkpoint is ever built.

The bits are :class:`~maskhub.kernels.kernel.DiffKernel`'s, on the gathered entries: the
same definition (``|θk − θ0| > tol``, exact, ``±0`` equal, NaN vs NaN unchanged) as a
dense diff, so a chain's counts equal the dense trajectory's of the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

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


def final_positions(steps: list[tuple[np.ndarray, np.ndarray] | None], numel: int,
                    raw: np.dtype | type, gather: Callable[[np.ndarray], np.ndarray],
                    dtype: str, kernel: DiffKernel) -> np.ndarray:
    """Sorted positions updated against the base after the whole chain ``steps`` (each
    ``(sorted unique positions, raw values)`` or ``None``): the last value each touched
    position was given (a scratch of ``numel`` values, written in step order so that the
    last patch wins), against the base there (``gather(positions)``; one kernel call)."""
    given = [st for st in steps if st is not None and st[0].shape[0]]
    if not given:
        return np.zeros(0, np.int64)
    touched = np.zeros(numel, dtype=bool)
    last = np.empty(numel, dtype=raw)
    for idx, val in given:
        touched[idx] = True
        last[idx] = val
    idx = np.flatnonzero(touched)
    return idx[diff_entries(kernel, gather(idx), last[idx], dtype)]


@dataclass
class StepCounts:
    """One step's counts for one tensor (the columns of ``trajectory_points``)."""

    vs_first: int
    vs_prev: int
    ever: int
    not_in_final: int


class _Column:
    """A growable 1-D array (amortised appends)."""

    def __init__(self, dtype: np.dtype | type, capacity: int = 1024) -> None:
        self.a = np.zeros(max(1, capacity), dtype=dtype)

    def reserve(self, n: int) -> np.ndarray:
        """The array with room for ``n`` rows."""
        if n > self.a.shape[0]:
            grown = np.zeros(max(n, 2 * self.a.shape[0]), dtype=self.a.dtype)
            grown[:self.a.shape[0]] = self.a
            self.a = grown
        return self.a


class SparseState:
    """Touched positions of a flat space of ``numel`` entries (one tensor, or several of
    one dtype laid end to end) along a chain, with their current and base values, and per
    position: updated against the base now, ever updated, outside the final mask.

    ``gather(sorted positions)``: the base's raw values there (from an ``mmap``: read only
    where asked); ``raw``: their unsigned dtype; ``final``: sorted positions of the final
    mask when known (for ``n_not_in_final``); ``capacity``: rows to reserve (the number of
    positions the chain touches at most).
    """

    def __init__(self, numel: int, dtype: str, raw: np.dtype | type,
                 gather: Callable[[np.ndarray], np.ndarray],
                 final: np.ndarray | None = None, capacity: int = 1024) -> None:
        self.numel, self.dtype, self.gather = numel, dtype, gather
        self.slot: np.ndarray | None = None  # int32[numel], made on the first touch
        self.final: np.ndarray | None = None  # bool[numel]: in the final mask
        if final is not None:
            self.final = np.zeros(numel, dtype=bool)
            self.final[final] = True
        self.n = 0
        self._idx = _Column(np.int64, capacity)
        self._val = _Column(raw, capacity)
        #: per row: bit 0 updated against the base now, bit 1 ever, bit 2 outside final
        self._flags = _Column(np.uint8, capacity)
        self.n_upd = self.n_ever = self.n_outside = 0

    def step(self, entries: tuple[np.ndarray, np.ndarray] | None,
             kernel: DiffKernel) -> StepCounts:
        """Apply one patch's ``(sorted unique positions, raw values)`` (``None``: the
        patch leaves this space alone)."""
        if entries is None or entries[0].shape[0] == 0:
            return StepCounts(self.n_upd, 0, self.n_ever, self.n_outside)
        if self.slot is None:
            self.slot = np.full(self.numel, -1, dtype=np.int32 if self.numel < 2**31
                                else np.int64)
        p_idx, p_val = entries
        s = self.slot[p_idx]
        hit = s >= 0
        hpos = s[hit]
        miss = ~hit
        m, n0 = int(p_idx.shape[0] - hpos.shape[0]), self.n
        n1 = n0 + m
        idx, val, flags = (c.reserve(n1) for c in (self._idx, self._val, self._flags))
        base_at = self.gather(p_idx)
        prev = base_at.copy()
        prev[hit] = val[hpos]
        vs_prev = int(np.count_nonzero(diff_entries(kernel, prev, p_val, self.dtype)))
        new = diff_entries(kernel, base_at, p_val, self.dtype)
        f = np.zeros(p_idx.shape[0], dtype=np.uint8)
        f[hit] = flags[hpos]
        if m and self.final is not None:
            f[miss] = np.where(self.final[p_idx[miss]], 0, 4).astype(np.uint8)
        old = (f & 1).view(bool)
        outside = (f & 4) != 0
        self.n_upd += int(np.count_nonzero(new)) - int(np.count_nonzero(old))
        self.n_ever += int(np.count_nonzero(new & ((f & 2) == 0)))
        self.n_outside += int(np.count_nonzero(new & outside)) \
            - int(np.count_nonzero(old & outside))
        nb = new.view(np.uint8)
        f = (f & 6) | nb | (nb << 1)
        val[hpos] = p_val[hit]
        flags[hpos] = f[hit]
        if m:
            rows = slice(n0, n1)
            idx[rows], val[rows], flags[rows] = p_idx[miss], p_val[miss], f[miss]
            self.slot[idx[rows]] = np.arange(n0, n1, dtype=self.slot.dtype)
            self.n = n1
        return StepCounts(self.n_upd, vs_prev, self.n_ever, self.n_outside)

    def _positions(self, bit: int) -> np.ndarray:
        rows = (self._flags.a[:self.n] & bit) != 0
        bits = np.zeros(self.numel, dtype=bool)  # a scatter and a scan beat a sort here
        bits[self._idx.a[:self.n][rows]] = True
        return np.flatnonzero(bits)

    def updated_positions(self) -> np.ndarray:
        """Sorted positions updated against the base now."""
        return self._positions(1)

    def ever_positions(self) -> np.ndarray:
        """Sorted positions updated against the base at some step so far."""
        return self._positions(2)
