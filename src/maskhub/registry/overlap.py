"""Overlap of update masks: exact counts on packed bits, random baselines, significance.

For two masks I1 (``a``) and I2 (``b``) over the same N parameters:

* ``o1 = |I1 ∩ I2| / |I1|`` and ``o2 = |I1 ∩ I2| / |I2|`` (paper, section 5);
* uniform random baseline (paper, Appendix E): ``o1_random = |I2| / N``, ``o2_random = |I1| / N``;
* stratified random baseline: random placement inside each tensor keeping each tensor's own
  counts, ``E|I1 ∩ I2| = Σ_t n1_t n2_t / N_t``;
* significance: per tensor the intersection count under the stratified null is hypergeometric
  (mean ``n1 n2 / N``, variance ``n1 n2 (N - n1)(N - n2) / (N² (N - 1))``); tensors are
  independent, so means and variances add. ``z = (|I1 ∩ I2| - E) / sqrt(Var)``; ``p`` is the
  one-sided normal tail ``P(Z >= z)``.

Every count is an exact integer: popcount (``np.bitwise_count``) of the packed uint8 arrays,
read one chunk-sized range at a time into reused buffers (memory stays bounded), with the
padding bits of a tensor's last byte cleared first. ``count_overlaps`` decodes each mask's
chunks once whatever the number of pairs. Results are cached in the ``"overlaps"`` and
``tensor_overlaps`` tables.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import zarr
from numcodecs import Zstd

from maskhub.errors import IncompatibleMasksError, MaskStoreError, UsageError
from maskhub.schemas.metadata import TensorStats

if TYPE_CHECKING:
    from maskhub.registry.api import Mask, Registry

#: Largest block of packed bytes read from one mask at a time (64 MiB = 512 Mi parameters).
BLOCK_BYTES = 64 << 20
#: Budget for the blocks of all masks held at once by an all-pairs pass.
BLOCKS_BUDGET = 512 << 20
#: Most threads a counting pass uses (one per core below this).
MAX_WORKERS = 8
_ZSTD = Zstd()

#: ``progress(tensors_done, tensors_total, bytes_done, bytes_total, tensor_name)``
ProgressFn = Callable[[int, int, int, int, str], None]


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorOverlap:
    """Exact counts of one tensor for one pair of masks."""

    tensor: str
    numel: int
    n_a: int
    n_b: int
    n_both: int
    layer: int | None = None
    module: str = ""

    @property
    def expected(self) -> float:
        """E|I1 ∩ I2| within this tensor under random placement (hypergeometric mean)."""
        return self.n_a * self.n_b / self.numel if self.numel else 0.0

    @property
    def variance(self) -> float:
        """Variance of |I1 ∩ I2| within this tensor under random placement."""
        n, a, b = self.numel, self.n_a, self.n_b
        if n < 2:
            return 0.0
        return a * b * (n - a) * (n - b) / (n * n * (n - 1))

    @property
    def o1(self) -> float | None:
        """|I1 ∩ I2| / |I1| within this tensor (None when I1 is empty here)."""
        return self.n_both / self.n_a if self.n_a else None

    @property
    def o2(self) -> float | None:
        """|I1 ∩ I2| / |I2| within this tensor (None when I2 is empty here)."""
        return self.n_both / self.n_b if self.n_b else None

    def swapped(self) -> TensorOverlap:
        """The same counts with the roles of the two masks exchanged."""
        return replace(self, n_a=self.n_b, n_b=self.n_a)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form with the derived overlaps."""
        return {"tensor": self.tensor, "layer": self.layer, "module": self.module,
                "numel": self.numel, "n_a": self.n_a, "n_b": self.n_b, "n_both": self.n_both,
                "o1": self.o1, "o2": self.o2,
                "o1_random": self.n_b / self.numel if self.numel else None,
                "o2_random": self.n_a / self.numel if self.numel else None}


