"""Which masks can be compared: same base model, same tensors and shapes, decided from the
SQL index alone (no store is opened, so a cached overlap stays light).

"Same base model" is decided by content when both masks recorded a base fingerprint
(:mod:`maskhub.checkpoints.fingerprint`): the same bytes are the same base whatever the path,
sharding or recorded name; different bytes are different bases even under one name. Masks
without a fingerprint (made before it, or by ``import``) fall back to the recorded name and
revision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from maskhub.analytics.overlap_results import Strata
from maskhub.errors import IncompatibleMasksError, UsageError
from maskhub.schemas.metadata import TensorStats

if TYPE_CHECKING:
    from maskhub.core.home import Home
    from maskhub.core.record import MaskRecord


def tensor_stats(registry: Home, masks: Sequence[MaskRecord]) -> dict[str, dict[str, TensorStats]]:
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


def check_compatible(registry: Home, masks: Sequence[MaskRecord]) -> Layout:
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
        fa, fb = ra.get("base_fingerprint"), rb.get("base_fingerprint")
        if fa and fb:
            if fa != fb:
                raise IncompatibleMasksError(
                    f"{first.name} and {other.name} have different base models: the bytes of "
                    f"{ra['base_model']!r} and {rb['base_model']!r} differ ({fa} vs {fb})")
        elif ra["base_model"] != rb["base_model"]:
            raise IncompatibleMasksError(
                f"{first.name} and {other.name} have different base models: "
                f"{ra['base_model']!r} vs {rb['base_model']!r}")
        elif ra["base_revision"] and rb["base_revision"] and \
                ra["base_revision"] != rb["base_revision"]:
            raise IncompatibleMasksError(
                f"{first.name} and {other.name} have different base revisions of "
                f"{ra['base_model']}: {ra['base_revision']!r} vs {rb['base_revision']!r}")
        cur = stats[other.id]
        for name in ref:
            if name not in cur:
                raise IncompatibleMasksError(
                    f"tensor {name!r} is in {first.name} but not in {other.name}")
        for name in cur:
            if name not in ref:
                raise IncompatibleMasksError(
                    f"tensor {name!r} is in {other.name} but not in {first.name}")
        for name in ref:
            if ref[name].shape != cur[name].shape:
                raise IncompatibleMasksError(
                    f"tensor {name!r} has shape {list(ref[name].shape)} in {first.name} but "
                    f"{list(cur[name].shape)} in {other.name}")
    counts = {m: {t: st.n_updated for t, st in per.items()} for m, per in stats.items()}
    return Layout(list(ref.values()), counts)


def tensor_strata(registry: Home, masks: Sequence[MaskRecord]) -> dict[str, Strata]:
    """Magnitude strata of several masks from the SQL index: ``{mask_id: {tensor: {stratum:
    (numel, n_updated)}}}`` (empty for a mask registered without strata)."""
    ids = [m.id for m in masks]
    with registry.index.connect(write=False) as con:
        rows = con.execute("SELECT mask_id, tensor, stratum, numel, n_updated FROM "
                           "tensor_strata WHERE list_contains(?, mask_id)", [ids]).fetchall()
    out: dict[str, Strata] = {i: {} for i in ids}
    for mask_id, tensor, stratum, numel, n_updated in rows:
        out[mask_id].setdefault(tensor, {})[int(stratum)] = (int(numel), int(n_updated))
    return out
