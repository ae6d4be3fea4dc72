"""Bit-level work of a patch (numpy, no torch): which entries a lossless patch must carry, the
target's values at them, and the conversion of a base tensor to the target's dtype.

A lossless patch rebuilds the target bit for bit, so its mask is wider than the ``tol = 0``
mask, which counts +0 vs -0 and two NaNs as unchanged. Entries are in a lossless patch when

* the value changed (the kernel's mask at ``tol = 0``), or
* ``convert(base)`` and the target differ in bits (same dtype: the bits themselves differ;
  this adds +0 <-> -0 and NaN payload changes), or
* base and target dtypes differ and the target is NaN (so that no conversion's NaN
  convention matters).

An entry outside the mask therefore holds, in the target, a non-NaN value equal to the
base's and exactly representable in the target's dtype, with the same sign of zero: every
exact conversion (numpy ``astype``, torch ``.to``) of the base gives its bits.
:func:`convert_bits` is the conversion used here; for an entry outside the mask it is exact.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from maskhub.kernels.fastkernel import HAVE_NUMBA, choose_numba_cache
from maskhub.schemas.dtypes import itemsize

#: The float formats a patch converts between (the other dtypes only patch to themselves).
FLOATS = ("bfloat16", "float16", "float32", "float64")
BITORDER = "little"
#: Chunks of at least this many entries go through the numba kernels when numba is there.
NUMBA_MIN = 1 << 16
_NUMBA: list[ModuleType] = []


def _numba() -> ModuleType | None:
    if not HAVE_NUMBA:
        return None
    if not _NUMBA:
        choose_numba_cache()
        from maskhub.kernels import patchnumba

        _NUMBA.append(patchnumba)
    return _NUMBA[0]


def bits_view(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A uint8 buffer of ``dtype`` entries, viewed as unsigned integers of its width."""
    return raw.view(f"<u{itemsize(dtype)}")


def can_convert(base_dtype: str, target_dtype: str) -> bool:
    """True when a patch can rebuild a ``target_dtype`` tensor from a ``base_dtype`` one."""
    return base_dtype == target_dtype or (base_dtype in FLOATS and target_dtype in FLOATS)


