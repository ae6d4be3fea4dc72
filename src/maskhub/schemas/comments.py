"""What each table, view and column of the registry index means, as DuckDB ``COMMENT``s
(migration 20), so that ``duckdb registry.duckdb`` users see it: ``select comment from
duckdb_tables()`` / ``duckdb_views()`` / ``duckdb_columns()``. The same words as the column
tables of README.md, docs/analysis.md and docs/overlap.md, shortened. Applied once: a
change here reaches existing indexes only through a new migration.
"""

from __future__ import annotations

_NULL = "migration 10 precision null"

#: ``{table: (what a row is, {column: meaning})}`` for the base tables.
TABLES: dict[str, tuple[str, dict[str, str]]] = {
    "masks": ("maskhub: one row per registered update mask (README.md, SQL index)", {
        "id": "32-hex mask id (a unique prefix names the mask)",
        "name": "unique mask name",
        "base_model": "base checkpoint (theta0): Hub repo id, absolute path, or --base-model",
        "base_revision": "commit sha of a Hub base, else NULL",
        "target_model": "fine-tuned checkpoint (theta1), as base_model",
        "target_revision": "commit sha of a Hub target, else NULL",
        "algorithm": "RL algorithm (--algorithm)",
        "seed": "run seed (--seed)",
        "dataset": "training dataset (--dataset)",
        "tol": "tolerance: an entry is updated iff |theta1 - theta0| > tol",
        "dtype": "checkpoint dtype, or base->target when they differ",
        "n_params": "parameters compared",
        "n_updated": "parameters updated (set bits of the mask)",
        "sparsity": "1 - n_updated / n_params, a fraction in [0, 1]",
        "created_at": "creation time (UTC)",
        "hub_repo": "Hub repo the mask was pushed to or pulled from",
        "hub_revision": "commit sha of that push or pull",
        "tags": "user tags (--tag)",
        "n_tensors": "tensors in the mask",
        "format_version": "mask store format version",
        "operation": "derived masks: how it was made (intersect, union, ...), else NULL",
        "parents": "derived masks: the ids of its inputs",
        "notes": "free text (--notes)",
        "store_url": "URL of the mask store when not under the home (s3://...), else NULL",
        "has_values": "the mask is a patch: its store also holds the target values at the "
                      "set bits (maskhub apply rebuilds the target)",
        "max_abs_update": "largest |theta1 - theta0| among updated entries (NULL: not measured)",
        "null_budget": "movement budget of the precision null: diff --budget, else "
                       "max_abs_update",
        "null_budget_source": "given or observed",
        "n_null": "entries whose smallest recordable step at |theta0| exceeds the budget "
                  "(they could not have changed)",
        "n_null_updated": "of those, entries updated anyway",
        "null_share": "n_null / n_params",
        "sparsity_movable": "1 - (n_updated - n_null_updated) / (n_params - n_null): "
                            "sparsity among entries that could move",
        "base_fingerprint": "content fingerprint of the base's compared tensors "
                            "(xxh3-128:<hex>); NULL when not made by a diff",
        "target_fingerprint": "content fingerprint of the target's compared tensors",
        "edited_at": "when maskhub edit last changed the metadata (UTC), else NULL",
        "edits": "every change maskhub edit made: <time> <field>: <old> -> <new>",
    }),
    "tensors": ("maskhub: one row per parameter tensor of each mask", {
        "mask_id": "the mask (masks.id)",
        "tensor": "parameter name, e.g. model.layers.12.self_attn.q_proj.weight",
        "layer": "block index parsed from the name, NULL outside the repeated blocks",
        "module": "module kind (self_attn.q_proj, mlp.down_proj, embed_tokens, norm, ...)",
        "shape": "parameter shape",
        "numel": "number of entries",
        "n_updated": "entries updated",
        "sparsity": "1 - n_updated / numel",
        "base_dtype": "dtype in the base checkpoint",
        "target_dtype": "dtype in the target checkpoint",
        "param_kind": "last name component: weight, bias, ...",
        "max_abs_update": f"largest |theta1 - theta0| among the tensor's updated entries "
                          f"({_NULL})",
        "n_null": f"entries that could not have changed at the mask's budget ({_NULL})",
        "n_null_updated": f"of those, entries updated anyway ({_NULL})",
        "sparsity_movable": f"sparsity among the tensor's entries that could move ({_NULL})",
    }),
    "tensor_sweep": ("maskhub: per-tensor counts at each diff --sweep tolerance", {
        "mask_id": "the mask (masks.id)",
        "tensor": "parameter name",
        "tol": "a sweep tolerance",
        "n_updated": "entries with |theta1 - theta0| > tol",
    }),
    "tensor_strata": ("maskhub: per tensor, entries and updated entries per exponent of "
                      "|theta0| (the magnitude-stratified overlap baseline)", {
        "mask_id": "the mask (masks.id)",
        "tensor": "parameter name",
        "stratum": "exponent field of theta0's bits (0-255 bf16/fp32, 0-31 fp16; -1: the "
                   "whole tensor, other dtypes)",
        "numel": "entries of the tensor in this stratum",
        "n_updated": "of those, entries updated",
    }),
    "tensor_analysis": ("maskhub: per-tensor analysis of the update (diff --rank/--stats; "
                        "docs/analysis.md)", {
        "mask_id": "the mask (masks.id)",
        "tensor": "parameter name (join tensors on mask_id, tensor)",
        "rank": "numerical rank of the update theta1 - theta0",
        "max_rank": "min(rows, cols)",
        "rank_fraction": "rank / max_rank",
        "rank_rtol": "the relative singular-value threshold used",
        "sign_flips": "entries with theta0 * theta1 < 0",
        "mean_abs_delta": "mean |theta1 - theta0| over the tensor",
        "max_abs_delta": "max |theta1 - theta0| over the tensor",
        "mean_rel_delta": "mean |delta| / |theta0| over changed entries with theta0 != 0",
        "max_rel_delta": "max |delta| / |theta0| over changed entries with theta0 != 0",
        "n_sub_bf16_step": "changed entries with |delta| below one bf16 step at theta0",
    }),
    "trajectories": ("maskhub: one row per maskhub trajectory run (docs/analysis.md)", {
        "id": "trajectory id",
        "name": "trajectory name",
        "tol": "tolerance",
        "n_checkpoints": "number of checkpoints",
        "n_params": "parameters compared",
        "n_never": "entries never updated (n_never + n_cancelled + n_subnetwork = n_params)",
        "n_cancelled": "entries updated at some checkpoint but back to theta0 at the end",
        "n_subnetwork": "entries updated at the final checkpoint",
        "final_mask_id": "the registered mask of the final checkpoint",
        "ever_mask_id": "the registered mask of the entries ever updated",
        "created_at": "creation time (UTC)",
    }),
    "trajectory_points": ("maskhub: one row per checkpoint of a trajectory", {
        "trajectory_id": "the trajectory (trajectories.id)",
        "idx": "position (0 = the first checkpoint)",
        "step": "step parsed from the checkpoint name, else idx",
        "checkpoint": "repo id or absolute path",
        "revision": "commit sha for Hub checkpoints",
        "n_updated_vs_first": "entries with |theta_k - theta_0| > tol",
        "n_updated_vs_prev": "entries with |theta_k - theta_k-1| > tol (NULL: not counted)",
        "n_ever": "entries updated against the first checkpoint at some checkpoint up to k",
        "n_not_in_final": "entries updated at k that are not in the final subnetwork "
                          "(Figure 6)",
    }),
    "overlaps": ("maskhub: the overlap of each counted pair of masks with its random "
                 "baselines (docs/overlap.md)", {
        "mask_a": "mask id of I1",
        "mask_b": "mask id of I2",
        "n_params": "parameters compared (N)",
        "n_tensors": "tensors compared",
        "n_a": "|I1| (popcount)",
        "n_b": "|I2| (popcount)",
        "n_both": "|I1 and I2|",
        "o1": "n_both / n_a (NULL for an empty mask)",
        "o2": "n_both / n_b (NULL for an empty mask)",
        "o1_random": "uniform random baseline of o1: n_b / N",
        "o2_random": "uniform random baseline of o2: n_a / N",
        "o1_stratified": "per-tensor stratified baseline of o1: expected_stratified / n_a",
        "o2_stratified": "per-tensor stratified baseline of o2: expected_stratified / n_b",
        "jaccard": "n_both / (n_a + n_b - n_both)",
        "expected_random": "n_a * n_b / N",
        "expected_stratified": "sum over tensors of n_a,t * n_b,t / N_t",
        "var_stratified": "sum over tensors of the hypergeometric variance",
        "z_score": "(n_both - expected_stratified) / sqrt(var_stratified); NULL if var = 0",
        "p_value": "one-sided normal tail of z_score (0.0 once it underflows)",
        "log10_p_value": "log10 of the p-value, finite for any z",
        "computed_at": "UTC time of the count",
        "expected_magnitude": "sum over tensors and |theta0| exponent strata of "
                              "n_a,ts * n_b,ts / N_ts; NULL without strata",
        "var_magnitude": "sum over strata of the hypergeometric variance",
        "o1_magnitude": "magnitude-stratified baseline of o1: expected_magnitude / n_a",
        "o2_magnitude": "magnitude-stratified baseline of o2: expected_magnitude / n_b",
        "z_magnitude": "(n_both - expected_magnitude) / sqrt(var_magnitude); NULL if unknown "
                       "or var = 0",
        "log10_p_magnitude": "log10 of the one-sided p-value of z_magnitude",
    }),
    "tensor_overlaps": ("maskhub: per-tensor counts of a counted pair (overlap --per tensor)", {
        "mask_a": "mask id of I1",
        "mask_b": "mask id of I2",
        "position": "the tensor's position in the masks",
        "tensor": "parameter name",
        "layer": "block index, NULL outside the repeated blocks",
        "module": "module kind",
        "numel": "entries of the tensor",
        "n_a": "entries set in I1",
        "n_b": "entries set in I2",
        "n_both": "entries set in both",
    }),
    "mask_lineage": ("maskhub: the inputs of each combined mask, in order", {
        "mask_id": "the combined mask (masks.id)",
        "position": "the input's position in the combination",
        "parent_id": "an input mask's id",
        "operation": "intersect, union, difference, consensus, random",
        "min_count": "consensus K, else NULL",
    }),
    "schema_migrations": ("maskhub: the schema migrations applied to this index", {
        "number": "migration number (src/maskhub/schemas/ddl.py)",
        "name": "what the migration did",
        "applied_at": "when it ran (UTC)",
    }),
}

