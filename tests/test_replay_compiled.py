"""The compiled replay of ``trajectory --patches`` (issue 22) counts exactly what the numpy
passes count (the kernel's definition of "updated": exact, ±0 equal, NaN vs NaN unchanged,
inf, subnormals), step after step, for bf16, fp16 and fp32, at tol 0 and 1e-5."""

from __future__ import annotations

import numpy as np
import pytest

from maskhub.analytics.patch_replay import BLOCK, replay_compiled, replay_numpy
from maskhub.kernels.kernel import DiffKernel

SPECIAL = {  # bit patterns: +0, -0, +inf, -inf, NaN, another NaN, smallest subnormal, 1e-6-ish
    "bfloat16": [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7FC1, 0x0001, 0x3586],
    "float16": [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7E01, 0x0001, 0x0011],
    "float32": [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FC00001, 1, 0x358637BD],
}


def _values(dtype: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if dtype == "float32":
        v = (rng.standard_normal(n).astype(np.float32) * 0.02).view(np.uint32)
    else:
        f = rng.standard_normal(n).astype(np.float32) * np.float32(0.02)
        v = (f.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" \
            else f.astype(np.float16).view(np.uint16)
    special = np.array(SPECIAL[dtype], dtype=v.dtype)
    pick = rng.random(n) < 0.1
    v[pick] = special[rng.integers(0, special.size, int(pick.sum()))]
    return v


def _chain(dtype: str, sizes: list[int], steps: int, rng: np.random.Generator
           ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """A base of tensors ``sizes`` and ``steps`` patches: sorted unique positions, values
    with specials, some back to the base's bits, some equal to the current ones, one step
    empty."""
    base = [_values(dtype, n, rng) for n in sizes]
    flat = np.concatenate(base)
    current = flat.copy()
    n = flat.size
    idx_parts, val_parts, bounds = [], [], [0]
    for k in range(steps):
        size = 0 if k == 3 else int(rng.integers(1, n // 3))
        idx = np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)
        vals = _values(dtype, idx.size, rng)
        back = rng.random(idx.size) < 0.2  # some entries return to the base's bits
        vals[back] = flat[idx[back]]
        same = rng.random(idx.size) < 0.1  # some keep their current bits
        vals[same] = current[idx[same]]
        current[idx] = vals
        idx_parts.append(idx)
        val_parts.append(vals)
        bounds.append(bounds[-1] + idx.size)
    return (base, np.concatenate(idx_parts), np.concatenate(val_parts),
            np.array(bounds, dtype=np.int64))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("tol", [0.0, 1e-5])
def test_compiled_replay_equals_numpy(dtype: str, tol: float) -> None:
    pytest.importorskip("numba")  # without it, trajectory --patches runs the numpy passes
    rng = np.random.default_rng(3)
    sizes = [1003, 2000, 5, 1997]  # tensors not on byte boundaries of the packed masks
    base, idx, val, bounds = _chain(dtype, sizes, 14, rng)
    n = sum(sizes)
    kernel = DiffKernel(tol=tol, backend="numpy")
    offsets = np.cumsum([0, *sizes])
    steps = []  # each step split by tensor, positions within it (int32, as TRL stores them)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        cut = np.searchsorted(idx[lo:hi], offsets) + lo
        steps.append([((idx[a:b] - off).astype(np.int32), int(off), val[a:b])
                      for a, b, off in zip(cut[:-1], cut[1:], offsets[:-1], strict=True)])
    ref = replay_numpy(base, n, dtype, steps, kernel)
    for block in (BLOCK, 1024, 800, 8):  # the space in one block, or in several
        for threads in (1, 2, 3):  # blocks one after another, or several at once
            got = replay_compiled(base, n, dtype, steps, tol, block=block, threads=threads)
            assert np.array_equal(ref.counts, got.counts), (block, threads)
            assert np.array_equal(ref.final, got.final), (block, threads)
            assert np.array_equal(ref.ever, got.ever), (block, threads)
    # the counts mean something: updates, cancellations, entries outside the final mask
    assert ref.counts[:, 0].min() > 0 and ref.counts[:, 3].max() > 0
    assert ref.counts[-1, 2] > ref.counts[-1, 0]
    # and the reference is the dense definition: the final mask is the kernel's diff of
    # the final weights, the first step's count the diff of its weights
    flat = np.concatenate(base)
    final = flat.copy()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        final[idx[lo:hi]] = val[lo:hi]
    d = kernel.run_raw(flat.view(np.uint8), final.view(np.uint8), dtype, dtype, n)
    assert np.array_equal(np.unpackbits(ref.final, count=n, bitorder="little"),
                          np.unpackbits(d.packed, count=n, bitorder="little"))
    first = flat.copy()
    first[idx[:bounds[1]]] = val[:bounds[1]]
    assert ref.counts[0, 0] == kernel.run_raw(flat.view(np.uint8), first.view(np.uint8),
                                              dtype, dtype, n).n_updated


def test_slice_bits() -> None:
    from maskhub.analytics.patch_trajectory import slice_bits

    rng = np.random.default_rng(5)
    bits = rng.random(203) < 0.5
    packed = np.packbits(bits, bitorder="little")
    for lo, hi in [(0, 203), (0, 13), (8, 200), (3, 3), (5, 190), (17, 203), (9, 10)]:
        want = np.packbits(bits[lo:hi], bitorder="little")
        assert np.array_equal(slice_bits(packed, lo, hi), want), (lo, hi)


@pytest.mark.parametrize("compiled", [True, False])
def test_compiled_strata_equal_numpy(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from maskhub.analytics import patch_trajectory
    from maskhub.analytics.patch_trajectory import COMPILED_STRATA_MIN, _strata

    if not compiled:  # the numpy counts, as on a machine without numba
        monkeypatch.setattr(patch_trajectory, "HAVE_NUMBA", False)
    rng = np.random.default_rng(4)
    n = COMPILED_STRATA_MIN + 77
    raw = _values("bfloat16", n, rng)
    masks = [rng.random(n) < d for d in (0.01, 0.4)]
    got = _strata(raw.view(np.uint8), "bfloat16", n,
                  *[np.packbits(m, bitorder="little") for m in masks])
    exp = (raw >> 7) & 0xFF
    for counts, m in zip(got, masks, strict=True):
        assert np.array_equal(counts[0], np.bincount(exp, minlength=256))
        assert np.array_equal(counts[1], np.bincount(exp[m], minlength=256))


def test_block_cuts_in_the_positions_dtype() -> None:
    """The blocks' bounds are searched in the positions' own dtype, with the same answers as
    a search in int64, up to the dtype's largest position."""
    from maskhub.analytics.patch_replay import _cuts

    for dt in (np.int16, np.uint16, np.int32, np.uint32, np.int64):
        top = min(int(np.iinfo(dt).max), 40000)
        p = np.array([0, 5, 9, top], dtype=dt)
        bounds = np.array([-20, 0, 5, 6, 9, 10, top, top + 1, 10**6], dtype=np.int64)
        assert _cuts(p, bounds) == [0, 0, 1, 2, 2, 3, 3, 4, 4], dt
