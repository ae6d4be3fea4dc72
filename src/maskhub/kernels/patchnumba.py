"""The numba kernels of :mod:`maskhub.kernels.patchbits` (imported only when used): walk the
set bits of packed masks byte by byte, skipping zero bytes, instead of unpacking every bit.

Compiled on first use and cached on disk like :mod:`maskhub.kernels.numbakernel`; they
release the GIL.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic


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


@intrinsic
def _prefetch(typingctx, arr, idx):  # pragma: no cover - compiled
    """Ask the CPU to fetch ``arr[idx]`` into the cache (LLVM's ``prefetch``, for a write,
    high locality); no effect on results, no bounds check needed (a prefetch never faults)."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, [args[1]],
                                       wraparound=False, boundscheck=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(1), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


#: How many patched entries ahead of the one being replayed the replay prefetches (its
#: entries are in random places of an array far larger than the caches: without it each
#: entry waits for memory, ~3x slower here).
AHEAD = 32


@njit(inline="always")
def _updated(fa, fb, tol):  # pragma: no cover - compiled
    """The reference decision of :func:`maskhub.kernels.fastkernel.updated_exact` on two
    float64 values: changed (not equal, not both NaN) and not ``|fb - fa| <= tol``."""
    if fa == fb or (fa != fa and fb != fb):
        return False
    return not (abs(fb - fa) <= tol)


@njit(nogil=True, cache=True, boundscheck=False)
def pack_state16(base, state):  # pragma: no cover - compiled
    """The replay state of a 16-bit dtype at the start of a chain: per entry one uint32,
    bits 0-15 the base's bits, 16-31 the current bits (the base's)."""
    for i in range(base.shape[0]):
        b = np.uint32(base[i])
        state[i] = b | (b << np.uint32(16))


@njit(inline="always")
def _ever(ever, i):  # pragma: no cover - compiled
    """Set bit ``i`` of the packed ``ever``; 1 when it was not set yet."""
    byte = ever[i >> 3]
    bit = np.uint8(1 << (i & 7))
    if byte & bit:
        return 0
    ever[i >> 3] = byte | bit
    return 1


@njit(nogil=True, cache=True, boundscheck=False)
def replay16(p_idx, off, p_val, state, ever, lut, tol, acc, events):  # pragma: no cover
    """One tensor of one step of a chain replayed over the packed state of
    :func:`pack_state16` (``lut``: the dtype's 65536 float64 values): entries
    ``off + p_idx[j]`` (sorted, unique) set to ``p_val[j]``. An entry is updated now when
    its current bits are updated against its base bits (the kernel's decision, on the
    entry's one state word); ``ever`` (packed, zero at the start) gets the entries ever
    updated.

    ``acc`` (int64) accumulates (updated vs the base, updated vs the previous step, ever
    updated, events). Each change of an entry's updated-vs-base state is logged at
    ``events[acc[3]]`` as ``2 * i + new``: the final mask and the counts outside it come
    from them (:func:`final_from_events`, :func:`outside_final`)."""
    m = p_idx.shape[0]
    ne = acc[3]
    n_upd = 0
    n_ever = 0
    vs_prev = 0
    for j in range(m):
        if j + AHEAD < m:
            _prefetch(state, off + p_idx[j + AHEAD])
        i = off + np.int64(p_idx[j])
        v = np.uint32(p_val[j])
        s = state[i]
        b = s & np.uint32(0xFFFF)
        c = s >> np.uint32(16)
        if c == v:
            continue  # same bits: no count, no change
        fv = lut[v]
        if _updated(lut[c], fv, tol):
            vs_prev += 1
        new = 1 if (b != v and _updated(lut[b], fv, tol)) else 0
        old = 1 if (b != c and _updated(lut[b], lut[c], tol)) else 0
        if new != old:
            events[ne] = 2 * i + new
            ne += 1
            n_upd += 1 if new else -1
        if new:
            n_ever += _ever(ever, i)
        state[i] = b | (v << np.uint32(16))
    acc[0] += n_upd
    acc[1] += vs_prev
    acc[2] += n_ever
    acc[3] = ne


@njit(nogil=True, cache=True, boundscheck=False)
def pack_state32(base, state):  # pragma: no cover - compiled
    """:func:`pack_state16` for a 32-bit dtype: one uint64 per entry, bits 0-31 the base's,
    32-63 the current bits."""
    for i in range(base.shape[0]):
        b = np.uint64(base[i])
        state[i] = b | (b << np.uint64(32))


@njit(nogil=True, cache=True, boundscheck=False)
def replay32(p_idx, off, p_val, p_fval, state, state_f, ever, tol, acc,
             events):  # pragma: no cover - compiled
    """:func:`replay16` for float32 over the state of :func:`pack_state32`; ``p_fval`` and
    ``state_f``: ``p_val`` and ``state`` viewed as float32 (entry i's base at ``2 * i``,
    its current value at ``2 * i + 1``).

    The transition block below repeats :func:`replay16`'s on purpose: shared through a
    numba helper (``inline="always"`` or left to LLVM) both kernels ran 3.2-3.9x slower
    (3.3 M patched entries: 0.035 s against 0.111-0.156 s)."""
    m = p_idx.shape[0]
    ne = acc[3]
    n_upd = 0
    n_ever = 0
    vs_prev = 0
    for j in range(m):
        if j + AHEAD < m:
            _prefetch(state, off + p_idx[j + AHEAD])
        i = off + np.int64(p_idx[j])
        v = np.uint64(p_val[j])
        s = state[i]
        b = s & np.uint64(0xFFFFFFFF)
        c = s >> np.uint64(32)
        if c == v:
            continue
        fv = np.float64(p_fval[j])
        fb = np.float64(state_f[2 * i])
        fc = np.float64(state_f[2 * i + 1])
        if _updated(fc, fv, tol):
            vs_prev += 1
        new = 1 if (b != v and _updated(fb, fv, tol)) else 0
        old = 1 if (b != c and _updated(fb, fc, tol)) else 0
        if new != old:
            events[ne] = 2 * i + new
            ne += 1
            n_upd += 1 if new else -1
        if new:
            n_ever += _ever(ever, i)
        state[i] = b | (v << np.uint64(32))
    acc[0] += n_upd
    acc[1] += vs_prev
    acc[2] += n_ever
    acc[3] = ne


@njit(nogil=True, cache=True, boundscheck=False)
def final_from_events(events, final):  # pragma: no cover - compiled
    """The packed final mask (``final``, zero at the start) from the events of
    :func:`replay16`: an entry is in it when its last event set it."""
    for e in range(events.shape[0]):
        ev = events[e]
        i = ev >> 1
        bit = np.uint8(1 << (i & 7))
        if ev & 1:
            final[i >> 3] |= bit
        else:
            final[i >> 3] &= ~bit


@njit(nogil=True, cache=True, boundscheck=False)
def outside_final(events, out, final):  # pragma: no cover - compiled
    """Per step k (its events end at ``out[k, 3]``: :func:`replay16`'s ``acc[3]`` after the
    step): how many entries
    are updated against the base and outside the packed ``final`` mask, into
    ``out[k, 3]``."""
    n_out = 0
    e = 0
    for k in range(out.shape[0]):
        end = out[k, 3]
        while e < end:
            ev = events[e]
            i = ev >> 1
            if not ((final[i >> 3] >> (i & 7)) & 1):
                n_out += 1 if ev & 1 else -1
            e += 1
        out[k, 3] = n_out
