"""Counting overlaps on packed bits: the common layout of compatible masks, block reads of
the stores, and the one-pass all-pairs counter (exact popcounts)."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr
from numcodecs import Zstd

from maskhub.analytics.overlap_results import TensorOverlap
from maskhub.errors import MaskStoreError
from maskhub.kernels.bitcount import popcount
from maskhub.kernels.threads import available_cpus
from maskhub.schemas.metadata import TensorStats
from maskhub.schemas.progress import ProgressFn
from maskhub.storage.gapcode import ENCODING_ATTR, LazyPacked
from maskhub.storage.store import CHUNK_BYTES

if TYPE_CHECKING:
    from maskhub.analytics.compatibility import Layout
    from maskhub.core.record import MaskRecord

#: Packed bytes per mask read at a time (whole chunks).
BLOCK_BYTES = 64 << 20
#: Packed bytes all block buffers of a pass may take together.
BLOCKS_BUDGET = 512 << 20
#: Most threads a counting pass uses (one per core below this).
MAX_WORKERS = 8
_ZSTD = Zstd()


def packed_array(mask: MaskRecord, stats: TensorStats) -> zarr.Array | LazyPacked:
    """The zarr array of one tensor's packed bits, checked against its recorded size; for a
    gap-coded array (:mod:`maskhub.storage.gapcode`), its bits decoded on first read."""
    try:
        arr = mask.store.group[stats.tensor]
    except KeyError as exc:
        raise MaskStoreError(f"{mask.path}: tensor {stats.tensor!r} is missing from the store",
                             str(mask.path)) from exc
    nbytes = (stats.numel + 7) // 8
    if isinstance(arr, zarr.Array) and arr.attrs.get(ENCODING_ATTR) is not None:
        store, name = mask.store, stats.tensor
        return LazyPacked(lambda: store.packed(name), nbytes, CHUNK_BYTES)
    if not isinstance(arr, zarr.Array) or arr.dtype != np.uint8 or arr.shape != (nbytes,):
        raise MaskStoreError(f"{mask.path}: {stats.tensor!r} is not uint8[{nbytes}] packed bits",
                             str(mask.path))
    return arr


def block_size(arrays: Sequence[zarr.Array], budget: int = BLOCKS_BUDGET) -> int:
    """Bytes per block: a whole number of chunks, so that no chunk is decoded twice."""
    chunk = max(int(a.chunks[0]) for a in arrays) if arrays else 1
    lcm = 1
    for a in arrays:
        lcm = math.lcm(lcm, int(a.chunks[0]))
    unit = lcm if lcm <= BLOCK_BYTES else chunk  # odd chunkings: some chunks decoded twice
    per_mask = max(unit, min(BLOCK_BYTES, budget // max(1, len(arrays))))
    return max(unit, per_mask // unit * unit)


def iter_blocks(arrays: Sequence[zarr.Array], numel: int,
                budget: int = BLOCKS_BUDGET) -> Iterator[list[np.ndarray]]:
    """Yield the same byte range of every array, padding bits of the last byte cleared."""
    nbytes = (numel + 7) // 8
    step = block_size(arrays, budget)
    tail = numel % 8
    for start in range(0, nbytes, step):
        stop = min(nbytes, start + step)
        blocks = [np.ascontiguousarray(a[start:stop]) for a in arrays]
        if tail and stop == nbytes:
            for blk in blocks:
                blk[-1] &= (1 << tail) - 1
        yield blocks


class PackedSource:
    """Reads byte ranges of one tensor's packed bits into caller-owned buffers.

    Fast path, for the layout :class:`MaskWriter` produces (a local store, one dimension,
    codecs ``bytes`` + ``zstd``, fill value 0): a whole chunk is read from its file and
    zstd-decoded straight into the buffer, which avoids zarr's per-read allocations and copies
    (about 1.5x faster). Anything else (another store, codec or range) is read through
    zarr slicing. Chunks that zarr did not write (all zero) read as zeros either way.
    """

    def __init__(self, mask: MaskRecord, stats: TensorStats) -> None:
        """Open the array of ``stats.tensor`` in ``mask``'s store."""
        self.mask = mask
        self.tensor = stats.tensor
        self.arr = packed_array(mask, stats)
        self.nbytes = int(self.arr.shape[0])
        self.chunk = int(self.arr.chunks[0])
        self._dir = _direct_dir(self.arr)

    def read(self, start: int, stop: int, out: np.ndarray,
             raw: bytearray | None = None) -> np.ndarray:
        """Bytes ``[start, stop)`` into ``out`` (at least one chunk long); returns the view.

        ``raw``: a reusable buffer for the compressed chunk (grown when too small).
        """
        n = stop - start
        try:
            if self._dir is not None and start % self.chunk == 0 and n <= self.chunk and \
                    (n == self.chunk or stop == self.nbytes) and out.size >= self.chunk:
                key = self.arr.metadata.encode_chunk_key((start // self.chunk,))
                try:
                    f = open(self._dir / key, "rb", buffering=0)
                except FileNotFoundError:
                    out[:n] = 0
                    return out[:n]
                with f:
                    size = os.fstat(f.fileno()).st_size
                    if raw is None or len(raw) < size:
                        raw = bytearray(size)
                    view = memoryview(raw)[:size]
                    got = f.readinto(view)
                    if got != size:
                        raise OSError(f"short read of chunk {key}")
                _ZSTD.decode(view, out=out[: self.chunk])
                return out[:n]
            out[:n] = self.arr[start:stop]
            return out[:n]
        except (OSError, RuntimeError, ValueError) as exc:
            raise MaskStoreError(f"{self.mask.path}: cannot read bytes {start}:{stop} of "
                                 f"{self.tensor!r}: {exc}", str(self.mask.path)) from exc


def _direct_dir(arr: zarr.Array | LazyPacked) -> Path | None:
    """The directory of an array's chunk files when the fast path applies, else None."""
    from zarr.codecs import BytesCodec, ZstdCodec
    from zarr.storage import LocalStore

    if not isinstance(arr, zarr.Array):
        return None
    meta = arr.metadata
    codecs = getattr(meta, "codecs", ())
    if not (isinstance(arr.store, LocalStore) and getattr(meta, "zarr_format", 0) == 3
            and len(arr.shape) == 1 and len(codecs) == 2
            and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], ZstdCodec)
            and int(meta.fill_value) == 0):
        return None
    return Path(arr.store.root) / arr.path


