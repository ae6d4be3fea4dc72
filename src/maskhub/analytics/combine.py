"""Mask algebra: intersect, union, difference and consensus of registered masks.

Results are new masks, computed on the packed bits block by block (never unpacked), written
tensor by tensor through :class:`~maskhub.storage.store.MaskWriter` and registered through
:meth:`Registry.register_store` with their lineage: ``masks.operation``, ``masks.parents``
(ordered ids) and the ``mask_lineage`` table (which also records a consensus's ``min_count``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from maskhub.analytics.compatibility import check_compatible
from maskhub.analytics.overlap_counting import iter_blocks, packed_array
from maskhub.core.provenance import timestamp
from maskhub.errors import UsageError
from maskhub.kernels.bitcount import popcount
from maskhub.schemas.metadata import COMBINE_OPERATIONS, MaskMetadata, TensorStats
from maskhub.schemas.names import mask_name_from
from maskhub.schemas.progress import ProgressFn
from maskhub.storage.files import remove_tree
from maskhub.storage.store import MaskWriter

if TYPE_CHECKING:
    from maskhub.core.home import Home
    from maskhub.core.record import MaskRecord

OPERATIONS = COMBINE_OPERATIONS


def combine_blocks(operation: str, blocks: Sequence[np.ndarray], min_count: int = 1
                   ) -> np.ndarray:
    """Combine aligned packed-bit blocks (uint8, same length) into a new block.

    ``intersect``: in every input; ``union``: in any; ``difference``: in the first and in
    none of the others; ``consensus``: in at least ``min_count`` inputs.
    """
    first, rest = blocks[0], blocks[1:]
    if operation == "intersect":
        out = first.copy()
        for b in rest:
            np.bitwise_and(out, b, out=out)
        return out
    if operation == "union":
        out = first.copy()
        for b in rest:
            np.bitwise_or(out, b, out=out)
        return out
    if operation == "difference":
        others = np.zeros_like(first)
        for b in rest:
            np.bitwise_or(others, b, out=others)
        return np.bitwise_and(first, np.invert(others, out=others), out=others)
    if operation == "consensus":
        return _at_least(blocks, min_count)
    raise UsageError(f"unknown operation {operation!r}; choose one of {', '.join(OPERATIONS)}")


def _at_least(blocks: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Bits set in at least ``k`` blocks, with a bit-sliced counter (8 positions per byte).

    ``planes[i]`` holds bit i of every position's count; each input is added with a ripple
    carry, then the count is compared with ``k`` from the most significant bit down.
    """
    nbits = len(blocks).bit_length()
    planes = [np.zeros_like(blocks[0]) for _ in range(nbits)]
    carry = np.empty_like(blocks[0])
    tmp = np.empty_like(blocks[0])
    for x in blocks:
        np.copyto(carry, x)
        for p in planes:
            np.bitwise_and(p, carry, out=tmp)
            np.bitwise_xor(p, carry, out=p)
            carry, tmp = tmp, carry
    gt = np.zeros_like(blocks[0])
    eq = np.full_like(blocks[0], 0xFF)
    for bit in reversed(range(nbits)):
        p = planes[bit]
        if (k >> bit) & 1:
            np.bitwise_and(eq, p, out=eq)
        else:
            np.bitwise_or(gt, np.bitwise_and(eq, p, out=tmp), out=gt)
            np.bitwise_and(eq, np.invert(p, out=tmp), out=eq)
    return np.bitwise_or(gt, eq, out=gt)


def _check_args(operation: str, masks: Sequence[MaskRecord], min_count: int | None) -> int:
    if operation not in OPERATIONS:
        raise UsageError(f"unknown operation {operation!r}; choose one of {', '.join(OPERATIONS)}")
    if len(masks) < 2:
        raise UsageError(f"{operation} needs at least two masks")
    if len({m.id for m in masks}) != len(masks):
        raise UsageError("the same mask is listed twice")
    if operation != "consensus":
        if min_count is not None:
            raise UsageError("--min-count applies to consensus only")
        return 1
    k = len(masks) // 2 + 1 if min_count is None else min_count
    if not 1 <= k <= len(masks):
        raise UsageError(f"--min-count must be between 1 and {len(masks)} (the number of "
                         f"masks), not {k}")
    return k


