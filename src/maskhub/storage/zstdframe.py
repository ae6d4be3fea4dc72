"""zstd frames for the store writer without importing numcodecs (whose package import, ~60 ms
with its Blosc thread pool and codec registry, is a sixth of a small diff's CPU).

:func:`compress` calls ``ZSTD_compress`` through ``ctypes``: from the zstd that numcodecs'
extension module carries (loaded as a shared library, without running the numcodecs
package's import), else from the system's ``libzstd``, else numcodecs' ``Zstd`` itself. The
frames are the ones numcodecs writes at ``checksum=False``, byte for byte (a test checks
it), and zarr reads them. :func:`decompress` decodes one frame into a given buffer the
same way (numcodecs' decoder where no library loads).
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


@cache
def _libzstd() -> Any | None:
    """A zstd library with the functions used typed, or None where none can be loaded."""
    spec = importlib.util.find_spec("numcodecs")  # finds the package without importing it
    where = list(spec.submodule_search_locations or []) if spec else []
    bundled = [str(p) for d in where for p in sorted(Path(d).glob("zstd.*.so"))]
    for name in (*bundled, "libzstd.so.1", "libzstd.1.dylib", "libzstd.dylib"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            lib.ZSTD_compressBound.restype = ctypes.c_size_t
            lib.ZSTD_compressBound.argtypes = [ctypes.c_size_t]
            lib.ZSTD_compress.restype = ctypes.c_size_t
            lib.ZSTD_compress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                          ctypes.c_size_t, ctypes.c_int]
            lib.ZSTD_isError.restype = ctypes.c_uint
            lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
            lib.ZSTD_getErrorName.restype = ctypes.c_char_p
            lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
            lib.ZSTD_getFrameContentSize.restype = ctypes.c_ulonglong
            lib.ZSTD_getFrameContentSize.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            lib.ZSTD_decompress.restype = ctypes.c_size_t
            lib.ZSTD_decompress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                            ctypes.c_size_t]
        except AttributeError:  # not a zstd library after all
            continue
        return lib
    return None


@cache
def _numcodecs_zstd(level: int) -> Any:
    from numcodecs import Zstd

    return Zstd(level=level, checksum=False)


def compress(data: np.ndarray, level: int) -> bytes:
    """One zstd frame of the bytes of the contiguous array ``data`` at ``level``."""
    import numpy as np

    lib = _libzstd()
    if lib is None:
        return bytes(_numcodecs_zstd(level).encode(data))
    src = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    bound = lib.ZSTD_compressBound(src.nbytes)
    dst = np.empty(bound, dtype=np.uint8)  # not zero-filled: zstd writes what it returns
    n = lib.ZSTD_compress(dst.ctypes.data, bound, src.ctypes.data, src.nbytes, level)
    if lib.ZSTD_isError(n):  # pragma: no cover - only on a broken library
        return bytes(_numcodecs_zstd(level).encode(data))
    return dst[:n].tobytes()


#: ``ZSTD_getFrameContentSize`` results that are not a size (unknown, error).
_NO_SIZE = (2**64 - 1, 2**64 - 2)


def decompress(data: bytes, out: np.ndarray | bytearray) -> np.ndarray | bytearray:
    """Decode one zstd frame into ``out`` (a contiguous uint8 array, or a ``bytearray``: no
    numpy needed) and return ``out``.

    As numcodecs' ``Zstd.decode(data, out=out)``: a frame that is not one, or declares no
    size, raises RuntimeError; one larger than ``out``, ValueError."""
    lib = _libzstd()
    if lib is None:
        if isinstance(out, bytearray):  # numcodecs decodes into numpy arrays
            import numpy as np

            _numcodecs_zstd(1).decode(data, out=np.frombuffer(out, dtype=np.uint8))
            return out
        return _numcodecs_zstd(1).decode(data, out=out)
    data = bytes(data)  # ctypes passes a bytes object's own buffer
    size = lib.ZSTD_getFrameContentSize(data, len(data))
    if size in _NO_SIZE:
        raise RuntimeError("Zstd decompression error: invalid input data")
    view = memoryview(out).cast("B")  # numpy or bytearray: the same writable bytes
    if size > view.nbytes:
        raise ValueError("destination buffer too small")
    dst = (ctypes.c_char * view.nbytes).from_buffer(view)
    n = lib.ZSTD_decompress(dst, view.nbytes, data, len(data))
    if lib.ZSTD_isError(n):
        raise RuntimeError("Zstd decompression error: "
                           f"{lib.ZSTD_getErrorName(n).decode(errors='replace')}")
    return out
