"""The numba kernels of :mod:`maskhub.kernels.patchbits` (imported only when used): walk the
set bits of packed masks byte by byte, skipping zero bytes, instead of unpacking every bit.

Compiled on first use and cached on disk like :mod:`maskhub.kernels.numbakernel`; they
release the GIL.
"""

from __future__ import annotations

import numpy as np
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


@njit(nogil=True, cache=True, boundscheck=False)
def gap_bounds(codes, numel, chunk, ks, ps, vs):  # pragma: no cover - compiled
    """Where each chunk of ``chunk`` entries starts in a byte-gap code (:mod:`maskhub.storage.
    gapcode`): for chunk c, ``ks[c]`` the code byte that ends its first set bit, ``ps[c]``
    the decoder's position before that byte and ``vs[c]`` the set bits before the chunk;
    entry ``len(ks) - 1`` is the end of the code. Returns the number of set bits, or -1 when
    the code names a position at or beyond ``numel`` or ends in an escape byte."""
    last = ks.shape[0] - 1
    c = 0
    nxt = 0  # the first entry of chunk c
    pos = 0
    v = 0
    n = codes.shape[0]
    for k in range(n):
        b = codes[k]
        if b == 255:
            pos += 255
            continue
        p = pos + b
        if p >= nxt:
            if p >= numel:
                return -1
            while c <= last and nxt <= p:
                ks[c] = k
                ps[c] = pos
                vs[c] = v
                c += 1
                nxt += chunk
        pos = p + 1
        v += 1
    if n and codes[n - 1] == 255:
        return -1
    while c <= last:
        ks[c] = n
        ps[c] = pos
        vs[c] = v
        c += 1
    return v


@njit(nogil=True, cache=True, boundscheck=False)
def scatter_gaps(out, lo, codes, k0, k1, pos, values):  # pragma: no cover - compiled
    """``out[i - lo] = values[j]`` for the j-th set bit i named by code bytes ``k0:k1``,
    decoding from position ``pos`` (bounds found by :func:`gap_bounds`: every position
    lies in ``[lo, lo + len(out))`` and ``values`` holds one entry per set bit)."""
    v = 0
    for k in range(k0, k1):
        b = codes[k]
        if b == 255:
            pos += 255
            continue
        pos += b
        out[pos - lo] = values[v]
        v += 1
        pos += 1
    return v


@njit(inline="always")
def _updated(fa, fb, tol):  # pragma: no cover - compiled
    """The reference decision of :func:`maskhub.kernels.fastkernel.updated_exact` on two
    float64 values: changed (not equal, not both NaN) and not ``|fb - fa| <= tol``."""
    if fa == fb or (fa != fa and fb != fb):
        return False
    return not (abs(fb - fa) <= tol)


@njit(nogil=True, cache=True, boundscheck=False)
def replay_step16(p_idx, p_val, base, current, flags, lut, tol, counts):  # pragma: no cover
    """One step of :class:`maskhub.analytics.patch_replay.SparseState` for a 16-bit float
    dtype (``lut``: its 65536 float64 values) in one pass over the patch's entries: adds
    to ``counts`` the changes of (updated now, updated vs the previous step, ever updated,
    updated outside the final mask), writes the values and the flags."""
    d_upd = 0
    vs_prev = 0
    d_ever = 0
    d_out = 0
    for j in range(p_idx.shape[0]):
        i = p_idx[j]
        v = p_val[j]
        c = current[i]
        f = flags[i]
        if c != v and _updated(lut[c], lut[v], tol):
            vs_prev += 1
        b = base[i]
        new = 1 if (b != v and _updated(lut[b], lut[v], tol)) else 0
        old = f & 1
        d_upd += new - old
        if new and not (f & 2):
            d_ever += 1
        if f & 4:
            d_out += new - old
        current[i] = v
        flags[i] = (f & 6) | new | (new << 1)
    counts[0] += d_upd
    counts[1] += vs_prev
    counts[2] += d_ever
    counts[3] += d_out


@njit(nogil=True, cache=True, boundscheck=False)
def replay_step32(p_idx, p_val, p_fval, base, base_f, current, current_f, flags, tol,
                  counts):  # pragma: no cover - compiled
    """:func:`replay_step16` for float32 (``*_f``: the same arrays viewed as float32)."""
    d_upd = 0
    vs_prev = 0
    d_ever = 0
    d_out = 0
    for j in range(p_idx.shape[0]):
        i = p_idx[j]
        v = p_val[j]
        fv = np.float64(p_fval[j])
        f = flags[i]
        if current[i] != v and _updated(np.float64(current_f[i]), fv, tol):
            vs_prev += 1
        new = 1 if (base[i] != v and _updated(np.float64(base_f[i]), fv, tol)) else 0
        old = f & 1
        d_upd += new - old
        if new and not (f & 2):
            d_ever += 1
        if f & 4:
            d_out += new - old
        current[i] = v
        flags[i] = (f & 6) | new | (new << 1)
    counts[0] += d_upd
    counts[1] += vs_prev
    counts[2] += d_ever
    counts[3] += d_out
