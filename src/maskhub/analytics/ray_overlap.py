"""The all-pairs overlap pass as Ray tasks over byte ranges of the packed masks.

The driver cuts every tensor's packed bytes into ranges of whole store chunks, groups
consecutive ranges into about :data:`~maskhub.diff.ray.TASKS_PER_SLOT` tasks per CPU
(balanced by bytes), and sends each task the stores' locations (local paths on a shared
filesystem, or ``s3://`` URLs) and its ranges. A task opens the stores itself, decodes each
range of every mask once and counts each mask's set bits and every pair's intersection on it
(the same counter as the local pass, :class:`~maskhub.analytics.overlap._Counter`). The driver
sums the integer counts per tensor, checks each mask's total against the index and builds
the same results as :func:`~maskhub.analytics.overlap.count_overlaps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskhub.analytics.compatibility import Layout
from maskhub.analytics.overlap_counting import (
    BLOCK_BYTES,
    BLOCKS_BUDGET,
    PackedSource,
    _Counter,
    assemble_counts,
)
from maskhub.analytics.overlap_results import TensorOverlap
from maskhub.core.raytasks import MAX_RETRIES, TASKS_PER_SLOT, connect, gather, plan_groups
from maskhub.schemas.metadata import TensorStats
from maskhub.schemas.progress import ProgressFn
from maskhub.storage.store import CHUNK_BYTES, MaskStore

if TYPE_CHECKING:
    from maskhub.core.record import MaskRecord

#: ``(tensor's stats, first byte, end byte)``: one range of packed bytes, in every mask.
Range = tuple[TensorStats, int, int]


class _StoreRef:
    """What :class:`PackedSource` needs of a mask on a worker: its location and store."""

    def __init__(self, path: str) -> None:
        self.path: Path | str = path
        self._store: MaskStore | None = None

    @property
    def store(self) -> MaskStore:
        """The store, opened on first use (on the worker)."""
        if self._store is None:
            self._store = MaskStore(self.path)
        return self._store


def range_bytes(n_masks: int) -> int:
    """Packed bytes per range: whole chunks, at most 64 MiB, fewer for many masks so that a
    task's buffers stay within the local pass's budget (never below one chunk)."""
    per_mask = min(BLOCK_BYTES, BLOCKS_BUDGET // max(1, n_masks + 1))
    return max(CHUNK_BYTES, per_mask // CHUNK_BYTES * CHUNK_BYTES)


def count_ranges(paths: Sequence[str], ranges: Sequence[Range],
                 pairs: Sequence[tuple[int, int]]) -> list[tuple[list[int], list[int]]]:
    """The body of one Ray task: for each range, the set bits of every store in ``paths`` and
    the intersection of every pair (indices into ``paths``). Runs anywhere, with or without
    Ray."""
    refs = [_StoreRef(p) for p in paths]
    counter = _Counter(len(refs), pairs)
    sources: dict[str, list[PackedSource]] = {}
    out = []
    for st, start, stop in ranges:
        srcs = sources.get(st.tensor)
        if srcs is None:
            sources.clear()  # ranges come tensor by tensor
            srcs = sources[st.tensor] = [PackedSource(r, st) for r in refs]  # type: ignore[arg-type]
        unit = max(stop - start, *(s.chunk for s in srcs))
        out.append(counter(srcs, start, stop, st.numel % 8, unit))
    return out


def ray_count_overlaps(address: str | None, masks: Sequence[MaskRecord], layout: Layout,
                       pairs: Sequence[tuple[int, int]], progress: ProgressFn | None = None
                       ) -> dict[tuple[int, int], list[TensorOverlap]]:
    """:func:`~maskhub.analytics.overlap.count_overlaps` as Ray tasks: the same per-tensor
    counts of ``pairs`` (indices into ``masks``), each mask read once."""
    involved = sorted({i for p in pairs for i in p})
    pos = {m: n for n, m in enumerate(involved)}
    local_pairs = [(pos[i], pos[j]) for i, j in pairs]
    tensors = layout.tensors
    ones = [[0] * len(involved) for _ in tensors]
    both = [[0] * len(pairs) for _ in tensors]
    if not involved:
        return {p: [] for p in pairs}
    step = range_bytes(len(involved))
    units: list[tuple[int, int, int]] = []
    for k, st in enumerate(tensors):
        nbytes = (st.numel + 7) // 8
        units.extend((k, start, min(nbytes, start + step)) for start in range(0, nbytes, step))
    ray = connect(address)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
    groups = plan_groups([stop - start for _, start, stop in units], slots * TASKS_PER_SLOT) \
        if units else []
    task = ray.remote(count_ranges).options(
        num_cpus=1, max_retries=MAX_RETRIES,
        retry_exceptions=[OSError, RuntimeError, ConnectionError, TimeoutError])
    paths = [str(masks[i].path) for i in involved]
    refs: list[Any] = []
    for a, b in groups:
        ranges = [(tensors[k], start, stop) for k, start, stop in units[a:b]]
        refs.append(task.remote(paths, ranges, local_pairs))
    total_bytes = sum(stop - start for _, start, stop in units) * len(involved)
    done_bytes = [0]

    def collect(g: int, counted: list[tuple[list[int], list[int]]]) -> None:
        a, b = groups[g]
        for (k, start, stop), (o, bo) in zip(units[a:b], counted, strict=True):
            ones[k] = [x + y for x, y in zip(ones[k], o, strict=True)]
            both[k] = [x + y for x, y in zip(both[k], bo, strict=True)]
            done_bytes[0] += (stop - start) * len(involved)
        if progress is not None:
            k_last = units[b - 1][0]
            progress(k_last, len(tensors), done_bytes[0], total_bytes, tensors[k_last].tensor)

    gather(ray, refs, collect)
    per_pair = assemble_counts(masks, layout, pairs, involved, ones, both)
    if progress is not None:
        progress(len(tensors), len(tensors), done_bytes[0], total_bytes, "")
    return per_pair