@dataclass(frozen=True)
class OverlapResult:
    """Overlap of mask ``a`` (I1) with mask ``b`` (I2), with both random baselines."""

    mask_a: str
    mask_b: str
    name_a: str
    name_b: str
    n_params: int
    n_tensors: int
    n_a: int
    n_b: int
    n_both: int
    expected_stratified: float
    var_stratified: float
    tensors: tuple[TensorOverlap, ...] = ()
    cached: bool = False
    computed_at: str = ""

    @classmethod
    def from_tensors(cls, a: Mask, b: Mask, tensors: Sequence[TensorOverlap]) -> OverlapResult:
        """Aggregate per-tensor counts into the pair's result (sums of exact integers)."""
        return cls(
            mask_a=a.id, mask_b=b.id, name_a=a.name, name_b=b.name,
            n_params=sum(t.numel for t in tensors), n_tensors=len(tensors),
            n_a=sum(t.n_a for t in tensors), n_b=sum(t.n_b for t in tensors),
            n_both=sum(t.n_both for t in tensors),
            expected_stratified=math.fsum(t.expected for t in tensors),
            var_stratified=math.fsum(t.variance for t in tensors),
            tensors=tuple(tensors), computed_at=_now())

    # overlaps ----------------------------------------------------------------------------
    @property
    def o1(self) -> float | None:
        """|I1 ∩ I2| / |I1|: the share of a's updates that b also updated."""
        return self.n_both / self.n_a if self.n_a else None

    @property
    def o2(self) -> float | None:
        """|I1 ∩ I2| / |I2|: the share of b's updates that a also updated."""
        return self.n_both / self.n_b if self.n_b else None

    @property
    def jaccard(self) -> float | None:
        """|I1 ∩ I2| / |I1 ∪ I2| (None when both masks are empty)."""
        union = self.n_a + self.n_b - self.n_both
        return self.n_both / union if union else None

    # baselines ---------------------------------------------------------------------------
    @property
    def expected_random(self) -> float:
        """E|I1 ∩ I2| for uniformly random masks of the same sizes: n_a n_b / N."""
        return self.n_a * self.n_b / self.n_params if self.n_params else 0.0

    @property
    def o1_random(self) -> float | None:
        """Uniform baseline of o1 (Appendix E): the density of b."""
        return self.n_b / self.n_params if self.n_params and self.n_a else None

    @property
    def o2_random(self) -> float | None:
        """Uniform baseline of o2 (Appendix E): the density of a."""
        return self.n_a / self.n_params if self.n_params and self.n_b else None

    @property
    def o1_stratified(self) -> float | None:
        """Stratified baseline of o1: Σ_t n1_t n2_t / N_t divided by |I1|."""
        return self.expected_stratified / self.n_a if self.n_a else None

    @property
    def o2_stratified(self) -> float | None:
        """Stratified baseline of o2: Σ_t n1_t n2_t / N_t divided by |I2|."""
        return self.expected_stratified / self.n_b if self.n_b else None

    @property
    def lift_random(self) -> float | None:
        """|I1 ∩ I2| over its uniform expectation (also o1 / o1_random)."""
        e = self.expected_random
        return self.n_both / e if e else None

    @property
    def lift_stratified(self) -> float | None:
        """|I1 ∩ I2| over its stratified expectation (also o1 / o1_stratified)."""
        e = self.expected_stratified
        return self.n_both / e if e else None

    # significance ------------------------------------------------------------------------
    @property
    def z_score(self) -> float | None:
        """(|I1 ∩ I2| - E) / sqrt(Var) under the stratified null; None when Var = 0."""
        if self.var_stratified <= 0:
            return None
        return (self.n_both - self.expected_stratified) / math.sqrt(self.var_stratified)

    @property
    def p_value(self) -> float | None:
        """One-sided normal tail P(Z >= z) (0.0 once below the smallest double)."""
        z = self.z_score
        return None if z is None else 0.5 * math.erfc(z / math.sqrt(2))

    @property
    def log10_p_value(self) -> float | None:
        """log10 of :attr:`p_value`, finite even where the p-value itself underflows."""
        z = self.z_score
        return None if z is None else log10_normal_tail(z)

    # conversions -------------------------------------------------------------------------
    def swapped(self) -> OverlapResult:
        """The same result with a and b exchanged (o1 and o2 trade places)."""
        return replace(self, mask_a=self.mask_b, mask_b=self.mask_a, name_a=self.name_b,
                       name_b=self.name_a, n_a=self.n_b, n_b=self.n_a,
                       tensors=tuple(t.swapped() for t in self.tensors))

    def to_row(self) -> dict[str, Any]:
        """The row of the ``overlaps`` table."""
        return {
            "mask_a": self.mask_a, "mask_b": self.mask_b, "n_params": self.n_params,
            "n_tensors": self.n_tensors, "n_a": self.n_a, "n_b": self.n_b,
            "n_both": self.n_both, "o1": self.o1, "o2": self.o2, "o1_random": self.o1_random,
            "o2_random": self.o2_random, "o1_stratified": self.o1_stratified,
            "o2_stratified": self.o2_stratified, "jaccard": self.jaccard,
            "expected_random": self.expected_random,
            "expected_stratified": self.expected_stratified,
            "var_stratified": self.var_stratified, "z_score": self.z_score,
            "p_value": self.p_value, "log10_p_value": self.log10_p_value,
            "computed_at": self.computed_at or _now(),
        }

    def to_dict(self, with_tensors: bool = True) -> dict[str, Any]:
        """Plain-JSON form: names, the overlaps row and (optionally) the per-tensor rows."""
        d = {"name_a": self.name_a, "name_b": self.name_b, **self.to_row(),
             "lift_random": self.lift_random, "lift_stratified": self.lift_stratified,
             "cached": self.cached}
        if with_tensors:
            d["tensors"] = [t.to_dict() for t in self.tensors]
        return d


