"""The scatter plans of ``maskhub apply`` (issue 22): values written straight at the positions
a byte-gap code or packed bits name, chunk by chunk, equal numpy's ``flat[idx] = values`` at
every density and at chunk edges, on the compiled path (large tensors) and the numpy one
(small tensors); a damaged gap code is refused before anything is written."""

from __future__ import annotations

import numpy as np
import pytest

from maskhub.kernels.patchbits import NUMBA_MIN, GapScatter, PackedScatter
from maskhub.storage import gapcode

CHUNK = 4096


def _cases(numel: int) -> list[np.ndarray]:
    rng = np.random.default_rng(numel)
    out = [np.zeros(numel, bool), np.ones(numel, bool)]
    for d in (0.0003, 0.004, 0.05, 0.3):  # gaps past 255 (escape runs across chunks) to dense
        out.append(rng.random(numel) < d)
    edges = np.zeros(numel, bool)  # set bits on both sides of every chunk edge, and the last
    for lo in range(CHUNK, numel, CHUNK):
        edges[[lo - 1, lo]] = True
    edges[[0, numel - 1]] = True
    out.append(edges)
    lone = np.zeros(numel, bool)  # one set bit far past the first chunks (a long escape run)
    lone[numel - 3] = True
    out.append(lone)
    return out


def _apply(plan: GapScatter | PackedScatter, base: np.ndarray, values: np.ndarray
           ) -> np.ndarray:
    out = base.copy()
    for c, lo in enumerate(range(0, out.shape[0], CHUNK)):
        plan.scatter(c, out[lo:lo + CHUNK], values)
    return out


@pytest.mark.parametrize("numel", [NUMBA_MIN + 12_345, 9_001], ids=["compiled", "numpy"])
def test_scatter_plans_equal_numpy(numel: int) -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 1 << 16, size=numel, dtype=np.uint16)
    for mask in _cases(numel):
        idx = np.flatnonzero(mask)
        values = rng.integers(0, 1 << 16, size=idx.size, dtype=np.uint16)
        want = base.copy()
        want[idx] = values
        packed = np.packbits(mask, bitorder="little")
        codes = gapcode.encode(packed, numel)
        for plan in (GapScatter(codes, numel, CHUNK), PackedScatter(packed, numel, CHUNK)):
            assert plan.total == idx.size
            assert [plan.count(c) for c in range(-(-numel // CHUNK))] == [
                int(mask[lo:lo + CHUNK].sum()) for lo in range(0, numel, CHUNK)]
            assert np.array_equal(_apply(plan, base, values), want), type(plan).__name__


@pytest.mark.parametrize("numel", [NUMBA_MIN + 5, 300], ids=["compiled", "numpy"])
def test_damaged_gap_code_refused(numel: int) -> None:
    beyond = gapcode.codes_of_indices(np.array([3, numel]))  # names entry numel: outside
    with pytest.raises(ValueError, match=f"does not fit {numel} entries|names entry {numel} "):
        GapScatter(beyond, numel, CHUNK)
    with pytest.raises(ValueError, match="escape byte|does not fit"):
        GapScatter(np.array([4, 255], np.uint8), numel, CHUNK)
