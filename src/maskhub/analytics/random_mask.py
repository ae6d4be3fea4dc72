"""``combine random --like MASK``: a random-placement control of a mask.

The Multiple Ticket Hypothesis asks whether *the* RL subnetwork matters or any subnetwork of
the same size does; the control is a mask with the same number of updated entries at random
positions, trained with the same ``MaskedAdamW``. Two ways to keep the count:

* ``per="tensor"``: each tensor keeps its count, the positions uniform inside the tensor;
* ``per="magnitude"``: each tensor keeps its count *per exponent of |θ0|* (the magnitude
  strata of :mod:`maskhub.kernels.strata`): the control then has the same magnitude profile
  as the mask (in bf16 small weights move, large ones cannot), so a difference in training is
  about *which* entries, not *how large*. This needs θ0's exponents: the base checkpoint is
  read (``base``, default the mask's recorded ``base_model``) and checked against the mask's
  stored strata (the entries per exponent must match exactly: same base, or an error).

Placement is exact and memory-bounded: the tensor is cut into blocks of :data:`BLOCK` entries;
each block's share of a cell's count is drawn from the hypergeometric law (the number of
chosen entries that fall in the block when ``k`` of ``N`` are chosen uniformly), then the
positions inside the block uniformly without replacement. The result is a uniformly random
``k``-subset of each cell, and the counts are exact. Random numbers come from numpy's PCG64
seeded with ``(seed, tensor index)``: the same seed gives the same mask on any machine.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from maskhub.analytics.compatibility import check_compatible, tensor_strata
from maskhub.core.provenance import timestamp
from maskhub.errors import UsageError
from maskhub.kernels.strata import FORMATS as STRATA_FORMATS
from maskhub.kernels.strata import WHOLE_TENSOR
from maskhub.schemas.metadata import BITORDER, MaskMetadata, TensorStats
from maskhub.schemas.names import mask_name_from
from maskhub.schemas.progress import ProgressFn
from maskhub.storage.files import remove_tree
from maskhub.storage.store import MaskWriter

if TYPE_CHECKING:
    from maskhub.core.home import Home
    from maskhub.core.record import MaskRecord

#: Entries per placement block (a multiple of 8: blocks pack to whole bytes).
BLOCK = 1 << 20
PER = ("tensor", "magnitude")

#: ``labels(start, stop)``: the cell (exponent field) of entries ``start:stop``.
LabelFn = Callable[[int, int], np.ndarray]


def split_count(rng: np.random.Generator, sizes: list[int], k: int) -> list[int]:
    """How many of ``k`` entries chosen uniformly among ``sum(sizes)`` fall in each part: the
    multivariate hypergeometric law, drawn by halving the parts (each draw sees fewer than
    10^9 entries per side, numpy's limit, up to 2·10^9 entries in all)."""
    if len(sizes) == 1 or k == 0:
        return [k] + [0] * (len(sizes) - 1) if len(sizes) == 1 else [0] * len(sizes)
    mid = len(sizes) // 2
    left, right = sum(sizes[:mid]), sum(sizes[mid:])
    if k == left + right:
        kl = left
    else:
        kl = int(rng.hypergeometric(left, right, k)) if left and right else (k if left else 0)
    return split_count(rng, sizes[:mid], kl) + split_count(rng, sizes[mid:], k - kl)


def place_random(rng: np.random.Generator, n: int, cells: dict[int, tuple[int, int]],
                 labels: LabelFn | None = None) -> np.ndarray:
    """Packed bits (little bit order) of ``n`` entries with, for each cell ``c`` of
    ``cells = {c: (entries, chosen)}``, exactly ``chosen`` of its entries set, uniformly.
    ``labels`` gives each entry's cell (read twice: counts per block, then placement); None:
    one cell holding every entry."""
    out = np.zeros((n + 7) // 8, dtype=np.uint8)
    starts = list(range(0, n, BLOCK))
    if labels is None:
        (cell,) = cells
        sizes = {cell: [min(BLOCK, n - s) for s in starts]}
    else:
        sizes = {c: [] for c in cells}
        for s in starts:
            lab = labels(s, min(n, s + BLOCK))
            for c in cells:
                sizes[c].append(int(np.count_nonzero(lab == c)))
    draws = {c: split_count(rng, sizes[c], k) for c, (_, k) in cells.items()}
    for b, start in enumerate(starts):
        stop = min(n, start + BLOCK)
        if not any(draws[c][b] for c in cells):
            continue
        lab = labels(start, stop) if labels is not None else None
        bits = np.zeros(stop - start, dtype=bool)
        for c in cells:
            m = draws[c][b]
            if m:
                where = np.arange(stop - start) if lab is None else np.flatnonzero(lab == c)
                bits[rng.choice(where, size=m, replace=False)] = True
        out[start // 8:(stop + 7) // 8] = np.packbits(bits, bitorder=BITORDER)
    return out


def _open_base(base: str, like: MaskRecord, tensors: list[TensorStats]) -> tuple[Any, Any]:
    """Open the base checkpoint (headers and a mapping) and check its tensors' shapes."""
    from maskhub.checkpoints.mapped import MappedCheckpoint
    from maskhub.checkpoints.sources import open_checkpoint

    ck = open_checkpoint(base)
    try:
        for st in tensors:
            info = ck.tensors.get(st.tensor)
            if info is None or tuple(info.shape) != tuple(st.shape):
                raise UsageError(f"{base} is not the base of {like.name}: tensor {st.tensor!r} "
                                 + ("is missing" if info is None else
                                    f"has shape {list(info.shape)}, not {list(st.shape)}"))
        return ck, MappedCheckpoint(ck)
    except BaseException:
        ck.close()
        raise


def random_like(registry: Home, like: MaskRecord, *, per: str = "tensor", seed: int = 0,
                base: str | None = None, name: str | None = None, notes: str | None = None,
                progress: ProgressFn | None = None) -> MaskRecord:
    """Register a random mask with ``like``'s count per tensor (``per="tensor"``) or per
    tensor and exponent of |θ0| (``per="magnitude"``, reading ``base``), seeded by ``seed``,
    with lineage (``operation = 'random'``, ``parents = [like.id]``)."""
    if per not in PER:
        raise UsageError(f"--per must be one of {', '.join(PER)}, not {per!r}")
    if not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--seed must be an integer >= 0, not {seed!r}")
    if per == "tensor" and base is not None:
        raise UsageError("--base applies to --per magnitude only")
    if name is None:
        name = registry.free_name(mask_name_from(f"random-{like.name}")[:120])
    else:
        registry.check_new_name(name)
    layout = check_compatible(registry, [like])
    strata = tensor_strata(registry, [like])[like.id]
    opened = None
    if per == "magnitude":
        if not strata:
            raise UsageError(f"{like.name} has no magnitude strata (a mask imported or made by "
                             "combine): use --per tensor")
        base = base or like.row["base_model"] + (f"@{like.row['base_revision']}"
                                                 if like.row["base_revision"] else "")
        opened = _open_base(base, like, layout.tensors)
    mask_id = uuid.uuid4().hex
    tmp = registry.new_store_location(mask_id)
    stats: list[TensorStats] = []
    strata_rows: list[tuple[str, int, int, int]] = []
    total = sum(t.numel for t in layout.tensors)
    done = 0
    try:
        writer = MaskWriter(tmp)
        for i, st in enumerate(layout.tensors):
            rng = np.random.Generator(np.random.PCG64([seed, i]))
            labels: LabelFn | None = None
            cells: dict[int, tuple[int, int]] = {}
            if per == "magnitude":
                cells = strata.get(st.tensor, {})
                labels = _labels_of(opened, st, cells, base or "", like.name)
            if not cells or labels is None:
                cells = {0: (st.numel, st.n_updated)}
            packed = place_random(rng, st.numel, cells, labels)
            new = TensorStats(tensor=st.tensor, shape=st.shape, numel=st.numel,
                              n_updated=st.n_updated, layer=st.layer, module=st.module,
                              base_dtype=st.base_dtype, target_dtype=st.target_dtype)
            writer.add(new, packed)
            stats.append(new)
            if per == "magnitude" and st.tensor in strata:
                strata_rows += [(st.tensor, s, e, k)
                                for s, (e, k) in sorted(strata[st.tensor].items())]
            done += st.numel
            if progress is not None:
                progress(i + 1, len(layout.tensors), done, total, st.tensor)
        r = like.row
        meta = MaskMetadata(
            id=mask_id, name=name, base_model=r["base_model"], base_revision=r["base_revision"],
            target_model=f"random({like.name}, per {per}, seed {seed})",
            n_params=sum(s.numel for s in stats), n_updated=sum(s.n_updated for s in stats),
            tol=float(r["tol"]), dataset=r["dataset"], dtype=r["dtype"] or "", seed=seed,
            created_at=timestamp(), parents=(like.id,), operation="random", notes=notes,
            tags=("random-control",),
            extra={"parent_names": [like.name], "random_per": per, "random_seed": seed},
        )
        writer.finish(meta)
    except BaseException:
        remove_tree(tmp)
        raise
    finally:
        if opened is not None:
            ck, mapped = opened  # type: ignore[misc]
            mapped.close()
            ck.close()

    def lineage(con: object) -> None:  # in the mask's own transaction
        con.execute(  # type: ignore[attr-defined]
            "INSERT INTO mask_lineage (mask_id, position, parent_id, operation, min_count) "
            "VALUES (?, 0, ?, 'random', NULL)", [mask_id, like.id])

    return registry.register_store(tmp, meta, stats, strata=strata_rows, extra=lineage)


def _labels_of(opened: object, st: TensorStats, cells: dict[int, tuple[int, int]], base: str,
               like: str) -> LabelFn | None:
    """The exponent field of each base entry of ``st``, checked against ``cells``."""
    ck, mapped = opened  # type: ignore[misc]
    info = ck.tensors[st.tensor]
    fmt = STRATA_FORMATS.get(info.dtype)
    if fmt is None:
        if cells and set(cells) != {WHOLE_TENSOR}:
            raise UsageError(f"{base} is not the base of {like}: tensor {st.tensor!r} is "
                             f"{info.dtype}")
        return None  # one cell: the whole tensor
    if not st.numel:
        return None
    if WHOLE_TENSOR in cells:
        raise UsageError(f"{base} is not the base of {like}: tensor {st.tensor!r} is "
                         f"{info.dtype}")
    view, shift, emask = fmt
    raw = mapped.region(st.tensor).raw().view(view)
    counts = np.bincount((raw >> view(shift)) & view(emask), minlength=256)
    expected = np.zeros(256, dtype=np.int64)
    for s, (e, _) in cells.items():
        expected[s] = e
    if not np.array_equal(counts, expected):
        raise UsageError(f"{base} is not the base of {like}: tensor {st.tensor!r} has other "
                         "magnitudes than the mask's strata record")

    def labels(start: int, stop: int) -> np.ndarray:
        return ((raw[start:stop] >> view(shift)) & view(emask)).astype(np.int64)
    return labels