@dataclass
class OverlapMatrix:
    """Every pair among a set of masks (the result of an all-pairs pass)."""

    masks: list[Mask]
    results: dict[tuple[int, int], OverlapResult] = field(default_factory=dict)

    def pair(self, i: int, j: int) -> OverlapResult:
        """Result with mask i as ``a`` and mask j as ``b`` (i != j)."""
        if (i, j) in self.results:
            return self.results[(i, j)]
        return self.results[(j, i)].swapped()

    def matrix(self, metric: str = "o1") -> list[list[float | None]]:
        """N x N values of ``metric`` (an :class:`OverlapResult` attribute) with row i as ``a``.

        For ``o1`` cell (i, j) is the share of mask i's updates also updated by mask j; the
        diagonal is that of a mask with itself.
        """
        n = len(self.masks)
        out: list[list[float | None]] = []
        for i in range(n):
            row: list[float | None] = []
            for j in range(n):
                if i == j:
                    row.append(_self_value(self.masks[i], metric))
                else:
                    row.append(getattr(self.pair(i, j), metric))
            out.append(row)
        return out

    @property
    def cached(self) -> int:
        """How many pairs came from the SQL cache."""
        return sum(r.cached for r in self.results.values())

    def to_dict(self, metric: str = "o1") -> dict[str, Any]:
        """Plain-JSON form: the masks, the ``metric`` matrix and every pair."""
        return {"masks": [{"id": m.id, "name": m.name, "n_params": m.n_params,
                           "n_updated": m.n_updated, "sparsity": m.sparsity}
                          for m in self.masks],
                "metric": metric, "matrix": self.matrix(metric),
                "pairs": [r.to_dict(with_tensors=False) for _, r in sorted(self.results.items())]}


def _self_value(mask: Mask, metric: str) -> float | None:
    n, d = mask.n_updated, mask.density
    values: dict[str, float | None] = {
        "o1": 1.0 if n else None, "o2": 1.0 if n else None, "jaccard": 1.0 if n else None,
        "o1_random": d, "o2_random": d, "n_both": float(n),
    }
    return values.get(metric)


def log10_normal_tail(z: float) -> float:
    """log10 P(Z >= z) for a standard normal Z, accurate where erfc underflows."""
    if z < 30:
        return math.log10(0.5 * math.erfc(z / math.sqrt(2)))
    # Mills-ratio expansion: P(Z >= z) = phi(z)/z * (1 - 1/z^2 + 3/z^4 - 15/z^6 ...)
    ln_p = (-z * z / 2 - math.log(z) - 0.5 * math.log(2 * math.pi)
            + math.log1p(-1 / z**2 + 3 / z**4 - 15 / z**6))
    return ln_p / math.log(10)


def _now() -> str:
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds")


def _iso(value: Any) -> str:
    return value.isoformat(timespec="seconds") if isinstance(value, datetime) else str(value)


# -- compatibility ------------------------------------------------------------------------


def tensor_stats(registry: Registry, masks: Sequence[Mask]) -> dict[str, dict[str, TensorStats]]:
    """Per-tensor stats of several masks from the SQL index: ``{mask_id: {tensor: stats}}``."""
    ids = [m.id for m in masks]
    with registry.index.connect(write=False) as con:
        rows = registry.index.rows(
            con, "SELECT * FROM tensors WHERE list_contains(?, mask_id)", [ids])
    out: dict[str, dict[str, TensorStats]] = {i: {} for i in ids}
    for r in rows:
        out[r["mask_id"]][r["tensor"]] = TensorStats(
            tensor=r["tensor"], shape=tuple(r["shape"]), numel=int(r["numel"]),
            n_updated=int(r["n_updated"]), layer=r["layer"], module=r["module"],
            base_dtype=r["base_dtype"] or "", target_dtype=r["target_dtype"] or "")
    return out