def _workers(n_masks: int, unit: int) -> int:
    """Threads for a pass: one per core, fewer when their buffers would exceed the budget."""
    by_budget = BLOCKS_BUDGET // max(1, (n_masks + 1) * unit)
    return max(1, min(available_cpus(), MAX_WORKERS, by_budget))


class _Counter:
    """Counts set bits and pair intersections on one byte range, with per-thread buffers."""

    def __init__(self, n_masks: int, pairs: Sequence[tuple[int, int]]) -> None:
        self.n_masks = n_masks
        self.pairs = pairs
        self.local = threading.local()

    def buffers(self, size: int) -> list[np.ndarray]:
        bufs = getattr(self.local, "bufs", None)
        if bufs is None or bufs[0].size < size:
            # one buffer per mask plus a scratch for the ANDs, reused across ranges
            bufs = [np.empty(size, np.uint8) for _ in range(self.n_masks + 1)]
            self.local.bufs = bufs
        return bufs

    def __call__(self, sources: Sequence[PackedSource], start: int, stop: int, tail: int,
                 unit: int) -> tuple[list[int], list[int]]:
        bufs = self.buffers(unit)
        raw = getattr(self.local, "raw", None)
        if raw is None:
            raw = self.local.raw = bytearray(unit + (unit >> 4) + 4096)
        blocks = [src.read(start, stop, buf, raw) for src, buf in zip(sources, bufs, strict=False)]
        if tail and stop == sources[0].nbytes:
            for blk in blocks:
                blk[-1] &= (1 << tail) - 1
        ones = [popcount(b) for b in blocks]
        scratch = bufs[-1][: stop - start]
        both = []
        for i, j in self.pairs:
            np.bitwise_and(blocks[i], blocks[j], out=scratch)
            both.append(popcount(scratch))
        return ones, both


