"""Magnitude strata of a mask: per tensor, how many entries, and how many updated ones, have
each exponent of |θ0|.

In bf16 an entry moves only when its update crosses a rounding point, and the rounding step
doubles with each binade of |θ0|: small weights move, large ones do not. Two runs therefore
overlap on small-magnitude entries by construction; the magnitude-stratified random baseline
of :mod:`maskhub.analytics.overlap_results` keeps each mask's count per tensor *and* per
exponent, so it needs these counts. The stratum of an entry is the exponent field of θ0's
bit pattern (8 bits for bf16 and fp32, which share it, 5 for fp16): the binade, sign
ignored, zero and subnormals in stratum 0, inf/NaN in the top one. Other dtypes have one
stratum, :data:`WHOLE_TENSOR`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from maskhub.kernels import fastkernel
from maskhub.kernels.bitcount import count_entries
from maskhub.schemas.metadata import BITORDER

if TYPE_CHECKING:
    from maskhub.checkpoints.header import TensorInfo

#: The stratum of every entry of a tensor whose dtype has no exponent field maskhub reads.
WHOLE_TENSOR = -1
#: Histogram bins (the widest exponent field, 8 bits).
BINS = 256
#: dtype -> (unsigned view, shift, exponent mask) of its bit patterns.
FORMATS = {
    "bfloat16": (np.uint16, 7, 0xFF),
    "float32": (np.uint32, 23, 0xFF),
    "float16": (np.uint16, 10, 0x1F),
}

#: ``fn(base_raw, packed, n, out)``: add one chunk's counts to ``out`` (int64 ``[2, BINS]``:
#: entries and updated entries per stratum; for :data:`WHOLE_TENSOR` dtypes, bin 0).
StrataFn = Callable[[np.ndarray, np.ndarray, int, np.ndarray], None]


def strata_fn(dtype: str, backend: str, entries: bool = True) -> StrataFn:
    """The function counting strata for a base of ``dtype`` (``backend``: numba or numpy).
    ``entries=False``: count the updated entries only (``out[1]``), for a base tensor whose
    histogram of entries is already known (:class:`StrataCache`)."""
    fmt = FORMATS.get(dtype)
    if fmt is None:
        def whole(a_raw: np.ndarray, packed: np.ndarray, n: int, out: np.ndarray) -> None:
            if entries:
                out[0, 0] += n
            out[1, 0] += count_entries(packed, n)
        return whole
    view, shift, emask = fmt
    if backend == "numba":
        nk = fastkernel.numba_kernels()
        sh, em = view(shift), view(emask)
        kernel = nk.strata_counts if entries else nk.strata_updated

        def fast(a_raw: np.ndarray, packed: np.ndarray, n: int, out: np.ndarray) -> None:
            kernel(a_raw.view(view), sh, em, packed, n, out)
        return fast

    def plain(a_raw: np.ndarray, packed: np.ndarray, n: int, out: np.ndarray) -> None:
        exp = (a_raw.view(view) >> view(shift)) & view(emask)
        if entries:
            out[0] += np.bincount(exp, minlength=BINS)
        bits = np.unpackbits(packed, count=n, bitorder=BITORDER).view(bool)
        out[1] += np.bincount(exp[bits], minlength=BINS)
    return plain


class StrataCache:
    """Each base tensor's histogram of entries per exponent, kept on disk: it depends on θ0
    alone, and a researcher diffs many runs (seeds, algorithms) against one base, so only
    the first diff of a base pays for it (the histogram costs about as much CPU as the diff
    kernel itself; counting the updated entries, by set bit, costs a third of that).

    One ``.npy`` file (int64, :data:`BINS` counts, read with ``allow_pickle=False``) per
    tensor, named by a hash of the file's resolved path, size and modification time and the
    tensor's offset, dtype and size: a rewritten checkpoint gets new keys. Unreadable or
    inconsistent entries are ignored and unwritable directories skipped: it is a cache.
    """

    def __init__(self, directory: Path) -> None:
        """Cache under ``directory`` (created on the first write)."""
        self.directory = Path(directory)
        self._stat: dict[Path, tuple[str, int, int]] = {}

    def _path(self, info: TensorInfo) -> Path | None:
        stat = self._stat.get(info.file)
        if stat is None:
            try:
                st = info.file.stat()
                stat = (str(info.file.resolve()), st.st_size, st.st_mtime_ns)
            except OSError:
                return None
            self._stat[info.file] = stat
        key = "\0".join(str(x) for x in (*stat, info.offset, info.dtype, info.numel))
        return self.directory / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"

    #: Tensors with fewer entries are not cached: counting them costs less than reading a
    #: ``.npy`` file (open, parse its header) or writing one.
    MIN_NUMEL = 1 << 20

    def load(self, info: TensorInfo) -> np.ndarray | None:
        """The cached histogram of ``info``'s entries, or None."""
        if info.numel < self.MIN_NUMEL:
            return None
        path = self._path(info)
        if path is None or not path.is_file():
            return None
        try:
            counts = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if counts.shape != (BINS,) or counts.dtype != np.int64 or counts.sum() != info.numel:
            return None
        return counts

    def save(self, info: TensorInfo, counts: np.ndarray) -> None:
        """Keep ``counts`` (the histogram of ``info``'s entries) for the next diff."""
        if info.numel < self.MIN_NUMEL:
            return
        path = self._path(info)
        if path is None:
            return
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            np.save(tmp, np.ascontiguousarray(counts, dtype=np.int64), allow_pickle=False)
            os.replace(tmp, path)
        except OSError:  # a cache: a full disk only costs the next diff the histogram
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


def strata_rows(tensor: str, dtype: str, counts: np.ndarray) -> list[tuple[str, int, int, int]]:
    """``(tensor, stratum, numel, n_updated)`` rows of the non-empty strata of ``counts``."""
    if dtype not in FORMATS:
        return [(tensor, WHOLE_TENSOR, int(counts[0, 0]), int(counts[1, 0]))]
    return [(tensor, int(e), int(counts[0, e]), int(counts[1, e]))
            for e in np.flatnonzero(counts[0])]