@dataclass(frozen=True)
class Layout:
    """The common parameter layout of compatible masks, with each mask's recorded counts."""

    tensors: list[TensorStats]
    counts: dict[str, dict[str, int]]


def check_compatible(registry: Registry, masks: Sequence[Mask]) -> Layout:
    """Check that ``masks`` cover the same parameters of the same base model.

    Raises :class:`IncompatibleMasksError` naming the first mismatch (base model, base
    revision when both record one, a tensor present on one side only, or a shape). Returns the
    tensors in the first mask's checkpoint order and every mask's recorded per-tensor counts.
    """
    if not masks:
        raise UsageError("no masks given")
    stats = tensor_stats(registry, masks)
    first = masks[0]
    ref = stats[first.id]
    for other in masks[1:]:
        ra, rb = first.row, other.row
        if ra["base_model"] != rb["base_model"]:
            raise IncompatibleMasksError(
                f"{first.name} and {other.name} have different base models: "
                f"{ra['base_model']!r} vs {rb['base_model']!r}")
        if ra["base_revision"] and rb["base_revision"] and \
                ra["base_revision"] != rb["base_revision"]:
            raise IncompatibleMasksError(
                f"{first.name} and {other.name} have different base revisions of "
                f"{ra['base_model']}: {ra['base_revision']!r} vs {rb['base_revision']!r}")
        cur = stats[other.id]
        for name in first.tensor_names():
            if name not in cur:
                raise IncompatibleMasksError(
                    f"tensor {name!r} is in {first.name} but not in {other.name}")
        for name in other.tensor_names():
            if name not in ref:
                raise IncompatibleMasksError(
                    f"tensor {name!r} is in {other.name} but not in {first.name}")
        for name in first.tensor_names():
            if ref[name].shape != cur[name].shape:
                raise IncompatibleMasksError(
                    f"tensor {name!r} has shape {list(ref[name].shape)} in {first.name} but "
                    f"{list(cur[name].shape)} in {other.name}")
    counts = {m: {t: st.n_updated for t, st in per.items()} for m, per in stats.items()}
    return Layout([ref[name] for name in first.tensor_names()], counts)


# -- reading packed bits in blocks --------------------------------------------------------


def packed_array(mask: Mask, stats: TensorStats) -> zarr.Array:
    """The zarr array of one tensor's packed bits, checked against its recorded size."""
    try:
        arr = mask.store.group[stats.tensor]
    except KeyError as exc:
        raise MaskStoreError(f"{mask.path}: tensor {stats.tensor!r} is missing from the store",
                             str(mask.path)) from exc
    nbytes = (stats.numel + 7) // 8
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


def popcount(buf: np.ndarray) -> int:
    """Number of set bits of a contiguous uint8 array, as an exact int."""
    n8 = buf.size // 8 * 8
    total = 0
    if n8:
        total += int(np.bitwise_count(buf[:n8].view(np.uint64)).sum(dtype=np.int64))
    if n8 < buf.size:
        total += int(np.bitwise_count(buf[n8:]).sum(dtype=np.int64))
    return total


class PackedSource:
    """Reads byte ranges of one tensor's packed bits into caller-owned buffers.

    Fast path, for the layout :class:`MaskWriter` produces (a local store, one dimension,
    codecs ``bytes`` + ``zstd``, fill value 0): a whole chunk is read from its file and
    zstd-decoded straight into the buffer, which avoids zarr's per-read allocations and copies
    (about 1.5x faster). Anything else (another store, codec or range) is read through
    zarr slicing. Chunks that zarr did not write (all zero) read as zeros either way.
    """

    def __init__(self, mask: Mask, stats: TensorStats) -> None:
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


def _direct_dir(arr: zarr.Array) -> Path | None:
    """The directory of an array's chunk files when the fast path applies, else None."""
    from zarr.codecs import BytesCodec, ZstdCodec
    from zarr.storage import LocalStore

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
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS, by_budget))


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
    masks: Sequence[Mask],
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


