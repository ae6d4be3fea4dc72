"""Replaying sparse patches over a base without building a dense target.

The state of a flat space (one tensor, or several of one dtype laid end to end) along a
chain ``base, P1 ... Pn`` is two flat arrays: the current values (a copy of the base's raw
bits, made once, that each patch overwrites where it sets entries) and a flags byte per
entry (updated against the base now, ever updated, outside the final mask). A step reads
and writes them at the patch's positions only: the base's values there (from its
``mmap``), the current values and flags there, the diff kernel on those entries, the
values and flags written back. Everywhere else the weights still hold the base's bits, so
they are updated against the base nowhere and against the previous step nowhere: the
per-step counts of :mod:`maskhub.analytics.trajectory` only need the kernel on the entries
a patch sets. Each step costs ``O(nnz)`` (a few gathers and scatters and two kernel calls);
the ``O(numel)`` work (the copy, the final positions) is done once per chain, and no dense
checkpoint is ever built.

The bits are :class:`~maskhub.kernels.kernel.DiffKernel`'s, on the gathered entries: the
same definition (``|θk − θ0| > tol``, exact, ``±0`` equal, NaN vs NaN unchanged) as a
dense diff, so a chain's counts equal the dense trajectory's of the same weights.

:func:`replay_compiled` (numba; bf16, fp16, fp32) runs the same counts in one pass over the
whole chain. The per-entry state is one word (base bits and current bits, uint32 for 16-bit
dtypes): one cache line per patched entry instead of three (whether the entry is updated
now is decided from the two), fetched a few entries ahead of use. The ever-updated mask is
a packed bitmap (numel / 8 bytes, small enough to stay in cache); the final mask and the
counts outside it come afterwards from a log of the changes of each entry's updated state.
:func:`replay_numpy` is the same in numpy passes (:class:`SparseState`), for a machine
without numba and for small chains.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from maskhub.kernels.kernel import DiffKernel
from maskhub.kernels.threads import available_cpus
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


def count_updated(kernel: DiffKernel, a: np.ndarray, b: np.ndarray, dtype: str) -> int:
    """How many of the gathered entries ``b`` are updated against ``a`` (raw, ``dtype``)."""
    n = int(a.shape[0])
    if n == 0:
        return 0
    return kernel.run_raw(np.ascontiguousarray(a).view(np.uint8),
                          np.ascontiguousarray(b).view(np.uint8), dtype, dtype, n).n_updated


def pack_positions(positions: np.ndarray, numel: int) -> np.ndarray:
    """The packed mask (little bit order) of a tensor whose set entries are ``positions``."""
    bits = np.zeros(numel, dtype=bool)
    bits[positions] = True
    return np.packbits(bits, bitorder=BITORDER)


def _lut16(dtype: str) -> np.ndarray | None:
    """The float64 value of every 16-bit pattern of ``dtype`` (bf16, fp16); ``None`` for
    fp32 (read as float32 in place)."""
    if dtype == "bfloat16":
        return (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype == "float16":
        return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    return None


@dataclass
class StepCounts:
    """One step's counts for one tensor (the columns of ``trajectory_points``)."""

    vs_first: int
    vs_prev: int
    ever: int
    not_in_final: int


