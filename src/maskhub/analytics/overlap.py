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

from collections.abc import Sequence
from typing import TYPE_CHECKING

from maskhub.analytics.compatibility import check_compatible, tensor_strata
from maskhub.analytics.overlap_cache import load_cached, save_results
from maskhub.analytics.overlap_results import (
    OverlapMatrix,
    OverlapResult,
    TensorOverlap,
    magnitude_null,
)
from maskhub.errors import IncompatibleMasksError, UsageError
from maskhub.schemas.progress import ProgressFn

if TYPE_CHECKING:
    from maskhub.core.home import Home
    from maskhub.core.record import MaskRecord

__all__ = ["OverlapMatrix", "OverlapResult", "TensorOverlap", "overlap", "overlap_all",
           "select_masks"]


def overlap(registry: Home, a: str | MaskRecord, b: str | MaskRecord, *,
            refresh: bool = False, progress: ProgressFn | None = None) -> OverlapResult:
    """Overlap of ``a`` with ``b`` (masks, or their names / id prefixes): from the SQL
    cache, else counted and stored. A cached answer costs one DuckDB connection."""
    with registry.index.connect(write=False):
        a = registry.get(a) if isinstance(a, str) else a
        b = registry.get(b) if isinstance(b, str) else b
        masks = [a, b]
        # A stored result proves the pair was compatible (masks never change): checked first.
        cached = {} if refresh else load_cached(registry, masks, [(0, 1)], with_tensors=True)
        if (0, 1) in cached:
            return cached[(0, 1)]
        layout = check_compatible(registry, masks)
        strata = tensor_strata(registry, masks)
    from maskhub.analytics.overlap_counting import count_overlaps  # zarr: only to count

    counts = count_overlaps(masks, layout, [(0, 1)], progress)
    result = OverlapResult.from_tensors(a, b, counts[(0, 1)],
                                        magnitude_null(strata[a.id], strata[b.id]))
    save_results(registry, [result])
    return result


def overlap_all(registry: Home, masks: Sequence[MaskRecord], *, refresh: bool = False,
                progress: ProgressFn | None = None, ray: str | None = None) -> OverlapMatrix:
    """Every pair among ``masks``: cached pairs are reused, the others counted in one pass.

    The pass reads each mask involved in a missing pair once (see :func:`count_overlaps`).
    ``ray``: count as Ray tasks over byte ranges instead, the partial counts summed here (a
    cluster address, or ``"auto"``; see :mod:`maskhub.analytics.ray_overlap`). Same counts.
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
            from maskhub.analytics.ray_overlap import ray_count_overlaps

            counts = ray_count_overlaps(ray, masks, layout, missing, progress)
        else:
            from maskhub.analytics.overlap_counting import count_overlaps

            counts = count_overlaps(masks, layout, missing, progress)
        strata = tensor_strata(registry, [masks[i] for i in {i for p in missing for i in p}])
        fresh = {p: OverlapResult.from_tensors(
                     masks[p[0]], masks[p[1]], counts[p],
                     magnitude_null(strata[masks[p[0]].id], strata[masks[p[1]].id]))
                 for p in missing}
        save_results(registry, list(fresh.values()))
        results.update(fresh)
    return OverlapMatrix(masks, results)


def select_masks(registry: Home, refs: Sequence[str] = (),
                 base_model: str | None = None) -> list[MaskRecord]:
    """The masks of an all-pairs pass: ``refs`` (names or id prefixes), else every mask of
    ``base_model``, else every registered mask when they all share one base model.

    ``base_model``: a recorded base model name, or a local path (resolved as ``diff`` records
    it: ``./llama-sft`` matches masks of ``/abs/llama-sft``). A base is known by its content:
    the masks whose base has the same fingerprint as a mask recorded under that name belong
    to it too, wherever their base lay."""
    from maskhub.core.provenance import model_name

    if base_model is not None:
        base_model = model_name(base_model)
    with registry.index.connect(write=False) as con:
        rows = con.execute(
            "SELECT id, base_model, base_fingerprint FROM masks ORDER BY created_at, name"
        ).fetchall()
    if base_model is not None:
        prints = {r[2] for r in rows if r[1] == base_model and r[2]}
        of_base = {r[0] for r in rows if r[1] == base_model or (r[2] and r[2] in prints)}
    if refs:
        masks = [registry.get(r) for r in refs]
        if base_model is not None:
            for m in masks:
                if m.id not in of_base:
                    raise IncompatibleMasksError(
                        f"{m.name} has base model {m.row['base_model']!r}, not {base_model!r}")
        return masks
    if base_model is not None:
        ids = [r[0] for r in rows if r[0] in of_base]
        if not ids:
            raise UsageError(f"no registered mask has base model {base_model!r}")
    else:
        # one base: one fingerprint where recorded, else one name
        # (a mask without one counts with the fingerprinted masks recorded under its name)
        known: dict[str, set[str]] = {}
        for _, model, fingerprint in rows:
            if fingerprint:
                known.setdefault(model, set()).add(fingerprint)
        names: dict[str, str] = {}
        for _, model, fingerprint in rows:
            key = fingerprint or (min(known[model]) if len(known.get(model, ())) == 1 else model)
            names.setdefault(key, model)
        if len(names) > 1:
            models = sorted(names.values())
            shown = ", ".join(models[:5])
            raise IncompatibleMasksError(
                f"the registry holds masks of {len(models)} base models ({shown}); "
                "choose one with --base-model or list the masks")
        ids = [r[0] for r in rows]
    return [registry.get(i) for i in ids]
