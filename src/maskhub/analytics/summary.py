"""``show``: one mask summarised from the SQL index alone (no store is opened)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from maskhub.core.home import Home
from maskhub.errors import IncompatibleMasksError
from maskhub.kernels.precision import binade, min_change


def mask_summary(home: Home, ref: str) -> dict[str, Any]:
    """Summary of mask ``ref``: its row, per-layer and per-module tables (a module's weight
    and bias apart: ``param_kind``), the sweep, and the ``--rank/--stats`` summary
    (``analysis``: the mean rank fraction over the 2-D updates of the transformer blocks, the
    paper's Table 2 figure, with the tensors outside the blocks, such as ``embed_tokens`` and
    ``lm_head``, listed apart in ``rank_other``: an embedding's rank is bounded by the tokens
    seen; sign flips, |Δ|; ``None`` when neither was recorded). One DuckDB connection."""
    with home.index.connect(write=False) as con:
        mask = home.get(ref)
        by_layer = home.index.rows(con, """
            SELECT layer, sum(numel) AS numel, sum(n_updated) AS n_updated,
                   1 - sum(n_updated) / sum(numel) AS sparsity
            FROM tensors WHERE mask_id = ? AND layer IS NOT NULL
            GROUP BY layer ORDER BY layer""", [mask.id])
        by_module = home.index.rows(con, """
            SELECT module, coalesce(param_kind, 'weight') AS param_kind, count(*) AS tensors,
                   sum(numel) AS numel, sum(n_updated) AS n_updated,
                   1 - sum(n_updated) / sum(numel) AS sparsity
            FROM tensors WHERE mask_id = ?
            GROUP BY module, param_kind
            ORDER BY min(coalesce(layer, -1)), module, param_kind <> 'weight', param_kind
            """, [mask.id])
        sweep = home.index.rows(con, """
            SELECT tol, sum(n_updated) AS n_updated,
                   1 - sum(n_updated) / (SELECT n_params FROM masks WHERE id = ?) AS sparsity
            FROM tensor_sweep WHERE mask_id = ? GROUP BY tol ORDER BY tol""",
            [mask.id, mask.id])
        analysis = home.index.rows(con, """
            SELECT count(rank) AS n_rank_tensors,
                   avg(rank_fraction) FILTER (WHERE t.layer IS NOT NULL) AS mean_rank_fraction,
                   count(rank) FILTER (WHERE t.layer IS NOT NULL) AS n_block_rank_tensors,
                   avg(rank_fraction) FILTER (WHERE t.layer IS NULL) AS mean_rank_fraction_other,
                   min(rank_fraction) AS min_rank_fraction,
                   count(sign_flips) AS n_stats_tensors, sum(sign_flips) AS sign_flips,
                   sum(a.mean_abs_delta * t.numel) / sum(t.numel)
                       FILTER (WHERE a.mean_abs_delta IS NOT NULL) AS mean_abs_delta,
                   max(a.max_abs_delta) AS max_abs_delta,
                   sum(n_sub_bf16_step) AS n_sub_bf16_step
            FROM tensor_analysis a JOIN tensors t USING (mask_id, tensor)
            WHERE mask_id = ?""", [mask.id])
        summary = analysis[0] if analysis and (analysis[0]["n_rank_tensors"]
                                               or analysis[0]["n_stats_tensors"]) else None
        if summary is not None and summary["n_rank_tensors"]:
            summary["rank_other"] = home.index.rows(con, """
                SELECT a.tensor, a.rank, a.max_rank, a.rank_fraction
                FROM tensor_analysis a JOIN tensors t USING (mask_id, tensor)
                WHERE mask_id = ? AND t.layer IS NULL AND a.rank IS NOT NULL
                ORDER BY a.tensor""", [mask.id])
        strata = home.index.rows(con, """
            SELECT t.base_dtype, t.target_dtype, s.stratum, sum(s.numel) AS numel,
                   sum(s.n_updated) AS n_updated
            FROM tensor_strata s JOIN tensors t USING (mask_id, tensor)
            WHERE mask_id = ? AND s.stratum >= 0
            GROUP BY ALL ORDER BY 1, 2, 3""", [mask.id])
        # parents by name (a removed parent by its id, marked so)
        parents = list(mask.row.get("parents") or [])
        names = dict(con.execute("SELECT id, name FROM masks WHERE list_contains(?, id)",
                                 [parents]).fetchall()) if parents else {}
    row = _jsonable(mask.row)
    row["parent_names"] = [names.get(p, f"{p[:12]} (removed)") for p in parents]
    return {"mask": row, "by_layer": by_layer, "by_module": by_module,
            "sweep": sweep, "analysis": summary,
            "by_exponent": by_exponent(strata, mask.row.get("null_budget"))}


def by_exponent(strata: list[dict[str, Any]], budget: float | None) -> list[dict[str, Any]]:
    """The update rate per exponent of |θ0| (rows of ``(base_dtype, target_dtype, stratum,
    numel, n_updated)``): each row with ``exponent`` (|θ0| in ``[2^e, 2^(e+1))``; None for zero
    and subnormals, and inf/NaN), ``rate`` (updated share), ``min_change`` (the smallest
    change the format records there) and ``null`` (whether it exceeds ``budget``)."""
    out = []
    for r in strata:
        step = min_change(r["stratum"], r["base_dtype"] or "", r["target_dtype"] or "")
        out.append({**r, "exponent": binade(r["stratum"], r["base_dtype"] or ""),
                    "rate": r["n_updated"] / r["numel"] if r["numel"] else 0.0,
                    "min_change": step,
                    "null": None if step is None or budget is None else step > budget})
    return out


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


#: The mask-level figures ``show --control`` sets side by side.
CONTROL_FIGURES = ("dtype", "tol", "n_params", "n_updated", "sparsity", "max_abs_update",
                   "null_budget", "n_null", "null_share", "sparsity_movable")


def control_summary(home: Home, ref: str, control: str) -> dict[str, Any]:
    """Mask ``ref`` beside its control ``control`` (typically the diff of the same run's
    fp32 master weights, or an equal-budget run): the figures of :data:`CONTROL_FIGURES` and
    the sparsity per module and parameter kind, from the SQL index. The masks must cover the
    same tensors with the same sizes (their bases may differ: a bf16 checkpoint and its fp32
    masters are different files; ``same_base`` says which)."""
    with home.index.connect(write=False) as con:
        m, c = home.get(ref), home.get(control)
        rows = home.index.rows(con, """
            SELECT mask_id, tensor, numel FROM tensors WHERE mask_id IN (?, ?)""",
            [m.id, c.id])
        by_module = home.index.rows(con, """
            SELECT module, coalesce(param_kind, 'weight') AS param_kind, sum(numel) AS numel,
                   1 - sum(n_updated) FILTER (WHERE mask_id = ?)
                       / sum(numel) FILTER (WHERE mask_id = ?) AS sparsity,
                   1 - sum(n_updated) FILTER (WHERE mask_id = ?)
                       / sum(numel) FILTER (WHERE mask_id = ?) AS control_sparsity
            FROM tensors WHERE mask_id IN (?, ?)
            GROUP BY module, param_kind
            ORDER BY min(coalesce(layer, -1)), module, param_kind <> 'weight', param_kind""",
            [m.id, m.id, c.id, c.id, m.id, c.id])
    mine = {r["tensor"]: r["numel"] for r in rows if r["mask_id"] == m.id}
    theirs = {r["tensor"]: r["numel"] for r in rows if r["mask_id"] == c.id}
    if mine != theirs:
        diff = sorted(set(mine) ^ set(theirs)) or \
            sorted(t for t in mine if mine[t] != theirs[t])
        raise IncompatibleMasksError(f"{m.name} and {c.name} cover different tensors "
                                     f"(first: {diff[0]!r}): not a control of one another")
    for r in by_module:
        r["numel"] //= 2
    return {"mask": m.name, "control": c.name,
            "same_base": (m.row["base_model"], m.row["base_revision"])
            == (c.row["base_model"], c.row["base_revision"]),
            "figures": [{"figure": f, "mask": m.row.get(f), "control": c.row.get(f)}
                        for f in CONTROL_FIGURES],
            "by_module": by_module}


# -- issue 26: one tensor's mask as a density map (maskhub show MASK --tensor NAME) ---------

def tensor_density(home: Home, ref: str, tensor: str, rows: int = 16,
                   cols: int = 64) -> dict[str, Any]:
    """The density of updated entries of one tensor of mask ``ref`` over a grid of at most
    ``rows`` x ``cols`` cells (a 2-D tensor: blocks of its rows and columns; any other: its
    flattened entries, row-major, as one 2-D view of ``ceil(numel / cols)`` rows). Returns
    ``{"tensor", "shape", "n_updated", "numel", "cell_rows", "cell_cols", "grid"}`` where
    ``grid`` is a list of rows of fractions in [0, 1]. Reads that tensor's bits (zarr)."""
    import numpy as np

    from maskhub.errors import UsageError

    mask = home.get(ref)
    if tensor not in mask.store.names:
        close = [n for n in mask.store.names if tensor in n][:3]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"mask {mask.name!r} has no tensor {tensor!r}{hint}")
    bits = mask[tensor]
    if bits.ndim != 2:
        flat = bits.reshape(-1)
        width = min(cols, max(1, flat.size))
        pad = -flat.size % width
        bits = np.concatenate([flat, np.zeros(pad, bool)]).reshape(-1, width)
    h, w = bits.shape
    r_edges = np.linspace(0, h, min(rows, h) + 1).astype(int)
    c_edges = np.linspace(0, w, min(cols, w) + 1).astype(int)
    grid = [[float(bits[r0:r1, c0:c1].mean()) if r1 > r0 and c1 > c0 else 0.0
             for c0, c1 in zip(c_edges[:-1], c_edges[1:], strict=True)]
            for r0, r1 in zip(r_edges[:-1], r_edges[1:], strict=True)]
    st = mask.store.stats(tensor)
    return {"tensor": tensor, "shape": list(st.shape), "n_updated": st.n_updated,
            "numel": st.numel, "cell_rows": -(-h // (len(r_edges) - 1)),
            "cell_cols": -(-w // (len(c_edges) - 1)), "grid": grid}