class SparseState:
    """A flat space of ``numel`` entries (one tensor, or several of one dtype laid end to
    end) along a chain: its current values and, per entry, updated against the base now
    (flag bit 0), ever updated (bit 1), outside the final mask (bit 2), with the counts of
    each kept up to date.

    ``base``: the base's raw values (unsigned integers of the dtype's width), the space's
    tensors in order; copied once (the base, and the current values). numpy only: the
    compiled replay is :func:`replay_compiled`.

    Use: :meth:`overwrite` with every step's entries gives the final weights in
    :attr:`current`; :meth:`reset` with the final mask (found from them) starts the
    counting pass; :meth:`step` per step.
    """

    def __init__(self, numel: int, dtype: str, base: Sequence[np.ndarray]) -> None:
        """The state at the start of the chain (nothing updated)."""
        self.numel, self.dtype = numel, dtype
        self.base = np.concatenate(base) if len(base) != 1 else np.array(base[0])
        self.current = self.base.copy()
        #: per entry: bit 0 updated against the base now, bit 1 ever, bit 2 outside final
        self.flags = np.zeros(numel, dtype=np.uint8)
        self.n_upd = self.n_ever = self.n_outside = 0

    def overwrite(self, entries: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Write one patch's values into :attr:`current` (no counts: the first pass)."""
        if entries is not None:
            self.current[entries[0]] = entries[1]

    def reset(self, final: np.ndarray | None) -> None:
        """Back to the base, for the counting pass; ``final``: the final mask (bool per
        entry) when known (for ``n_not_in_final``)."""
        np.copyto(self.current, self.base)
        if final is None:
            self.flags[:] = 0
        else:
            np.left_shift(~final, 2, out=self.flags, dtype=np.uint8, casting="unsafe")
        self.n_upd = self.n_ever = self.n_outside = 0

    def step(self, entries: tuple[np.ndarray, np.ndarray] | None,
             kernel: DiffKernel) -> StepCounts:
        """Apply one patch's ``(sorted unique positions, raw values)`` (``None``: the
        patch leaves this space alone)."""
        if entries is None or entries[0].shape[0] == 0:
            return StepCounts(self.n_upd, 0, self.n_ever, self.n_outside)
        p_idx, p_val = entries
        vs_prev = count_updated(kernel, self.current[p_idx], p_val, self.dtype)
        new = diff_entries(kernel, self.base[p_idx], p_val, self.dtype)
        f = self.flags[p_idx]
        old = (f & 1).view(bool)
        outside = (f & 4) != 0
        self.n_upd += int(np.count_nonzero(new)) - int(np.count_nonzero(old))
        self.n_ever += int(np.count_nonzero(new & ((f & 2) == 0)))
        self.n_outside += int(np.count_nonzero(new & outside)) \
            - int(np.count_nonzero(old & outside))
        nb = new.view(np.uint8)
        self.current[p_idx] = p_val
        self.flags[p_idx] = (f & 6) | nb | (nb << 1)
        return StepCounts(self.n_upd, vs_prev, self.n_ever, self.n_outside)

    def updated(self) -> np.ndarray:
        """Updated against the base now (bool per entry)."""
        return (self.flags & 1).view(bool)

    def ever(self) -> np.ndarray:
        """Updated against the base at some step so far (bool per entry)."""
        return (self.flags & 2) != 0


#: Dtypes :func:`replay_compiled` handles.
COMPILED_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class ChainReplay:
    """A chain replayed over one flat space: per step ``k`` (row ``k - 1``) of ``counts``
    the columns of ``trajectory_points`` (updated vs the base, vs the previous step, ever,
    updated and outside the final mask); ``final`` and ``ever``: the space's final and
    ever-updated masks, packed (little bit order, bits past ``numel`` zero)."""

    counts: np.ndarray
    final: np.ndarray
    ever: np.ndarray


#: One patch's entries in a flat space: ``(positions in their tensor, offset of the tensor in
#: the space, raw values)`` per tensor it sets, in the space's order; positions sorted,
#: unique, of any integer dtype.
Step = Sequence[tuple[np.ndarray, int, np.ndarray]]


def _joined(step: Step, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """A step's positions in the space (int64) and values, one array each."""
    parts = [(p, off, v) for p, off, v in step if p.shape[0]]
    if not parts:
        return None
    return (np.concatenate([p.astype(np.int64) + off for p, off, _ in parts]),
            np.concatenate([v for _, _, v in parts]).astype(dtype, copy=False))


def replay_numpy(base: Sequence[np.ndarray], numel: int, dtype: str, steps: Sequence[Step],
                 kernel: DiffKernel) -> ChainReplay:
    """Replay a chain over ``numel`` entries of ``dtype`` whose base values are ``base``
    (raw, the space's tensors in order), one :data:`Step` per patch. Two passes of
    :class:`SparseState`: the final weights (hence the final mask), then the counts."""
    state = SparseState(numel, dtype, base)
    joined = [_joined(st, state.base.dtype) for st in steps]
    for entries in joined:  # pass 1: the final weights, and against the base the final mask
        state.overwrite(entries)
    final = np.zeros(numel, dtype=bool)
    lo = 0
    for part in base:  # the kernel per tensor (its chunks), as a dense diff runs it
        hi = lo + int(part.shape[0])
        if hi > lo:
            d = kernel.run_raw(state.base[lo:hi].view(np.uint8),
                               state.current[lo:hi].view(np.uint8), dtype, dtype, hi - lo)
            final[lo:hi] = np.unpackbits(d.packed, count=hi - lo, bitorder=BITORDER)
        lo = hi
    state.reset(final)
    counts = np.zeros((len(steps), 4), dtype=np.int64)
    for k, entries in enumerate(joined):  # pass 2: the counts of every step
        c = state.step(entries, kernel)
        counts[k] = (c.vs_first, c.vs_prev, c.ever, c.not_in_final)
    return ChainReplay(counts, np.packbits(final, bitorder=BITORDER),
                       np.packbits(state.ever(), bitorder=BITORDER))


#: Entries replayed together by :func:`replay_compiled`: the whole chain runs over one block of
#: the space at a time, so that its state (4 or 8 bytes per entry: 8-16 MiB) stays in the
#: CPU's last-level cache and is reused from block to block (no fresh memory per group).
BLOCK = 1 << 21


def replay_compiled(base: Sequence[np.ndarray], numel: int, dtype: str, steps: Sequence[Step],
                    tol: float, block: int = BLOCK, threads: int | None = None) -> ChainReplay:
    """:func:`replay_numpy` compiled (numba; ``dtype`` one of :data:`COMPILED_DTYPES`): the
    whole chain over one ``block`` of entries (a multiple of 8) after another, one kernel
    call per block, step and tensor, on the patch's arrays where they lie; the same counts
    and masks. ``tol``: the kernel's tolerance. Blocks are independent (their own state, and
    their own bytes of the packed masks), so ``threads`` of them (default: the CPUs this
    process may use) run at once; the kernels release the GIL."""
    from maskhub.kernels.fastkernel import choose_numba_cache

    choose_numba_cache()
    from maskhub.kernels import patchnumba as nb

    if dtype not in COMPILED_DTYPES:
        raise ValueError(f"no compiled replay for {dtype}")
    if block <= 0 or block % 8:
        raise ValueError(f"block {block} is not a positive multiple of 8")
    nbytes = (numel + 7) // 8
    final, ever = np.zeros(nbytes, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)
    with np.errstate(invalid="ignore"):  # NaN patterns: NaN values, as intended
        lut = _lut16(dtype)  # None for fp32 (read as float32 in place)
    fp32 = dtype == "float32"
    bounds = np.arange(0, numel + block, block, dtype=np.int64)
    bounds[-1] = numel
    n_blocks = max(0, bounds.shape[0] - 1)
    # per step, per tensor it sets: where each block's entries start in its positions
    # (one search per tensor, not one per tensor and block)
    pieces = [[(p, off, v.view(np.uint32 if fp32 else np.uint16), _cuts(p, bounds - off))
               for p, off, v in st if p.shape[0]] for st in steps]
    starts = np.cumsum([0, *(int(b.shape[0]) for b in base)]).tolist()
    replay = _BlockReplay(nb, base, starts, pieces, bounds.tolist(), len(steps),
                          min(numel, block), fp32, lut, float(tol), final, ever)
    out = np.zeros((len(steps), 4), dtype=np.int64)
    threads = available_cpus() if threads is None else threads
    if threads <= 1 or n_blocks <= 1:
        for b in range(n_blocks):
            out += replay.run(b)
        return ChainReplay(out, final, ever)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, n_blocks), thread_name_prefix="maskhub-replay") as pool:
        for counts in pool.map(replay.run, range(n_blocks)):
            out += counts
    return ChainReplay(out, final, ever)