def _to_float64(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return bits.view(np.dtype(dtype)).astype(np.float64)


def convert_bits(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    """The bits of ``src`` entries converted to ``dst`` (float formats; identity when equal).

    Rounds to nearest through float32 and truncates to bf16: exact for every value ``dst``
    holds, which is all a patch relies on (module docstring).
    """
    if src == dst:
        return bits
    with np.errstate(all="ignore"):
        wide = _to_float64(bits, src)
        if dst == "bfloat16":
            return (wide.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return wide.astype(np.dtype(dst)).view(f"<u{itemsize(dst)}")


def _is_nan(bits: np.ndarray, dtype: str) -> np.ndarray:
    width = 8 * itemsize(dtype)
    mant = {"bfloat16": 7, "float16": 10, "float32": 23, "float64": 52}[dtype]
    mag = bits & np.array((1 << (width - 1)) - 1, dtype=bits.dtype)
    return mag > np.array(((1 << (width - 1 - mant)) - 1) << mant, dtype=bits.dtype)


def patch_chunk(a_raw: np.ndarray, b_raw: np.ndarray, a_dtype: str, b_dtype: str,
                packed: np.ndarray, lossless: bool) -> np.ndarray:
    """Complete one chunk of a patch: widen ``packed`` (the kernel's bits of the chunk,
    little bit order, updated in place) to the lossless mask when ``lossless``, and return
    the target's values at its set bits (raw bits, flat order).

    ``a_raw``/``b_raw``: the chunk's bytes in base and target; the chunk starts on a byte of
    ``packed`` (a multiple of 8 entries)."""
    b = bits_view(b_raw, b_dtype)
    n = b.shape[0]
    if lossless:
        a = bits_view(a_raw, a_dtype)
        if a_dtype == b_dtype:
            differ = a != b
        else:
            differ = convert_bits(a, a_dtype, b_dtype) != b
            differ |= _is_nan(b, b_dtype)
        packed |= np.packbits(differ, bitorder=BITORDER)
    if not packed.any():
        return b[:0].copy()
    nb = _numba() if n >= NUMBA_MIN else None
    if nb is not None:
        out = np.empty(n, dtype=b.dtype)
        return out[:nb.gather(b, packed, out)].copy()
    idx = np.flatnonzero(np.unpackbits(packed, count=n, bitorder=BITORDER))
    return b[idx]


def scatter_chunk(out_bits: np.ndarray, packed: np.ndarray, values: np.ndarray) -> int:
    """Write ``values`` (raw bits, flat order) at the set bits of ``packed`` into
    ``out_bits`` (one chunk, starting on a byte of ``packed``); return how many were used."""
    if not packed.any():
        return 0
    nb = _numba() if out_bits.shape[0] >= NUMBA_MIN else None
    if nb is not None:
        used = int(nb.scatter(out_bits, packed, values))
        if used < 0:
            raise ValueError("more set bits than values")
        return used
    idx = np.flatnonzero(np.unpackbits(packed, count=out_bits.shape[0], bitorder=BITORDER))
    if idx.shape[0] > values.shape[0]:
        raise ValueError("more set bits than values")
    out_bits[idx] = values[:idx.shape[0]]
    return int(idx.shape[0])


class PackedScatter:
    """Scatters a tensor's values into its chunks of ``chunk`` entries at the set bits of
    packed bits (little bit order): :meth:`scatter` of different chunks may run at once
    (the object is read-only once built)."""

    def __init__(self, packed: np.ndarray, numel: int, chunk: int) -> None:
        """Count the set bits of each chunk (``chunk``: a multiple of 8)."""
        from maskhub.kernels.bitcount import count_entries

        self.packed, self.numel, self.chunk = packed, numel, chunk
        first = [0]
        for lo in range(0, numel, chunk):
            hi = min(numel, lo + chunk)
            first.append(first[-1] + count_entries(packed[lo // 8:(hi + 7) // 8], hi - lo))
        self.first = first

    @property
    def total(self) -> int:
        """Set bits in the tensor."""
        return self.first[-1]

    def count(self, c: int) -> int:
        """Set bits in chunk ``c``."""
        return self.first[c + 1] - self.first[c]

    def scatter(self, c: int, out_bits: np.ndarray, values: np.ndarray) -> None:
        """Write chunk ``c``'s values (``values``: the tensor's, raw bits) into ``out_bits``
        (the chunk's entries)."""
        lo = c * self.chunk
        hi = lo + out_bits.shape[0]
        v0, v1 = self.first[c], self.first[c + 1]
        if v1 > v0:
            used = scatter_chunk(out_bits, self.packed[lo // 8:(hi + 7) // 8], values[v0:v1])
            if used != v1 - v0:
                raise ValueError(f"{used} set bits for {v1 - v0} values")


class GapScatter:
    """:class:`PackedScatter` for a byte-gap code (:mod:`maskhub.storage.gapcode`): the
    values go straight to the positions the code names, never through packed bits. One
    pass over the code finds where each chunk starts in it (compiled); each chunk then
    decodes its own part. Without numba (or for small tensors): the positions, in numpy."""

    def __init__(self, codes: np.ndarray, numel: int, chunk: int) -> None:
        """Check the code against the tensor (``ValueError`` naming the fault) and find the
        chunks' starts."""
        self.codes = np.ascontiguousarray(codes, dtype=np.uint8)
        self.numel, self.chunk = numel, chunk
        n_chunks = -(-numel // chunk)
        nb = _numba() if numel >= NUMBA_MIN else None
        self._nb = nb
        if nb is not None:
            self.ks = np.zeros(n_chunks + 1, np.int64)
            self.ps = np.zeros(n_chunks + 1, np.int64)
            vs = np.zeros(n_chunks + 1, np.int64)
            total = int(nb.gap_bounds(self.codes, numel, chunk, self.ks, self.ps, vs))
            if total < 0:
                raise ValueError(f"its gap code does not fit {numel} entries")
        else:
            if self.codes.size and self.codes[-1] == 255:
                raise ValueError("its gap code ends in an escape byte")
            c = self.codes.astype(np.int64)
            self.positions = np.cumsum(c + (c < 255))[c < 255] - 1
            if self.positions.size and self.positions[-1] >= numel:
                raise ValueError(f"its gap code names entry {int(self.positions[-1])} of "
                                 f"{numel}")
            vs = np.searchsorted(self.positions, np.arange(n_chunks + 1) * chunk)
            total = int(self.positions.size)
        self.first = [int(v) for v in vs]
        self.first[-1] = total

    @property
    def total(self) -> int:
        """Set bits in the tensor."""
        return self.first[-1]

    def count(self, c: int) -> int:
        """Set bits in chunk ``c``."""
        return self.first[c + 1] - self.first[c]

    def scatter(self, c: int, out_bits: np.ndarray, values: np.ndarray) -> None:
        """Write chunk ``c``'s values (``values``: the tensor's, raw bits) into ``out_bits``
        (the chunk's entries)."""
        v0, v1 = self.first[c], self.first[c + 1]
        if v1 == v0:
            return
        lo = c * self.chunk
        if self._nb is not None:
            self._nb.scatter_gaps(out_bits, lo, self.codes, int(self.ks[c]),
                                  int(self.ks[c + 1]), int(self.ps[c]), values[v0:v1])
        else:
            out_bits[self.positions[v0:v1] - lo] = values[v0:v1]
