"""The overlap cache: results stored in the ``"overlaps"`` and ``tensor_overlaps`` tables and
read back (oriented as asked) instead of counting again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from maskhub.analytics.overlap_results import OverlapResult, TensorOverlap
from maskhub.core.provenance import iso

if TYPE_CHECKING:
    from maskhub.core.home import Home
    from maskhub.core.record import MaskRecord


_OVERLAP_COLUMNS = (
    "mask_a", "mask_b", "n_params", "n_tensors", "n_a", "n_b", "n_both", "o1", "o2",
    "o1_random", "o2_random", "o1_stratified", "o2_stratified", "jaccard", "expected_random",
    "expected_stratified", "var_stratified", "z_score", "p_value", "log10_p_value",
    "computed_at", "expected_magnitude", "var_magnitude", "o1_magnitude", "o2_magnitude",
    "z_magnitude", "log10_p_magnitude",
)
_TENSOR_COLUMNS = ("mask_a", "mask_b", "position", "tensor", "layer", "module", "numel", "n_a",
                   "n_b", "n_both")


def _tensor_schema() -> Any:
    import pyarrow as pa  # only when results are stored: a cached read needs none

    return pa.schema([
        ("mask_a", pa.string()), ("mask_b", pa.string()), ("position", pa.int32()),
        ("tensor", pa.string()), ("layer", pa.int32()), ("module", pa.string()),
        ("numel", pa.int64()), ("n_a", pa.int64()), ("n_b", pa.int64()), ("n_both", pa.int64()),
    ])


def load_cached(registry: Home, masks: Sequence[MaskRecord],
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
                computed_at=iso(row["computed_at"]),
                expected_magnitude=_float(row.get("expected_magnitude")),
                var_magnitude=_float(row.get("var_magnitude")))
            out[(i, j)] = res.swapped() if flip else res
            break
    return out


def save_results(registry: Home, results: Sequence[OverlapResult]) -> None:
    """Store results (summary and per-tensor rows) in one transaction, replacing old ones.

    Pairs whose masks were removed meanwhile are skipped; nothing is stored in a registry
    this process cannot write (the results are a cache).
    """
    if not results or not registry.index.writable:
        return
    cols = ", ".join(_OVERLAP_COLUMNS)
    marks = ", ".join("?" for _ in _OVERLAP_COLUMNS)
    trows: dict[str, list[Any]] = {name: [] for name in _TENSOR_COLUMNS}
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
            # the duckdb package (not only the engine maskhub imports: storage/engine.py) sets
            # up the engine's scan of Arrow tables; pyarrow costs more than it anyway
            import duckdb  # noqa: F401
            import pyarrow as pa

            con.register("_maskhub_tensor_rows", pa.Table.from_pydict(trows, _tensor_schema()))
            try:
                con.execute("INSERT INTO tensor_overlaps (mask_a, mask_b, position, tensor, "
                            "layer, module, numel, n_a, n_b, n_both) "
                            "SELECT * FROM _maskhub_tensor_rows")
            finally:
                con.unregister("_maskhub_tensor_rows")


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
