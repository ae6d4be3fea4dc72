"""What the diff pipeline counts per chunk once the chunk's bits are known: the magnitude
strata (:mod:`maskhub.kernels.strata`) and the largest ``|Δ|`` over the updated entries
(:mod:`maskhub.kernels.precision`).

Both walk the chunk's updated entries; with numba they do it in one walk
(:func:`~maskhub.kernels.numbakernel.updated_walk`: each set bit visited once, θ0's pattern
loaded once), which costs about two thirds of the two walks it replaces. The results are
those of :func:`~maskhub.kernels.strata.strata_fn` and
:func:`~maskhub.kernels.precision.delta_max_fn`, bit for bit (a test checks it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from maskhub.kernels import fastkernel
from maskhub.kernels.precision import DELTA_KINDS, DELTA_VIEWS, delta_max_fn
from maskhub.kernels.strata import FORMATS as STRATA_FORMATS
from maskhub.kernels.strata import strata_fn

#: ``fn(a_raw, b_raw, packed, n, out)``: add one chunk's strata counts to ``out`` (as a
#: :data:`~maskhub.kernels.strata.StrataFn`) and return the chunk's largest ``|Δ|`` over its
#: set bits, or None for a dtype pair without one.
ChunkStatsFn = Callable[[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray], "float | None"]


def has_delta(a_dtype: str, b_dtype: str) -> bool:
    """Whether the pair has a largest ``|Δ|`` (both bf16, fp16 or fp32)."""
    return a_dtype in DELTA_KINDS and b_dtype in DELTA_KINDS


def chunk_stats_fn(a_dtype: str, b_dtype: str, backend: str, entries: bool = True
                   ) -> ChunkStatsFn:
    """The per-chunk strata and ``|Δ|`` function of a ``a_dtype -> b_dtype`` pair
    (``backend``: numba or numpy; ``entries=False``: the histogram of entries is known
    already, count the updated ones only)."""
    fmt = STRATA_FORMATS.get(a_dtype)
    if backend == "numba" and fmt is not None and has_delta(a_dtype, b_dtype):
        nk = fastkernel.numba_kernels()
        view, shift, emask = fmt
        sh, em = view(shift), view(emask)
        vb = DELTA_VIEWS[b_dtype]
        ka, kb = DELTA_KINDS[a_dtype], DELTA_KINDS[b_dtype]

        def fused(a_raw: np.ndarray, b_raw: np.ndarray, packed: np.ndarray, n: int,
                  out: np.ndarray) -> float | None:
            a = a_raw.view(view)
            if entries:
                nk.strata_entries(a, sh, em, n, out)
            return float(nk.updated_walk(a, b_raw.view(vb), ka, kb, sh, em, packed, n, out,
                                         True))
        return fused
    sfn = strata_fn(a_dtype, backend, entries)
    dfn = delta_max_fn(a_dtype, b_dtype, backend)

    def separate(a_raw: np.ndarray, b_raw: np.ndarray, packed: np.ndarray, n: int,
                 out: np.ndarray) -> float | None:
        sfn(a_raw, packed, n, out)
        return None if dfn is None else dfn(a_raw, b_raw, packed, n)
    return separate
