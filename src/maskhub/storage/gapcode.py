"""The byte-gap layout of a low-density mask array (``encoding: "gaps-u8"``).

A tensor whose mask is sparse is smaller stored as the gaps between its set bits than as
packed bits: packed bits + zstd reach 1.6x the entropy bound at 2% density and 1.27x at 5%,
the byte-gap code 1.01x (BENCHMARKS.md). The code, for the set positions ``i_0 < i_1 < ...``
of the flattened mask, with gaps ``g_k = i_k - i_{k-1} - 1`` (``i_{-1} = -1``):

* a gap below 255 is one byte, the gap itself;
* a larger gap is ``g // 255`` bytes of 255 (each one "255 more zeros") then one byte
  ``g % 255``.

So every byte below 255 ends one set bit, and the position of that bit is the running sum of
all bytes so far plus one per earlier set bit. With zarr and numpy only::

    c = a[:].astype(np.int64)
    idx = np.cumsum(c + (c < 255))[c < 255] - 1   # flat indices of the set bits
    bits = np.zeros(math.prod(a.attrs["shape"]), bool); bits[idx] = True

The array is ``uint8`` with the same codecs and chunking as a packed array (``bytes`` +
``zstd`` level 1: on these codes level 1 compresses better than level 3, which spends bits on
spurious matches); its length is the code's length, not ``ceil(numel / 8)``.

Encoding and decoding go through the numba kernels of :mod:`maskhub.kernels.gapkernel` for
large tensors (one pass, ~1 GB/s) when numba is loaded already or the tensor is very large,
else through numpy, in blocks (loading numba costs ~110 MB of resident memory and its start-up).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

#: The array attribute naming a non-default layout; absent means packed bits.
ENCODING_ATTR = "encoding"
#: The byte-gap layout described above.
GAPS_U8 = "gaps-u8"
#: Layouts this maskhub reads (``None``: packed bits).
KNOWN_ENCODINGS = (None, GAPS_U8)
#: Below this density a tensor is stored as its gap code, from it as packed bits. Measured on
#: i.i.d. masks: the gap code stays at 1.01x the entropy bound at every density, packed bits
#: + zstd-1 are 1.074x at 10%, 1.044x at 12%, 1.017x at 19%; encoding the gap code costs
#: ~9x the packed bits' compression (0.146 against 0.017 CPU-s per 65 M entries at 19%), so
#: trying both above 12% would buy under 0.3% of the store at the price of most of a warm
#: diff's CPU time.
GAPS_DENSITY = 0.12
#: Packed bytes from which the numba kernels are used when numba is already loaded (a diff on
#: the numba backend); below, or without numba loaded, numpy in blocks.
KERNEL_MIN_BYTES = 1 << 20
#: Packed bytes from which the numba kernels are used even when that loads numba (~110 MB of
#: resident LLVM/JIT state on first use: more than numpy's block buffers cost up to here).
KERNEL_LOAD_BYTES = 64 << 20
#: Packed bytes per block of the numpy encoder (bounds its temporaries to ~12x this).
NUMPY_BLOCK = 256 << 10


def _use_kernel(nbytes: int) -> bool:
    import sys

    return nbytes >= KERNEL_LOAD_BYTES or (nbytes >= KERNEL_MIN_BYTES and "numba" in sys.modules)


class GapCodeError(ValueError):
    """A gap code that names a position outside its tensor (a damaged array)."""


def encode(packed: np.ndarray, numel: int) -> np.ndarray:
    """The byte-gap code (uint8) of the first ``numel`` bits of ``packed`` (little bit order);
    padding bits of the last byte are ignored."""
    import numpy as np

    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if _use_kernel(packed.size):
        from maskhub.kernels.bitcount import count_entries
        from maskhub.kernels.gapkernel import encode_gaps

        out = np.empty(count_entries(packed, numel) + numel // 255 + 1, dtype=np.uint8)
        return out[:encode_gaps(packed, numel, out)].copy()
    parts, last = [], -1
    for start in range(0, packed.size, NUMPY_BLOCK):
        idx = set_indices(packed[start:start + NUMPY_BLOCK], numel - 8 * start) + 8 * start
        if idx.size:
            parts.append(codes_of_indices(idx, last))
            last = int(idx[-1])
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


@cache
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """Set bits of each byte value, and their positions (little bit order), left-aligned
    (built on first use: importing this module imports no numpy)."""
    import numpy as np

    pop = np.array([bin(v).count("1") for v in range(256)], dtype=np.int32)
    pos = np.array([[j for j in range(8) if v >> j & 1] + [0] * (8 - bin(v).count("1"))
                    for v in range(256)], dtype=np.int32)
    return pop, pos


def set_indices(packed: np.ndarray, numel: int) -> np.ndarray:
    """Flat indices (int64, ascending) of the set bits among the first ``numel`` of ``packed``
    (a table lookup per nonzero byte; int32 arithmetic below 2**28 bytes)."""
    import numpy as np

    pop, pos = _tables()
    nz = np.flatnonzero(packed)
    if packed.size < (1 << 28):
        nz = nz.astype(np.int32)
    vals = packed[nz]
    cnt = pop[vals]
    rep = np.repeat(np.arange(nz.size, dtype=nz.dtype), cnt)
    first = np.cumsum(cnt, dtype=nz.dtype) - cnt
    within = np.arange(rep.size, dtype=nz.dtype) - first[rep]
    idx = nz[rep].astype(np.int64) * 8 + pos[vals[rep], within]
    return idx[idx < numel]


def codes_of_indices(idx: np.ndarray, last: int = -1) -> np.ndarray:
    """The byte-gap code of ascending flat indices (following a set bit at ``last``)."""
    import numpy as np

    gaps = np.diff(np.asarray(idx, dtype=np.int64), prepend=last) - 1
    extra = gaps // 255
    if not extra.any():
        return gaps.astype(np.uint8)
    ends = np.cumsum(extra + 1) - 1
    out = np.full(int(ends[-1]) + 1 if ends.size else 0, 255, dtype=np.uint8)
    out[ends] = gaps % 255
    return out


def indices(codes: np.ndarray) -> np.ndarray:
    """Flat indices of the set bits a byte-gap code names (the README's two numpy lines)."""
    import numpy as np

    c = np.asarray(codes).astype(np.int64)
    return np.cumsum(c + (c < 255))[c < 255] - 1


def count(codes: np.ndarray | bytes | bytearray | memoryview, numel: int) -> int:
    """The number of set bits a byte-gap code names for a tensor of ``numel`` entries, with
    the checks of :func:`decode` and without decoding: the count is the number of bytes below
    255, and the last set position (the only one that can fall outside the tensor, positions
    ascending) is the sum of all bytes plus that count, minus one. Raises
    :class:`GapCodeError` for a code that does not fit the tensor.

    ``codes``: a uint8 array or any bytes-like object; the count needs no numpy (a push and
    a pull validate their gap codes without importing it, :func:`byte_sum`)."""
    data = _as_bytes(codes)
    if not data:
        return 0
    if data[-1] == 255:
        raise GapCodeError("its gap code ends in an escape byte")
    n = len(data) - data.count(255)
    last = byte_sum(data) + n - 1
    if last >= numel:
        raise GapCodeError(f"its gap code names entry {last} of {numel}")
    return n


def _as_bytes(codes: object) -> bytes | bytearray:
    """``codes`` as bytes: a bytes-like object as it is (a memoryview copied), anything else
    (a uint8 array...) through numpy, as :func:`count` took it before."""
    if isinstance(codes, bytes | bytearray):
        return codes
    if isinstance(codes, memoryview) and codes.c_contiguous and codes.itemsize == 1:
        return codes.tobytes()
    import numpy as np

    return np.ascontiguousarray(np.asarray(codes, dtype=np.uint8).reshape(-1)).tobytes()


#: Bytes per block of :func:`byte_sum`: 256 bytes sum to at most 65,280, below Adler-32's
#: modulus 65,521, so the low half of each block's checksum is its exact sum plus one.
_SUM_BLOCK = 256


def byte_sum(data: bytes | bytearray | memoryview) -> int:
    """The exact sum of the unsigned bytes of ``data``, at C speed without numpy: Adler-32
    (``zlib``) of each 256-byte block, whose low 16 bits are ``1 + sum mod 65521``, and no
    256 bytes sum to 65,521 (~1.2 ms per MB, against ~5.5 ms for ``sum(data)``)."""
    import zlib

    view = memoryview(data).cast("B")
    adler = zlib.adler32
    return sum((adler(view[i:i + _SUM_BLOCK]) & 0xFFFF) - 1
               for i in range(0, view.nbytes, _SUM_BLOCK))


def decode(codes: np.ndarray, numel: int) -> tuple[np.ndarray, int]:
    """``(packed bits, number of set bits)`` of a byte-gap code for a tensor of ``numel``
    entries; raises :class:`GapCodeError` for a code that does not fit the tensor."""
    import numpy as np

    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    nbytes = (numel + 7) // 8
    out = np.zeros(nbytes, dtype=np.uint8)
    if _use_kernel(nbytes):
        from maskhub.kernels.gapkernel import decode_gaps

        count = int(decode_gaps(codes, numel, out))
        if count < 0:
            raise GapCodeError(f"its gap code does not fit {numel} entries")
        return out, count
    if codes.size and codes[-1] == 255:
        raise GapCodeError("its gap code ends in an escape byte")
    idx = indices(codes)
    if idx.size and idx[-1] >= numel:
        raise GapCodeError(f"its gap code names entry {int(idx[-1])} of {numel}")
    if idx.size:
        byte = idx >> 3
        vals = np.left_shift(np.uint8(1), (idx & 7).astype(np.uint8))
        starts = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
        out[byte[starts]] = np.bitwise_or.reduceat(vals, starts)
    return out, int(idx.size)


class LazyPacked:
    """The packed bits of a gap-coded tensor behind the slicing interface of a 1-d zarr array
    (``shape``, ``dtype``, ``chunks``, ``a[start:stop]``), decoded on the first read and
    released once every byte has been read (range readers read each byte once)."""

    def __init__(self, load: Callable[[], np.ndarray], nbytes: int, chunk: int) -> None:
        """``load()`` returns the decoded packed bits, ``nbytes`` long."""
        import numpy as np

        self._load = load
        self.shape = (nbytes,)
        self.dtype = np.dtype(np.uint8)
        self.chunks = (max(1, min(nbytes, chunk)),)
        self._data: np.ndarray | None = None
        self._served = 0
        self._lock = threading.Lock()

    def __getitem__(self, key: slice) -> np.ndarray:
        """A copy of bytes ``key`` (a slice)."""
        with self._lock:
            data = self._data if self._data is not None else self._load()
            part = data[key].copy()
            self._served += part.size
            self._data = None if self._served >= self.shape[0] else data
        return part
