"""Fast CPU diff of raw bit patterns: bf16/fp16 (16-bit lanes) and fp32 (32-bit lanes).

Each function diffs one chunk: ``a`` (base) and ``b`` (target) are unsigned-integer views of
the raw values, ``out`` receives the packed mask (little bit order, ``ceil(n/8)`` bytes) and
``counts[t]`` is incremented by the number of entries updated at ``tols[t]`` (``tols[0]`` is
the mask's own tolerance, the rest the sweep).

Algorithm (same in both backends): an entry whose bit pattern equals the base's is unchanged;
one whose pattern differs and whose base magnitude lies in ``[big, inf]`` is updated (see
:mod:`maskhub.registry.floatbits`); the rest ("candidates": small base values, NaN bases,
the ±0 pair) are decided exactly in float64 with the reference formula. The numba backend
does this in one fused pass, 4 (or 2) lanes per 64-bit word (SWAR), packing bits as it goes;
the numpy backend in a few vectorised passes.
"""

from __future__ import annotations

import numpy as np

try:  # numba is optional: without it the numpy backend (same results, slower) is used.
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where numba is absent
    njit = None

HAVE_NUMBA = njit is not None


def _updated_exact(fa: np.ndarray, fb: np.ndarray, tols: np.ndarray, counts: np.ndarray
                   ) -> np.ndarray:
    """Reference decision on float64 values; returns the mask at ``tols[0]``."""
    changed = (fa != fb) & ~(np.isnan(fa) & np.isnan(fb))
    d = np.abs(fb - fa)
    result = changed & ~(d <= tols[0])
    counts[0] += int(np.count_nonzero(result))
    for t in range(1, tols.shape[0]):
        counts[t] += int(np.count_nonzero(changed & ~(d <= tols[t])))
    return result


def numpy_chunk(a: np.ndarray, b: np.ndarray, lut_a: np.ndarray | None,
                lut_b: np.ndarray | None, mag_mask: int, big: int, inf: int, tols: np.ndarray,
                out: np.ndarray, counts: np.ndarray) -> None:
    """numpy backend. ``lut_a``/``lut_b``: 65536-entry float64 value tables indexed by the
    16-bit patterns (bf16, fp16), or ``None`` for fp32 bit patterns (``uint32``)."""
    ne = a != b
    mag = a & a.dtype.type(mag_mask)
    sure = ne & (mag >= big) & (mag <= inf)
    cand = np.flatnonzero(ne & ~sure)
    n_sure = int(np.count_nonzero(sure))
    if cand.size:
        if lut_a is None or lut_b is None:
            fa = a[cand].view(np.float32).astype(np.float64)
            fb = b[cand].view(np.float32).astype(np.float64)
        else:
            fa, fb = lut_a[a[cand]], lut_b[b[cand]]
        with np.errstate(invalid="ignore"):  # inf - inf is NaN, as in the reference
            sure[cand] = _updated_exact(fa, fb, tols, counts)
    counts += n_sure
    out[:] = np.packbits(sure, bitorder="little")