#: ``{view: what a row is}``.
VIEWS: dict[str, str] = {
    "mask_tensors": "maskhub: every tensors row joined to its mask, each column named once "
                    "(mask_n_updated, tensor_n_updated, ...)",
    "overlap_pairs": "maskhub: every stored overlap in both orientations (columns of overlaps)",
    "overlap_summary": "maskhub: overlap_pairs with mask names, algorithms, lifts over each "
                       "baseline and excess overlaps",
    "tensor_overlap_pairs": "maskhub: tensor_overlaps in both orientations",
    "module_overlaps": "maskhub: overlaps and baselines per module kind, for every pair "
                       "counted per tensor",
    "layer_overlaps": "maskhub: overlaps and baselines per layer, for every pair counted per "
                      "tensor",
}


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def comment_sql() -> str:
    """The ``COMMENT ON`` statements of migration 20 (DuckDB >= 0.10.1); names quoted
    (``OVERLAPS`` is a keyword)."""
    out = []
    for table, (what, columns) in TABLES.items():
        out.append(f'COMMENT ON TABLE "{table}" IS {_quote(what)};')
        out += [f'COMMENT ON COLUMN "{table}"."{c}" IS {_quote(m)};' for c, m in columns.items()]
    out += [f'COMMENT ON VIEW "{v}" IS {_quote(m)};' for v, m in VIEWS.items()]
    return "\n".join(out)
