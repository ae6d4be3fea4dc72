"""The numba kernels of :mod:`maskhub.storage.gapcode` (imported only for large tensors).

Both scan their input once (about 1 GB/s on one core); compiled on first use and cached on
disk like :mod:`maskhub.kernels.numbakernel`, and both release the GIL.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True, boundscheck=False)
def encode_gaps(packed, numel, out):  # pragma: no cover - compiled
    """Write the byte-gap code of the first ``numel`` bits of ``packed`` (little bit order)
    into ``out`` (at least ``n_set + numel // 255 + 1`` bytes); return the bytes written."""
    pos = 0
    gap = 0
    nbytes = packed.shape[0]
    for k in range(nbytes):
        b = packed[k]
        if k == nbytes - 1 and numel % 8:
            b &= np.uint8((1 << (numel % 8)) - 1)
        if b == 0:
            gap += 8
            continue
        for j in range(8):
            if (b >> j) & 1:
                while gap >= 255:
                    out[pos] = 255
                    pos += 1
                    gap -= 255
                out[pos] = gap
                pos += 1
                gap = 0
            else:
                gap += 1
    return pos


@njit(nogil=True, cache=True, boundscheck=False)
def decode_gaps(codes, numel, out):  # pragma: no cover - compiled
    """Set the bits that ``codes`` name in ``out`` (zeroed, ``ceil(numel / 8)`` bytes, little
    bit order); return the number of bits set, or -1 when a position lies at or beyond
    ``numel`` or the code ends in an escape byte (a damaged array)."""
    pos = 0
    count = 0
    for k in range(codes.shape[0]):
        c = codes[k]
        if c == 255:
            pos += 255
            continue
        pos += c
        if pos >= numel:
            return -1
        out[pos >> 3] |= np.uint8(1) << np.uint8(pos & 7)
        pos += 1
        count += 1
    if codes.shape[0] and codes[codes.shape[0] - 1] == 255:
        return -1
    return count
