"""The numba kernels of :mod:`maskhub.kernels.patchbits` (imported only when used): walk the
set bits of packed masks byte by byte, skipping zero bytes, instead of unpacking every bit.

Compiled on first use and cached on disk like :mod:`maskhub.kernels.numbakernel`; they
release the GIL.
"""

from __future__ import annotations

from numba import njit


@njit(nogil=True, cache=True, boundscheck=False)
def scatter(out, packed, values):  # pragma: no cover - compiled
    """``out[i] = values[k]`` for the k-th set bit i of ``packed`` (little bit order, bits
    past ``len(out)`` ignored); returns the number of values used, or -1 when ``values``
    runs out."""
    n = out.shape[0]
    nv = values.shape[0]
    k = 0
    for j in range(packed.shape[0]):
        b = packed[j]
        if b == 0:
            continue
        base = j * 8
        for bit in range(8):
            if (b >> bit) & 1:
                i = base + bit
                if i >= n:
                    break
                if k >= nv:
                    return -1
                out[i] = values[k]
                k += 1
    return k


@njit(nogil=True, cache=True, boundscheck=False)
def gather(src, packed, out):  # pragma: no cover - compiled
    """``out[k] = src[i]`` for the k-th set bit i of ``packed``; returns how many (``out``
    holds at least ``len(src)`` entries)."""
    n = src.shape[0]
    k = 0
    for j in range(packed.shape[0]):
        b = packed[j]
        if b == 0:
            continue
        base = j * 8
        for bit in range(8):
            if (b >> bit) & 1:
                i = base + bit
                if i >= n:
                    break
                out[k] = src[i]
                k += 1
    return k
