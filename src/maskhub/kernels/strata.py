"""Magnitude strata of a mask: per tensor, how many entries, and how many updated ones, have
each exponent of |θ0|.

In bf16 an entry moves only when its update crosses a rounding point, and the rounding step
doubles with each binade of |θ0|: small weights move, large ones do not. Two runs therefore
overlap on small-magnitude entries by construction; the magnitude-stratified random baseline
of :mod:`maskhub.analytics.overlap_results` keeps each mask's count per tensor *and* per
exponent, so it needs these counts. The stratum of an entry is the exponent field of θ0's
bit pattern (8 bits for bf16 and fp32, which share it, 5 for fp16): the binade, sign
ignored, zero and subnormals in stratum 0, inf/NaN in the top one. Other dtypes have one
stratum, :data:`WHOLE_TENSOR`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from maskhub.kernels import fastkernel
from maskhub.schemas.metadata import BITORDER

#: The stratum of every entry of a tensor whose dtype has no exponent field maskhub reads.
WHOLE_TENSOR = -1
#: Histogram bins (the widest exponent field, 8 bits).
BINS = 256
#: dtype -> (unsigned view, shift, exponent mask) of its bit patterns.
FORMATS = {
    "bfloat16": (np.uint16, 7, 0xFF),
    "float32": (np.uint32, 23, 0xFF),
    "float16": (np.uint16, 10, 0x1F),
}

#: ``fn(base_raw, packed, n, out)``: add one chunk's counts to ``out`` (int64 ``[2, BINS]``:
#: entries and updated entries per stratum; for :data:`WHOLE_TENSOR` dtypes, bin 0).
StrataFn = Callable[[np.ndarray, np.ndarray, int, np.ndarray], None]


def strata_fn(dtype: str, backend: str) -> StrataFn:
    """The function counting strata for a base of ``dtype`` (``backend``: numba or numpy)."""
    fmt = FORMATS.get(dtype)
    if fmt is None:
        def whole(a_raw: np.ndarray, packed: np.ndarray, n: int, out: np.ndarray) -> None:
            out[0, 0] += n
            out[1, 0] += _popcount(packed, n)
        return whole
    view, shift, emask = fmt
    if backend == "numba":
        nk = fastkernel.numba_kernels()
        sh, em = view(shift), view(emask)

        def fast(a_raw: np.ndarray, packed: np.ndarray, n: int, out: np.ndarray) -> None:
            nk.strata_counts(a_raw.view(view), sh, em, packed, n, out)
        return fast

    def plain(a_raw: np.ndarray, packed: np.ndarray, n: int, out: np.ndarray) -> None:
        exp = (a_raw.view(view) >> view(shift)) & view(emask)
        out[0] += np.bincount(exp, minlength=BINS)
        bits = np.unpackbits(packed, count=n, bitorder=BITORDER).view(bool)
        out[1] += np.bincount(exp[bits], minlength=BINS)
    return plain


def _popcount(packed: np.ndarray, n: int) -> int:
    bits = np.unpackbits(packed, count=n, bitorder=BITORDER)
    return int(np.count_nonzero(bits))


def strata_rows(tensor: str, dtype: str, counts: np.ndarray) -> list[tuple[str, int, int, int]]:
    """``(tensor, stratum, numel, n_updated)`` rows of the non-empty strata of ``counts``."""
    if dtype not in FORMATS:
        return [(tensor, WHOLE_TENSOR, int(counts[0, 0]), int(counts[1, 0]))]
    return [(tensor, int(e), int(counts[0, e]), int(counts[1, e]))
            for e in np.flatnonzero(counts[0])]