def _cuts(positions: np.ndarray, bounds: np.ndarray) -> list[int]:
    """Where each of ``bounds`` (int64) would go in the sorted, non-negative ``positions``;
    searched in the positions' own dtype (int32 in TRL's files), not a widened copy: bounds
    outside ``[0, positions[-1] + 1]`` are clipped to it first, which moves no answer."""
    top = int(positions[-1]) + 1
    if top > np.iinfo(positions.dtype).max:  # the clipped bounds would not fit: widen
        return np.searchsorted(positions.astype(np.int64), bounds).tolist()
    return np.searchsorted(positions, np.clip(bounds, 0, top).astype(positions.dtype)).tolist()


class _BlockReplay:
    """One block of :func:`replay_compiled`'s space replayed along the whole chain; each
    thread keeps its own state and event buffers (:meth:`run` may run on several threads
    at once, each on its own block)."""

    def __init__(self, nb: ModuleType, base: Sequence[np.ndarray], starts: list[int],
                 pieces: list[list[tuple[np.ndarray, int, np.ndarray, list[int]]]],
                 bounds: list[int], n_steps: int, size: int, fp32: bool,
                 lut: np.ndarray | None, tol: float, final: np.ndarray,
                 ever: np.ndarray) -> None:
        self.nb, self.base, self.starts, self.pieces = nb, base, starts, pieces
        self.bounds = bounds
        self.n_steps, self.size, self.fp32, self.lut, self.tol = n_steps, size, fp32, lut, tol
        self.final, self.ever = final, ever
        self.local = threading.local()

    def _buffers(self, n_events: int) -> tuple[np.ndarray, np.ndarray]:
        """This thread's state (one word per entry of a block) and an event log of at least
        ``n_events`` entries (one event at most per patched entry; positions in the block)."""
        loc = self.local
        if getattr(loc, "state", None) is None:
            loc.state = np.empty(self.size, dtype=np.uint64 if self.fp32 else np.uint32)
            loc.events = np.empty(0, dtype=np.int32 if 2 * self.size < 2**31 else np.int64)
        if n_events > loc.events.shape[0]:
            loc.events = np.empty(n_events, dtype=loc.events.dtype)
        return loc.state, loc.events

    def run(self, b: int) -> np.ndarray:
        """Replay the chain over block ``b`` (entries ``bounds[b]:bounds[b + 1]``): its bits
        of the final and ever masks are written, each step's counts over it returned (one
        row per step)."""
        nb = self.nb
        blo, bhi = self.bounds[b], self.bounds[b + 1]
        todo = []  # per step: (positions, offset in the block, values) of its pieces here
        n_here = 0
        for st in self.pieces:
            here = []
            for p, off, v, cuts in st:
                lo, hi = cuts[b], cuts[b + 1]
                if hi > lo:
                    here.append((p[lo:hi], off - blo, v[lo:hi]))
                    n_here += hi - lo
            todo.append(here)
        state, events = self._buffers(n_here)
        pack = nb.pack_state32 if self.fp32 else nb.pack_state16
        for part, lo, hi in zip(self.base, self.starts[:-1], self.starts[1:], strict=True):
            if lo < bhi and hi > blo:
                a, c = max(lo, blo), min(hi, bhi)
                pack(part[a - lo:c - lo], state[a - blo:c - blo])
        ever_b = self.ever[blo // 8:(bhi + 7) // 8]
        final_b = self.final[blo // 8:(bhi + 7) // 8]
        block_out = np.zeros((self.n_steps, 4), dtype=np.int64)
        acc = np.zeros(4, dtype=np.int64)  # updated now, vs the previous step, ever, events
        for k, here in enumerate(todo):
            acc[1] = 0
            for p, off, v in here:
                if self.fp32:
                    nb.replay32(p, off, v, v.view(np.float32), state,
                                state.view(np.float32), ever_b, self.tol, acc, events)
                else:
                    nb.replay16(p, off, v, state, ever_b, self.lut, self.tol, acc, events)
            block_out[k] = acc
        ne = int(acc[3])
        nb.final_from_events(events[:ne], final_b)
        nb.outside_final(events, block_out, final_b)
        return block_out