def _default_name(registry: Home, operation: str, masks: Sequence[MaskRecord]) -> str:
    return registry.free_name(
        mask_name_from(f"{operation}-" + "-".join(m.name for m in masks))[:120])


def _common(rows: Sequence[dict[str, Any]], key: str) -> Any:
    values = {r[key] for r in rows}
    return values.pop() if len(values) == 1 else None


def combine(registry: Home, operation: str, masks: Sequence[MaskRecord], *,
            name: str | None = None, min_count: int | None = None,
            notes: str | None = None, progress: ProgressFn | None = None) -> MaskRecord:
    """Combine ``masks`` into a new registered mask (see :func:`combine_blocks`).

    ``difference`` is the first mask minus every other one. ``consensus`` keeps parameters
    updated in at least ``min_count`` masks (default: a strict majority). The new mask records
    ``operation``, ``parents`` (ids, in order), the parents' base model, and the largest of
    their tolerances as ``tol``. Nothing is registered if anything fails.
    """
    k = _check_args(operation, masks, min_count)
    if name is None:
        name = _default_name(registry, operation, masks)
    else:
        registry.check_new_name(name)
    layout = check_compatible(registry, masks)
    mask_id = uuid.uuid4().hex
    tmp = registry.new_store_location(mask_id)
    rows = [m.row for m in masks]
    total = sum((t.numel + 7) // 8 for t in layout.tensors) * len(masks)
    done = 0
    stats: list[TensorStats] = []
    try:
        writer = MaskWriter(tmp)
        for n, st in enumerate(layout.tensors):
            arrays = [packed_array(m, st) for m in masks]
            nbytes = (st.numel + 7) // 8
            out = np.empty(nbytes, np.uint8)
            start = 0
            for blocks in iter_blocks(arrays, st.numel):
                stop = start + blocks[0].size
                out[start:stop] = combine_blocks(operation, blocks, k)
                start = stop
                done += blocks[0].size * len(masks)
                if progress is not None:
                    progress(n, len(layout.tensors), done, total, st.tensor)
            if st.numel % 8 and nbytes:
                out[-1] &= (1 << (st.numel % 8)) - 1
            new = TensorStats(tensor=st.tensor, shape=st.shape, numel=st.numel,
                              n_updated=popcount(out), layer=st.layer, module=st.module,
                              base_dtype=st.base_dtype, target_dtype=st.target_dtype)
            writer.add(new, out)
            stats.append(new)
        tols = [float(r["tol"]) for r in rows]
        meta = MaskMetadata(
            id=mask_id, name=name, base_model=rows[0]["base_model"],
            base_revision=_common(rows, "base_revision"),
            target_model=f"{operation}({', '.join(m.name for m in masks)})",
            n_params=sum(s.numel for s in stats), n_updated=sum(s.n_updated for s in stats),
            tol=max(tols), algorithm=_common(rows, "algorithm"), seed=_common(rows, "seed"),
            dataset=_common(rows, "dataset"), dtype=_common(rows, "dtype") or "",
            created_at=timestamp(), parents=tuple(m.id for m in masks), operation=operation,
            notes=notes, base_fingerprint=_common(rows, "base_fingerprint"),
            extra={"parent_names": [m.name for m in masks], "parent_tols": tols,
                   **({"min_count": k} if operation == "consensus" else {})},
        )
        writer.finish(meta)
    except BaseException:
        remove_tree(tmp)
        raise

    def lineage(con: Any) -> None:  # in the mask's own transaction: both commit, or neither
        con.executemany(
            "INSERT INTO mask_lineage (mask_id, position, parent_id, operation, min_count) "
            "VALUES (?, ?, ?, ?, ?)",
            [[mask_id, i, m.id, operation, k if operation == "consensus" else None]
             for i, m in enumerate(masks)])

    return registry.register_store(tmp, meta, stats, extra=lineage)