if HAVE_NUMBA:
    _u64 = np.uint64
    _L16, _H16 = _u64(0x7FFF7FFF7FFF7FFF), _u64(0x8000800080008000)
    _REP16 = _u64(0x0001000100010001)
    _GATHER16 = _u64(0x0000200040008001)  # bits 0,16,32,48 -> bits 45..48
    _L32, _H32 = _u64(0x7FFFFFFF7FFFFFFF), _u64(0x8000000080000000)
    _REP32 = _u64(0x0000000100000001)

    @njit(nogil=True, cache=True, boundscheck=False)
    def _exact_one(fa, fb, tols, counts):  # pragma: no cover - compiled
        """Reference decision for one entry; counts every tolerance; True if updated at tols[0]."""
        if fa == fb or (fa != fa and fb != fb):
            return False
        d = abs(fb - fa)
        for t in range(tols.shape[0]):
            if not d <= tols[t]:
                counts[t] += 1
        return not d <= tols[0]

    @njit(nogil=True, cache=True, boundscheck=False)
    def numba_chunk16(a, b, lut_a, lut_b, big, inf, tols, out, counts):  # pragma: no cover
        """Fused 16-bit kernel; ``lut_a``/``lut_b`` map patterns to float64 values."""
        n = a.shape[0]
        big4 = _u64(big) * _REP16
        inf4 = (_u64(inf) * _REP16) | _H16
        fast = 0
        nfull = n // 8
        for k in range(nfull):
            i = 8 * k
            s = _u64(0)
            c = _u64(0)
            for h in range(2):
                j = i + 4 * h
                x = (_u64(a[j]) | (_u64(a[j + 1]) << _u64(16)) | (_u64(a[j + 2]) << _u64(32))
                     | (_u64(a[j + 3]) << _u64(48)))
                y = (_u64(b[j]) | (_u64(b[j + 1]) << _u64(16)) | (_u64(b[j + 2]) << _u64(32))
                     | (_u64(b[j + 3]) << _u64(48)))
                d = x ^ y
                ne = (((d & _L16) + _L16) | d) & _H16  # lane's top bit: patterns differ
                mag = x & _L16
                ok = ((mag | _H16) - big4) & (inf4 - mag) & _H16  # big <= mag <= inf
                sure = (ne & ok) >> _u64(15)
                cand = (ne & ~ok) >> _u64(15)
                fast += (sure * _REP16) >> _u64(48)
                s |= (((sure * _GATHER16) >> _u64(45)) & _u64(15)) << _u64(4 * h)
                c |= (((cand * _GATHER16) >> _u64(45)) & _u64(15)) << _u64(4 * h)
            if c:
                for j in range(8):
                    if (c >> _u64(j)) & _u64(1):
                        if _exact_one(lut_a[a[i + j]], lut_b[b[i + j]], tols, counts):
                            s |= _u64(1) << _u64(j)
            out[k] = np.uint8(s)
        if n > 8 * nfull:
            s = _u64(0)
            for j in range(n - 8 * nfull):
                i = 8 * nfull + j
                if a[i] != b[i] and _exact_one(lut_a[a[i]], lut_b[b[i]], tols, counts):
                    s |= _u64(1) << _u64(j)
            out[nfull] = np.uint8(s)
        for t in range(tols.shape[0]):
            counts[t] += np.int64(fast)

    @njit(nogil=True, cache=True, boundscheck=False)
    def numba_chunk32(a, b, fa, fb, big, inf, tols, out, counts):  # pragma: no cover
        """Fused 32-bit kernel; ``fa``/``fb`` are float32 views of ``a``/``b``."""
        n = a.shape[0]
        big2 = _u64(big) * _REP32
        inf2 = (_u64(inf) * _REP32) | _H32
        fast = 0
        nfull = n // 8
        for k in range(nfull):
            i = 8 * k
            s = _u64(0)
            c = _u64(0)
            for h in range(4):
                j = i + 2 * h
                x = _u64(a[j]) | (_u64(a[j + 1]) << _u64(32))
                y = _u64(b[j]) | (_u64(b[j + 1]) << _u64(32))
                d = x ^ y
                ne = (((d & _L32) + _L32) | d) & _H32
                mag = x & _L32
                ok = ((mag | _H32) - big2) & (inf2 - mag) & _H32
                sure = (ne & ok) >> _u64(31)
                cand = (ne & ~ok) >> _u64(31)
                fast += (sure & _u64(1)) + (sure >> _u64(32))
                s |= ((sure | (sure >> _u64(31))) & _u64(3)) << _u64(2 * h)
                c |= ((cand | (cand >> _u64(31))) & _u64(3)) << _u64(2 * h)
            if c:
                for j in range(8):
                    if (c >> _u64(j)) & _u64(1):
                        if _exact_one(np.float64(fa[i + j]), np.float64(fb[i + j]), tols, counts):
                            s |= _u64(1) << _u64(j)
            out[k] = np.uint8(s)
        if n > 8 * nfull:
            s = _u64(0)
            for j in range(n - 8 * nfull):
                i = 8 * nfull + j
                if a[i] != b[i] and _exact_one(np.float64(fa[i]), np.float64(fb[i]), tols,
                                               counts):
                    s |= _u64(1) << _u64(j)
            out[nfull] = np.uint8(s)
        for t in range(tols.shape[0]):
            counts[t] += np.int64(fast)
