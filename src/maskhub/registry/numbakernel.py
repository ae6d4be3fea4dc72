"""The numba kernels of :mod:`maskhub.registry.fastkernel` (imported only when used).

Compiled on first use and cached on disk (numba's ``cache=True``: next to this file, or in
the user cache directory when that is not writable); every function releases the GIL.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

try:  # LLVM's cttz; a plain loop where numba does not expose it
    from numba.cpython.unsafe.numbers import trailing_zeros
except ImportError:  # pragma: no cover
    @njit(inline="always")
    def trailing_zeros(x):
        j = 0
        while not (x >> np.uint64(j)) & np.uint64(1):
            j += 1
        return j

_u64 = np.uint64
_ONES = _u64(0x0101010101010101)
_GATHER = _u64(0x0102040810204080)  # byte j's low bit -> bit 56 + j

@njit(nogil=True, cache=True, boundscheck=False)
def _classify16(a, b, lo, inf, sure, cand):  # pragma: no cover - compiled
    """Vectorised: ``sure[i]``/``cand[i]`` flags; returns the number of sure entries."""
    n_sure = 0
    m = np.uint16(0x7FFF)
    for i in range(a.shape[0]):
        x = a[i]
        y = b[i]
        ma = x & m
        mb = y & m
        ok = (ma >= lo) & (ma <= inf) & (mb >= lo) & (mb <= inf)
        ne = x != y
        s = ne & ok
        sure[i] = s
        cand[i] = ne & (not ok)
        n_sure += s
    return n_sure

@njit(nogil=True, cache=True, boundscheck=False)
def _classify32(a, b, lo, inf, sure, cand):  # pragma: no cover - compiled
    """32-bit version of :func:`_classify16`."""
    n_sure = 0
    m = np.uint32(0x7FFFFFFF)
    for i in range(a.shape[0]):
        x = a[i]
        y = b[i]
        ma = x & m
        mb = y & m
        ok = (ma >= lo) & (ma <= inf) & (mb >= lo) & (mb <= inf)
        ne = x != y
        s = ne & ok
        sure[i] = s
        cand[i] = ne & (not ok)
        n_sure += s
    return n_sure

@njit(nogil=True, cache=True, boundscheck=False)
def _pack(flags, n, out):  # pragma: no cover - compiled
    """Pack ``n`` 0/1 bytes into ``ceil(n/8)`` bytes of ``out``, little bit order."""
    full = n // 8
    f64 = flags[:8 * full].view(np.uint64)
    for k in range(full):
        out[k] = np.uint8(((f64[k] & _ONES) * _GATHER) >> _u64(56))
    if n > 8 * full:
        s = 0
        for j in range(n - 8 * full):
            s |= np.int64(flags[8 * full + j] & 1) << j
        out[full] = np.uint8(s)

@njit(nogil=True, cache=True, boundscheck=False)
def _value16(bits, kind):  # pragma: no cover - compiled
    """Exact float64 value of a 16-bit pattern: ``kind`` 0 = bfloat16, 1 = float16."""
    if kind == 0:
        return np.float64(np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32))
    e = (bits >> 10) & 0x1F
    f = bits & 0x3FF
    if e == 0x1F:
        v = np.inf if f == 0 else np.nan
    elif e == 0:
        v = math.ldexp(np.float64(f), -24)
    else:
        v = math.ldexp(np.float64(f | 0x400), e - 25)
    return -v if bits & 0x8000 else v

@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _exact(fa, fb, tols, counts):  # pragma: no cover - compiled
    """Reference decision (float64) for one candidate, branch-free; sweep counts go to
    ``counts[1:]``; returns 1 if updated at ``tols[0]``."""
    changed = np.int64(fa != fb) & (1 - (np.int64(fa != fa) & np.int64(fb != fb)))
    d = abs(fb - fa)
    for t in range(1, tols.shape[0]):
        counts[t] += changed & (1 - np.int64(d <= tols[t]))
    return changed & (1 - np.int64(d <= tols[0]))

@njit(nogil=True, cache=True, boundscheck=False)
def numba_chunk16(a, b, kind, lo, inf, tols, out, counts, sure, cand, pc
                  ):  # pragma: no cover - compiled
    """16-bit kernel; ``kind`` 0 = bfloat16, 1 = float16; ``sure``/``cand`` (n bytes)
    and ``pc`` (``ceil(n/64)*8`` bytes) are scratch."""
    n = a.shape[0]
    n_sure = _classify16(a, b, np.uint16(lo), np.uint16(inf), sure, cand)
    _pack(sure, n, out)
    nb = (n + 7) // 8
    pc[nb:] = 0
    _pack(cand, n, pc)
    exact = 0
    pc64 = pc.view(np.uint64)
    for w in range(pc64.shape[0]):
        c = pc64[w]
        while c:
            j = 64 * w + trailing_zeros(c)
            c &= c - _u64(1)
            upd = _exact(_value16(a[j], kind), _value16(b[j], kind), tols, counts)
            exact += upd
            out[j >> 3] |= np.uint8(upd << (j & 7))
    counts[0] += exact
    for t in range(tols.shape[0]):
        counts[t] += n_sure

@njit(nogil=True, cache=True, boundscheck=False)
def numba_chunk32(a, b, fa, fb, lo, inf, tols, out, counts, sure, cand, pc
                  ):  # pragma: no cover - compiled
    """32-bit kernel; ``fa``/``fb`` are float32 views of ``a``/``b``; as
    :func:`numba_chunk16` otherwise."""
    n = a.shape[0]
    n_sure = _classify32(a, b, np.uint32(lo), np.uint32(inf), sure, cand)
    _pack(sure, n, out)
    nb = (n + 7) // 8
    pc[nb:] = 0
    _pack(cand, n, pc)
    exact = 0
    pc64 = pc.view(np.uint64)
    for w in range(pc64.shape[0]):
        c = pc64[w]
        while c:
            j = 64 * w + trailing_zeros(c)
            c &= c - _u64(1)
            upd = _exact(np.float64(fa[j]), np.float64(fb[j]), tols, counts)
            exact += upd
            out[j >> 3] |= np.uint8(upd << (j & 7))
    counts[0] += exact
    for t in range(tols.shape[0]):
        counts[t] += n_sure