def count_overlaps(
    masks: Sequence[MaskRecord],
    layout: Layout,
    pairs: Sequence[tuple[int, int]],
    progress: ProgressFn | None = None,
) -> dict[tuple[int, int], list[TensorOverlap]]:
    """Per-tensor intersection counts of ``pairs`` (indices into ``masks``) in one pass.

    Every tensor is cut into byte ranges (whole chunks); each range of every mask involved is
    decoded once, into a reused buffer, and all pairs are counted on it, so a mask is read once
    however many pairs there are. Ranges are processed by a thread pool (one thread per core;
    decoding and popcount release the GIL). Each mask's set bits are counted too and checked
    against the index.
    """
    involved = sorted({i for p in pairs for i in p})
    pos = {m: n for n, m in enumerate(involved)}
    local_pairs = [(pos[i], pos[j]) for i, j in pairs]
    per_pair: dict[tuple[int, int], list[TensorOverlap]] = {p: [] for p in pairs}
    if not involved:
        return per_pair
    tensors = layout.tensors
    total_bytes = sum((t.numel + 7) // 8 for t in tensors) * len(involved)
    tasks: list[tuple[int, list[PackedSource], int, int, int]] = []
    unit_max = 1
    for k, st in enumerate(tensors):
        sources = [PackedSource(masks[i], st) for i in involved]
        chunks = {s.chunk for s in sources}
        unit = chunks.pop() if len(chunks) == 1 else block_size([s.arr for s in sources])
        unit_max = max(unit_max, min(unit, sources[0].nbytes))
        for start in range(0, sources[0].nbytes, unit):
            tasks.append((k, sources, start, min(sources[0].nbytes, start + unit), st.numel % 8))
    counter = _Counter(len(involved), local_pairs)
    ones = [[0] * len(involved) for _ in tensors]
    both = [[0] * len(pairs) for _ in tensors]
    done_bytes = 0
    with ThreadPoolExecutor(_workers(len(involved), unit_max)) as pool:
        futures = [(k, stop - start, pool.submit(counter, srcs, start, stop, tail, unit_max))
                   for k, srcs, start, stop, tail in tasks]
        try:
            for k, size, fut in futures:
                o, b = fut.result()
                ones[k] = [x + y for x, y in zip(ones[k], o, strict=True)]
                both[k] = [x + y for x, y in zip(both[k], b, strict=True)]
                done_bytes += size * len(involved)
                if progress is not None:
                    progress(k, len(tensors), done_bytes, total_bytes, tensors[k].tensor)
        except BaseException:
            for _, _, fut in futures:
                fut.cancel()
            raise
    per_pair = assemble_counts(masks, layout, pairs, involved, ones, both)
    if progress is not None:
        progress(len(tensors), len(tensors), done_bytes, total_bytes, "")
    return per_pair


def assemble_counts(masks: Sequence[MaskRecord], layout: Layout, pairs: Sequence[tuple[int, int]],
                    involved: Sequence[int], ones: Sequence[Sequence[int]],
                    both: Sequence[Sequence[int]]) -> dict[tuple[int, int], list[TensorOverlap]]:
    """Per-tensor results of ``pairs`` from summed counts: ``ones[k][n]`` set bits of mask
    ``involved[n]`` in tensor ``k`` of the layout, ``both[k][p]`` the intersection of pair
    ``p``. Each mask's count is checked against the index (a damaged store is an error)."""
    pos = {m: n for n, m in enumerate(involved)}
    per_pair: dict[tuple[int, int], list[TensorOverlap]] = {p: [] for p in pairs}
    for k, st in enumerate(layout.tensors):
        for n, i in enumerate(involved):
            recorded = layout.counts[masks[i].id][st.tensor]
            if ones[k][n] != recorded:
                raise MaskStoreError(
                    f"{masks[i].path}: tensor {st.tensor!r} has {ones[k][n]} set bits but the "
                    f"index records {recorded}; the store is damaged", str(masks[i].path))
        for p, (i, j) in enumerate(pairs):
            per_pair[(i, j)].append(TensorOverlap(
                tensor=st.tensor, numel=st.numel, n_a=ones[k][pos[i]], n_b=ones[k][pos[j]],
                n_both=both[k][p], layer=st.layer, module=st.module))
    return per_pair