def assemble_counts(masks: Sequence[Mask], layout: Layout, pairs: Sequence[tuple[int, int]],
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


# -- SQL cache ----------------------------------------------------------------------------

_OVERLAP_COLUMNS = (
    "mask_a", "mask_b", "n_params", "n_tensors", "n_a", "n_b", "n_both", "o1", "o2",
    "o1_random", "o2_random", "o1_stratified", "o2_stratified", "jaccard", "expected_random",
    "expected_stratified", "var_stratified", "z_score", "p_value", "log10_p_value",
    "computed_at",
)
_TENSOR_SCHEMA = pa.schema([
    ("mask_a", pa.string()), ("mask_b", pa.string()), ("position", pa.int32()),
    ("tensor", pa.string()), ("layer", pa.int32()), ("module", pa.string()),
    ("numel", pa.int64()), ("n_a", pa.int64()), ("n_b", pa.int64()), ("n_both", pa.int64()),
])


def load_cached(registry: Registry, masks: Sequence[Mask],
                pairs: Sequence[tuple[int, int]], with_tensors: bool
                ) -> dict[tuple[int, int], OverlapResult]:
    """Stored results of ``pairs`` (either orientation), oriented as asked."""
    if not pairs:
        return {}
    ids = sorted({masks[i].id for p in pairs for i in p})
    with registry.index.connect(write=False) as con:
        rows = registry.index.rows(
            con, 'SELECT * FROM "overlaps" WHERE list_contains(?, mask_a) '
                 "AND list_contains(?, mask_b)", [ids, ids])
        trows = registry.index.rows(
            con, "SELECT * FROM tensor_overlaps WHERE list_contains(?, mask_a) "
                 "AND list_contains(?, mask_b) ORDER BY position", [ids, ids]
        ) if with_tensors else []
    by_key = {(r["mask_a"], r["mask_b"]): r for r in rows}
    tensors: dict[tuple[str, str], list[TensorOverlap]] = {}
    for t in trows:
        tensors.setdefault((t["mask_a"], t["mask_b"]), []).append(TensorOverlap(
            tensor=t["tensor"], numel=int(t["numel"]), n_a=int(t["n_a"]), n_b=int(t["n_b"]),
            n_both=int(t["n_both"]), layer=t["layer"], module=t["module"]))
    out: dict[tuple[int, int], OverlapResult] = {}
    for i, j in pairs:
        a, b = masks[i], masks[j]
        for key, flip in (((a.id, b.id), False), ((b.id, a.id), True)):
            row = by_key.get(key)
            if row is None:
                continue
            if with_tensors and key not in tensors and row["n_tensors"]:
                continue  # summary without its tensor rows: recompute
            x, y = (b, a) if flip else (a, b)
            res = OverlapResult(
                mask_a=x.id, mask_b=y.id, name_a=x.name, name_b=y.name,
                n_params=int(row["n_params"]), n_tensors=int(row["n_tensors"]),
                n_a=int(row["n_a"]), n_b=int(row["n_b"]), n_both=int(row["n_both"]),
                expected_stratified=float(row["expected_stratified"]),
                var_stratified=float(row["var_stratified"]),
                tensors=tuple(tensors.get(key, ())), cached=True,
                computed_at=_iso(row["computed_at"]))
            out[(i, j)] = res.swapped() if flip else res
            break
    return out


def save_results(registry: Registry, results: Sequence[OverlapResult]) -> None:
    """Store results (summary and per-tensor rows) in one transaction, replacing old ones.

    Pairs whose masks were removed meanwhile are skipped; nothing is stored in a registry
    this process cannot write (the results are a cache).
    """
    if not results or not registry.index.writable:
        return
    cols = ", ".join(_OVERLAP_COLUMNS)
    marks = ", ".join("?" for _ in _OVERLAP_COLUMNS)
    trows: dict[str, list[Any]] = {f.name: [] for f in _TENSOR_SCHEMA}
    with registry.index.connect() as con:
        ids = sorted({r.mask_a for r in results} | {r.mask_b for r in results})
        alive = {r[0] for r in con.execute(
            "SELECT id FROM masks WHERE list_contains(?, id)", [ids]).fetchall()}
        keep = [r for r in results if r.mask_a in alive and r.mask_b in alive]
        for r in keep:
            con.execute('DELETE FROM "overlaps" WHERE (mask_a = ? AND mask_b = ?) '
                        "OR (mask_a = ? AND mask_b = ?)",
                        [r.mask_a, r.mask_b, r.mask_b, r.mask_a])
            con.execute("DELETE FROM tensor_overlaps WHERE (mask_a = ? AND mask_b = ?) "
                        "OR (mask_a = ? AND mask_b = ?)",
                        [r.mask_a, r.mask_b, r.mask_b, r.mask_a])
            row = r.to_row()
            con.execute(f'INSERT INTO "overlaps" ({cols}) VALUES ({marks})',
                        [row[c] for c in _OVERLAP_COLUMNS])
            for pos, t in enumerate(r.tensors):
                for key, value in (("mask_a", r.mask_a), ("mask_b", r.mask_b),
                                   ("position", pos), ("tensor", t.tensor),
                                   ("layer", t.layer), ("module", t.module),
                                   ("numel", t.numel), ("n_a", t.n_a), ("n_b", t.n_b),
                                   ("n_both", t.n_both)):
                    trows[key].append(value)
        if trows["tensor"]:
            con.register("_maskhub_tensor_rows", pa.Table.from_pydict(trows, _TENSOR_SCHEMA))
            try:
                con.execute("INSERT INTO tensor_overlaps (mask_a, mask_b, position, tensor, "
                            "layer, module, numel, n_a, n_b, n_both) "
                            "SELECT * FROM _maskhub_tensor_rows")
            finally:
                con.unregister("_maskhub_tensor_rows")


# -- entry points -------------------------------------------------------------------------


def overlap(registry: Registry, a: Mask, b: Mask, *, refresh: bool = False,
            progress: ProgressFn | None = None) -> OverlapResult:
    """Overlap of ``a`` with ``b``: from the SQL cache, else counted and stored."""
    masks = [a, b]
    layout = check_compatible(registry, masks)
    if not refresh:
        cached = load_cached(registry, masks, [(0, 1)], with_tensors=True)
        if (0, 1) in cached:
            return cached[(0, 1)]
    counts = count_overlaps(masks, layout, [(0, 1)], progress)
    result = OverlapResult.from_tensors(a, b, counts[(0, 1)])
    save_results(registry, [result])
    return result


def overlap_all(registry: Registry, masks: Sequence[Mask], *, refresh: bool = False,
                progress: ProgressFn | None = None, ray: str | None = None) -> OverlapMatrix:
    """Every pair among ``masks``: cached pairs are reused, the others counted in one pass.

    The pass reads each mask involved in a missing pair once (see :func:`count_overlaps`).
    ``ray``: count as Ray tasks over byte ranges instead, the partial counts summed here (a
    cluster address, or ``"auto"``; see :mod:`maskhub.registry.rayoverlap`). Same counts.
    """
    masks = list(masks)
    if len(masks) < 2:
        raise UsageError("an all-pairs overlap needs at least two masks")
    if len({m.id for m in masks}) != len(masks):
        raise UsageError("the same mask is listed twice")
    layout = check_compatible(registry, masks)
    pairs = [(i, j) for i in range(len(masks)) for j in range(i + 1, len(masks))]
    results = {} if refresh else load_cached(registry, masks, pairs, with_tensors=False)
    missing = [p for p in pairs if p not in results]
    if missing:
        if ray is not None:
            from maskhub.registry.rayoverlap import ray_count_overlaps

            counts = ray_count_overlaps(ray, masks, layout, missing, progress)
        else:
            counts = count_overlaps(masks, layout, missing, progress)
        fresh = {p: OverlapResult.from_tensors(masks[p[0]], masks[p[1]], counts[p])
                 for p in missing}
        save_results(registry, list(fresh.values()))
        results.update(fresh)
    return OverlapMatrix(masks, results)


def select_masks(registry: Registry, refs: Sequence[str] = (),
                 base_model: str | None = None) -> list[Mask]:
    """The masks of an all-pairs pass: ``refs`` (names or id prefixes), else every mask of
    ``base_model``, else every registered mask when they all share one base model."""
    if refs:
        masks = [registry.get(r) for r in refs]
        if base_model is not None:
            for m in masks:
                if m.row["base_model"] != base_model:
                    raise IncompatibleMasksError(
                        f"{m.name} has base model {m.row['base_model']!r}, not {base_model!r}")
        return masks
    with registry.index.connect(write=False) as con:
        if base_model is not None:
            ids = [r[0] for r in con.execute(
                "SELECT id FROM masks WHERE base_model = ? ORDER BY created_at, name",
                [base_model]).fetchall()]
            if not ids:
                raise UsageError(f"no registered mask has base model {base_model!r}")
        else:
            rows = con.execute(
                "SELECT id, base_model FROM masks ORDER BY created_at, name").fetchall()
            models = sorted({r[1] for r in rows})
            if len(models) > 1:
                shown = ", ".join(models[:5])
                raise IncompatibleMasksError(
                    f"the registry holds masks of {len(models)} base models ({shown}); "
                    "choose one with --base-model or list the masks")
            ids = [r[0] for r in rows]
    return [registry.get(i) for i in ids]
