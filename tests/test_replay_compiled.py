"""The compiled replay step of ``trajectory --patches`` (issue 22) counts exactly what the numpy
passes count (the kernel's definition of "updated": exact, ±0 equal, NaN vs NaN unchanged,
inf, subnormals), step after step, for bf16, fp16 and fp32, at tol 0 and 1e-5."""

from __future__ import annotations

import numpy as np
import pytest

from maskhub.analytics.patch_replay import SparseState
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


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("tol", [0.0, 1e-5])
def test_compiled_step_equals_numpy(dtype: str, tol: float) -> None:
    rng = np.random.default_rng(3)
    n = 5000
    base = _values(dtype, n, rng)
    kernel = DiffKernel(tol=tol, backend="numpy")
    final = rng.random(n) < 0.3
    states = [SparseState(n, dtype, [base], compiled=c) for c in (False, True)]
    for s in states:
        s.reset(final)
    for _ in range(12):
        idx = np.sort(rng.choice(n, size=700, replace=False)).astype(np.int64)
        vals = _values(dtype, idx.size, rng)
        back = rng.random(idx.size) < 0.2  # some entries return to the base's bits
        vals[back] = base[idx[back]]
        same = rng.random(idx.size) < 0.1  # some keep their current bits
        vals[same] = states[0].current[idx[same]]
        got = [s.step((idx, vals.copy()), kernel) for s in states]
        assert got[0] == got[1]
    assert np.array_equal(states[0].flags, states[1].flags)
    assert np.array_equal(states[0].current, states[1].current)


def test_compiled_strata_equal_numpy() -> None:
    from maskhub.analytics.patch_trajectory import COMPILED_STRATA_MIN, _strata

    rng = np.random.default_rng(4)
    n = COMPILED_STRATA_MIN + 77
    raw = _values("bfloat16", n, rng)
    masks = [rng.random(n) < d for d in (0.01, 0.4)]
    got = _strata(raw.view(np.uint8), "bfloat16", n,
                  *[(m, np.packbits(m, bitorder="little")) for m in masks])
    exp = (raw >> 7) & 0xFF
    for counts, m in zip(got, masks, strict=True):
        assert np.array_equal(counts[0], np.bincount(exp, minlength=256))
        assert np.array_equal(counts[1], np.bincount(exp[m], minlength=256))
