"""The numba kernels of :mod:`maskhub.kernels.fastkernel` (imported only when used).

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

@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _flags(x, y, m, lo, inf):  # pragma: no cover - compiled
    """``(sure, cand)`` of one entry: changed with both magnitudes in ``[lo, inf]``, or
    changed otherwise (decided exactly later)."""
    ma = x & m
    mb = y & m
    ok = (ma >= lo) & (ma <= inf) & (mb >= lo) & (mb <= inf)
    ne = x != y
    return ne & ok, ne & (not ok)


@njit(nogil=True, cache=True, boundscheck=False)
def _classify_pack(a, b, m, lo, inf, out, pc):  # pragma: no cover - compiled
    """Classify and pack in one pass: bit ``i`` of ``out`` = sure-updated, of ``pc`` =
    candidate (little bit order, ``ceil(n/8)`` bytes each). Eight entries per output byte:
    the inner loop unrolls and the outer one vectorises, about 2.5x the speed of writing
    byte flags and packing them after (nothing else may go in this loop: a counter or a
    table lookup there stops the vectorisation, hence :func:`_popcount` afterwards)."""
    n = a.shape[0]
    full = n // 8
    for k in range(full):
        bs = np.uint8(0)
        bc = np.uint8(0)
        for j in range(8):
            s, c = _flags(a[8 * k + j], b[8 * k + j], m, lo, inf)
            bs |= np.uint8(s) << np.uint8(j)
            bc |= np.uint8(c) << np.uint8(j)
        out[k] = bs
        pc[k] = bc
    if n > 8 * full:
        bs = np.uint8(0)
        bc = np.uint8(0)
        for j in range(n - 8 * full):
            s, c = _flags(a[8 * full + j], b[8 * full + j], m, lo, inf)
            bs |= np.uint8(s) << np.uint8(j)
            bc |= np.uint8(c) << np.uint8(j)
        out[full] = bs
        pc[full] = bc


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _popcount64(x):  # pragma: no cover - compiled
    x = x - ((x >> _u64(1)) & _u64(0x5555555555555555))
    x = (x & _u64(0x3333333333333333)) + ((x >> _u64(2)) & _u64(0x3333333333333333))
    x = (x + (x >> _u64(4))) & _u64(0x0F0F0F0F0F0F0F0F)
    return (x * _u64(0x0101010101010101)) >> _u64(56)


@njit(nogil=True, cache=True, boundscheck=False)
def _popcount(packed, nbytes):  # pragma: no cover - compiled
    """Set bits in ``packed[:nbytes]``."""
    words = nbytes // 8
    total = 0
    w64 = packed[:8 * words].view(np.uint64)
    for w in range(words):
        total += _popcount64(w64[w])
    for k in range(8 * words, nbytes):
        total += _popcount64(_u64(packed[k]))
    return total

@njit(nogil=True, cache=True, boundscheck=False)
def _value(bits, kind):  # pragma: no cover - compiled
    """Exact float64 value of a pattern: ``kind`` 0 = bfloat16, 1 = float16, 2 = float32."""
    if kind == 2:
        return np.float64(np.uint32(bits).view(np.float32))
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
def numba_chunk(a, b, kind, m, lo, inf, tols, out, counts, pc):  # pragma: no cover - compiled
    """The kernel for one chunk. ``a``/``b``: uint16 patterns (``kind`` 0 = bfloat16,
    1 = float16) or uint32 float32 patterns (``kind`` 2); ``m`` the magnitude mask and
    ``lo``/``inf`` the decisive range, of the same unsigned type; ``pc``
    (``ceil(n/64)*8`` bytes) is scratch for the packed candidates."""
    n = a.shape[0]
    nb = (n + 7) // 8
    pc[nb:] = 0
    _classify_pack(a, b, m, lo, inf, out, pc)
    n_sure = _popcount(out, nb)
    exact = 0
    pc64 = pc.view(np.uint64)
    for w in range(pc64.shape[0]):
        c = pc64[w]
        while c:
            j = 64 * w + trailing_zeros(c)
            c &= c - _u64(1)
            upd = _exact(_value(a[j], kind), _value(b[j], kind), tols, counts)
            exact += upd
            out[j >> 3] |= np.uint8(upd << (j & 7))
    counts[0] += exact
    for t in range(tols.shape[0]):
        counts[t] += n_sure


@njit(nogil=True, cache=True, boundscheck=False)
def strata_updated(a, shift, emask, packed, n, out):  # pragma: no cover - compiled
    """:func:`strata_counts` without the entries' histogram (``out[1]`` only): for a base
    tensor whose exponent histogram is already known (the strata cache)."""
    nb = (n + 7) // 8
    nw = nb // 8
    for w in range(nw):
        word = _u64(0)
        for k in range(8):
            word |= _u64(packed[w * 8 + k]) << _u64(8 * k)
        while word:
            i = w * 64 + trailing_zeros(word)
            out[1, (a[i] >> shift) & emask] += 1
            word &= word - _u64(1)
    for byte_i in range(nw * 8, nb):
        byte = packed[byte_i]
        for k in range(8):
            i = byte_i * 8 + k
            if i < n and (byte >> k) & 1:
                out[1, (a[i] >> shift) & emask] += 1


@njit(nogil=True, cache=True, boundscheck=False)
def strata_counts(a, shift, emask, packed, n, out):  # pragma: no cover - compiled
    """Exponent histogram of one chunk: ``out[0, e]`` += entries of ``a`` (unsigned bit
    patterns of θ0) whose exponent field ``(a >> shift) & emask`` is ``e``, ``out[1, e]`` +=
    those whose bit is set in ``packed`` (the chunk's mask); updated entries are walked by
    set bit, 64 at a time."""
    # 16 int32 sub-histograms: weights crowd into a few exponents, and one counter
    # incremented by consecutive entries would serialise on store-to-load forwarding
    # (16 measured 1.7x faster than 4). A chunk has < 2^31 entries.
    loc = np.zeros((16, out.shape[1]), np.int32)
    n16 = n // 16 * 16
    for i in range(0, n16, 16):
        for k in range(16):
            loc[k, (a[i + k] >> shift) & emask] += 1
    for i in range(n16, n):
        loc[0, (a[i] >> shift) & emask] += 1
    for e in range(out.shape[1]):
        total = 0
        for k in range(16):
            total += loc[k, e]
        out[0, e] += total
    strata_updated(a, shift, emask, packed, n, out)


@njit(nogil=True, cache=True, boundscheck=False)
def max_abs_delta(a, b, ka, kb, packed, n):  # pragma: no cover - compiled
    """Largest ``|b - a|`` (float64, NaN ignored) over the entries whose bit is set in
    ``packed``; ``ka``/``kb`` the kinds of :func:`_value`. Walks the set bits, 64 at a time."""
    best = 0.0
    nb = (n + 7) // 8
    nw = nb // 8
    for w in range(nw):
        word = _u64(0)
        for k in range(8):
            word |= _u64(packed[w * 8 + k]) << _u64(8 * k)
        while word:
            i = w * 64 + trailing_zeros(word)
            d = abs(_value(b[i], kb) - _value(a[i], ka))
            if d > best:  # False for NaN
                best = d
            word &= word - _u64(1)
    for byte_i in range(nw * 8, nb):
        byte = packed[byte_i]
        for k in range(8):
            i = byte_i * 8 + k
            if i < n and (byte >> k) & 1:
                d = abs(_value(b[i], kb) - _value(a[i], ka))
                if d > best:
                    best = d
    return best


@njit(nogil=True, cache=True, boundscheck=False)
def updated_walk(a, b, ka, kb, shift, emask, packed, n, out, want_delta):  # pragma: no cover
    """:func:`strata_updated` and :func:`max_abs_delta` in one walk over the set bits of
    ``packed`` (each updated entry is visited once, not once per question): ``out[1, e]``
    += updated entries of ``a`` in stratum ``e``; returns the largest ``|b - a|`` over them
    when ``want_delta`` (same value, NaN ignored, as :func:`max_abs_delta`), else 0.0.
    ``a``/``b``: unsigned views of θ0/θ1 (``ka``/``kb`` the kinds of :func:`_value`)."""
    best = 0.0
    nb = (n + 7) // 8
    nw = nb // 8
    w64 = packed[:8 * nw].view(np.uint64)
    for w in range(nw):
        word = w64[w]
        base = w * 64
        while word:
            i = base + trailing_zeros(word)
            word &= word - _u64(1)
            x = a[i]
            out[1, (x >> shift) & emask] += 1
            if want_delta:
                d = abs(_value(b[i], kb) - _value(x, ka))
                if d > best:  # False for NaN
                    best = d
    for byte_i in range(8 * nw, nb):
        byte = packed[byte_i]
        for k in range(8):
            i = byte_i * 8 + k
            if i < n and (byte >> k) & 1:
                x = a[i]
                out[1, (x >> shift) & emask] += 1
                if want_delta:
                    d = abs(_value(b[i], kb) - _value(x, ka))
                    if d > best:
                        best = d
    return best


@njit(nogil=True, cache=True, boundscheck=False)
def strata_entries(a, shift, emask, n, out):  # pragma: no cover - compiled
    """The entries' half of :func:`strata_counts`: ``out[0, e]`` += entries of ``a`` in
    stratum ``e``."""
    loc = np.zeros((16, out.shape[1]), np.int32)
    n16 = n // 16 * 16
    for i in range(0, n16, 16):
        for k in range(16):
            loc[k, (a[i + k] >> shift) & emask] += 1
    for i in range(n16, n):
        loc[0, (a[i] >> shift) & emask] += 1
    for e in range(out.shape[1]):
        total = 0
        for k in range(16):
            total += loc[k, e]
        out[0, e] += total
