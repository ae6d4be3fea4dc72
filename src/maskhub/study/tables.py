"""The report's tables, each one SQL query over the registry (what ``maskhub sql`` runs).

Every number in the report is a value these queries return (rounded in SQL), so a reader
can reproduce each table with the command printed beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from maskhub.study.measure import (
    AGREEMENT_TOLS,
    FIGURE3_RUNS,
    OVERLAP_RUNS,
    SWEEP,
    StudyNames,
)


@dataclass(frozen=True)
class TableSpec:
    """One table of the report: what it shows, the paper's counterpart and its query."""

    key: str
    title: str
    paper: str
    sql: str


#: Runs in the study's order (``order`` in each mask's notes: sft, then the RL runs).
ORDER = "CAST(json_extract(notes, '$.order') AS INTEGER)"
M_ORDER = "CAST(json_extract(m.notes, '$.order') AS INTEGER)"


def _pct(expr: str, alias: str) -> str:
    """``expr`` (a fraction) as a percentage with two decimals, named ``alias``."""
    return f"round(100 * ({expr}), 2) AS {alias}"


def _fact(path: str, alias: str, kind: str = "DOUBLE", digits: int | None = None) -> str:
    """A run fact from the mask's JSON ``notes`` at ``$.path``, cast to ``kind``."""
    value = f"CAST(json_extract(notes, '$.{path}') AS {kind})"
    return f"round({value}, {digits}) AS {alias}" if digits is not None else f"{value} AS {alias}"


def _fact_pct(path: str, alias: str) -> str:
    """A run fact that is a fraction, as a percentage with two decimals."""
    return _pct(f"CAST(json_extract(notes, '$.{path}') AS DOUBLE)", alias)


#: A run learned iff its held-out accuracy rose and its loss fell (from the mask's notes);
#: GRPO's loss (β = 0: the policy-gradient surrogate, about 0) says nothing: accuracy only.
LEARNED = ("(CAST(json_extract(notes, '$.accuracy_heldout_after') AS DOUBLE) > "
           "CAST(json_extract(notes, '$.accuracy_heldout_before') AS DOUBLE)\n"
           "        AND (algorithm = 'grpo' OR CAST(json_extract(notes, '$.loss_last') AS DOUBLE)"
           " < CAST(json_extract(notes, '$.loss_first') AS DOUBLE))) AS learned")


#: The seeds table's aggregates across seeds (SQL function, column label).
AGGREGATES = (("avg", "mean"), ("min", "min"), ("max", "max"), ("stddev_samp", "sd"))


def _tol_label(tol: float) -> str:
    """``tol=1e-05``: a column name for a tolerance."""
    return f"tol={tol:g}"


def table_specs(names: StudyNames) -> list[TableSpec]:
    """The report's tables for the study ``names``, in report order."""
    tagged = f"list_contains(tags, '{names.tag}')"
    runs = f"{tagged} AND notes IS NOT NULL"
    in_overlap = ", ".join(f"'{names.mask(r)}'" for r in OVERLAP_RUNS)
    fig3 = tuple(names.mask(r) for r in FIGURE3_RUNS)
    sweep_cols = ",\n       ".join(
        _pct(f"1 - sum(s.n_updated) FILTER (WHERE s.tol = {t!r}) / m.n_params",
             f'"{_tol_label(t)}"')
        for t in SWEEP)

    def by_part(part: str) -> str:
        cols = ",\n       ".join(
            _pct(f"1 - sum(tensor_n_updated) FILTER (WHERE mask_name = '{n}') / "
                 f"sum(numel) FILTER (WHERE mask_name = '{n}')", f'"{n}"') for n in fig3)
        order = f"{part} NULLS FIRST" if part == "layer" else part
        return (f"SELECT {part},\n       {cols}\nFROM mask_tensors\n"
                f"WHERE mask_name IN ({', '.join(repr(n) for n in fig3)}) "
                "AND param_kind = 'weight'\n"
                f"GROUP BY {part}\n"
                f"ORDER BY {order}")

    agreement = ",\n       ".join(
        _fact_pct(f"conjecture1.agreement[{i}].{field}", f'"{short}_pct {_tol_label(t)}"')
        for i, t in enumerate(AGREEMENT_TOLS)
        for field, short in (("frac_equal", "equal"), ("frac_equal_outside", "equal_outside")))
    return [
        TableSpec("runs", "The runs: steps, learning rate, loss and task accuracy (%; "
                  "accuracy graded on each run's saved bf16 checkpoint; learned: held-out "
                  "accuracy up and loss down, GRPO: accuracy up)",
                  "Appendix B (hyperparameters) and Table 3 (accuracy)",
                  "SELECT name, algorithm, seed,\n"
                  "       json_extract_string(notes, '$.start') AS start,\n       "
                  + ",\n       ".join([
                      _fact("steps", "steps", "INTEGER"),
                      _fact("learning_rate", "learning_rate"),
                      _fact("batch_size", "batch", "INTEGER"),
                      _fact("loss_first", "loss_first", digits=4),
                      _fact("loss_last", "loss_last", digits=4),
                      _fact_pct("accuracy_heldout_before", "heldout_acc_before"),
                      _fact_pct("accuracy_heldout_after", "heldout_acc_after"),
                      _fact_pct("accuracy_train_before", "train_acc_before"),
                      _fact_pct("accuracy_train_after", "train_acc_after"),
                      LEARNED,
                      _fact("train_seconds", "seconds", digits=1)])
                  + f"\nFROM masks\nWHERE {runs}\nORDER BY {ORDER}"),
        TableSpec("table1", "Update sparsity (%) of every stage, tolerance 1e-5, with the "
                  "precision null (% of entries whose smallest bf16 step exceeds the largest "
                  "|Δ| of the run) and the sparsity among the entries that could move",
                  "Table 1 (RL) and Figure 1 (SFT is dense)",
                  "SELECT name, algorithm, base_model, n_params, n_updated,\n       "
                  + _pct("sparsity", "sparsity_pct") + ",\n       "
                  + "max_abs_update,\n       "
                  + _pct("null_share", "null_share_pct") + ",\n       "
                  + _pct("sparsity_movable", "sparsity_movable_pct")
                  + f"\nFROM masks\nWHERE {runs}\nORDER BY {ORDER}"),
        TableSpec("fp32", "The bf16 mask of each run beside its fp32 control: the diff of "
                  "the same run's fp32 master weights (%, tolerance 1e-5, and 0 for the "
                  "masters); what the bf16 mask calls unchanged but the masters moved is the "
                  "bf16 cast's, not the algorithm's",
                  "Table 1 (the paper measures bf16 checkpoints only)",
                  "SELECT b.name, c.name AS fp32_control,\n       "
                  + ",\n       ".join([
                      _pct("b.sparsity", "bf16_sparsity_pct"),
                      _pct("c.sparsity", "fp32_sparsity_pct"),
                      _pct("1 - (SELECT sum(s.n_updated) FROM tensor_sweep s "
                           "WHERE s.mask_id = c.id AND s.tol = 0.0) / c.n_params",
                           '"fp32_sparsity_pct tol=0"'),
                      _pct("(c.n_updated - b.n_updated) / b.n_params",
                           "more_updated_in_fp32_pct")])
                  + "\nFROM masks b JOIN masks c ON c.name = b.name || '-fp32'\n"
                  f"WHERE list_contains(b.tags, '{names.tag}') AND b.notes IS NOT NULL\n"
                  "ORDER BY CAST(json_extract(b.notes, '$.order') AS INTEGER)"),
        TableSpec("seeds", "The runs from θ_sft repeated over seeds (--seeds; DPO always has "
                  "two): mean, min and max (and sample standard deviation) across seeds of the "
                  "bf16 sparsity, the fp32 control's sparsity and the held-out accuracy (%)",
                  "Table 1 and Table 3 (the paper reports single runs)",
                  "SELECT regexp_replace(m.name, '-s[0-9]+$', '') AS runs, "
                  "count(*) AS n_seeds,\n       "
                  + ",\n       ".join([
                      *(_pct(f"{agg}(m.sparsity)", f"sparsity_{label}_pct")
                        for agg, label in AGGREGATES),
                      *(_pct(f"{agg}(c.sparsity)", f"fp32_sparsity_{label}_pct")
                        for agg, label in AGGREGATES[:3]),
                      *(_pct(f"{agg}(CAST(json_extract(m.notes, '$.accuracy_heldout_after') "
                             "AS DOUBLE))", f"heldout_acc_{label}_pct")
                        for agg, label in AGGREGATES)])
                  + "\nFROM masks m LEFT JOIN masks c ON c.name = m.name || '-fp32'\n"
                  f"WHERE list_contains(m.tags, '{names.tag}') AND m.notes IS NOT NULL\n"
                  "  AND json_extract_string(m.notes, '$.start') = 'sft'\n"
                  "  AND NOT json_exists(m.notes, '$.conjecture1')\n"
                  "GROUP BY 1 HAVING count(*) >= 2\n"
                  "ORDER BY min(CAST(json_extract(m.notes, '$.order') AS INTEGER))"),
        TableSpec("table6", "Update sparsity (%) under each tolerance of the sweep",
                  "Table 6",
                  f"SELECT m.name,\n       {sweep_cols}\n"
                  "FROM tensor_sweep s JOIN masks m ON m.id = s.mask_id\n"
                  f"WHERE list_contains(m.tags, '{names.tag}') AND m.notes IS NOT NULL\n"
                  f"GROUP BY m.name, m.n_params, m.notes\nORDER BY {M_ORDER}"),
        TableSpec("figure3_layers", "Update sparsity (%) of the weights per layer (NULL: "
                  "embeddings, final norm, lm_head)",
                  "Figure 3 (left axis: layers)", by_part("layer")),
        TableSpec("figure3_modules", "Update sparsity (%) of the weights per module",
                  "Figure 3 (matrices)",
                  by_part("module")),
        TableSpec("table2", "Rank of the 2-D updates of the transformer blocks (% of full "
                  "rank; as maskhub show), and the mean |Δ| over all parameters", "Table 2",
                  "SELECT m.name, count(a.rank) FILTER (WHERE t.layer IS NOT NULL) "
                  "AS n_matrices,\n       "
                  + _pct("avg(a.rank_fraction) FILTER (WHERE t.layer IS NOT NULL)",
                         "mean_rank_pct") + ",\n       "
                  + _pct("min(a.rank_fraction) FILTER (WHERE t.layer IS NOT NULL)",
                         "min_rank_pct") + ",\n       "
                  "round(sum(a.mean_abs_delta * t.numel) / sum(t.numel), 8) AS mean_abs_delta\n"
                  "FROM tensor_analysis a JOIN masks m ON m.id = a.mask_id\n"
                  "JOIN tensors t ON t.mask_id = a.mask_id AND t.tensor = a.tensor\n"
                  f"WHERE list_contains(m.tags, '{names.tag}') AND m.notes IS NOT NULL\n"
                  f"GROUP BY m.name, m.notes\nORDER BY {M_ORDER}"),
        TableSpec("table4", "Overlap (%) between seeds and between algorithms, with the "
                  "uniform, per-tensor (stratified) and magnitude baselines", "Table 4",
                  "SELECT name_a, name_b,\n       "
                  + ",\n       ".join([_pct("o1", "o1"), _pct("o2", "o2"),
                                       _pct("o1_random", "o1_uniform"),
                                       _pct("o2_random", "o2_uniform"),
                                       _pct("o1_stratified", "o1_stratified"),
                                       _pct("o2_stratified", "o2_stratified"),
                                       _pct("o1_magnitude", "o1_magnitude"),
                                       _pct("o2_magnitude", "o2_magnitude"),
                                       "round(z_score, 1) AS z_stratified"])
                  + f"\nFROM overlap_summary\nWHERE name_a IN ({in_overlap}) "
                  f"AND name_b IN ({in_overlap})\n  AND name_a < name_b\n"
                  "ORDER BY name_a, name_b"),
        TableSpec("figure2", "Never updated / updated then cancelled out / final subnetwork "
                  "(% of parameters)", "Figure 2",
                  "SELECT t.name, t.n_checkpoints,\n       "
                  + ",\n       ".join([_pct("t.n_never / t.n_params", "never_pct"),
                                       _pct("t.n_cancelled / t.n_params", "cancelled_pct"),
                                       _pct("t.n_subnetwork / t.n_params", "subnetwork_pct")])
                  + "\nFROM trajectories t JOIN masks f ON f.id = t.final_mask_id\n"
                  f"WHERE list_contains(f.tags, '{names.tag}')\n"
                  "ORDER BY t.name"),
        TableSpec("figure5", "Sparsity (%) of each point of the trajectory (recorded live, "
                  "no checkpoint written) against the start and the previous point, and % of "
                  "parameters updated but not in the final subnetwork", "Figures 5, 6 and 7",
                  "SELECT t.name, p.step,\n       "
                  + ",\n       ".join([
                      _pct("1 - p.n_updated_vs_first / t.n_params", "sparsity_vs_start_pct"),
                      _pct("1 - p.n_updated_vs_prev / t.n_params", "sparsity_vs_prev_pct"),
                      _pct("p.n_not_in_final / t.n_params", "not_in_final_pct")])
                  + "\nFROM trajectory_points p\n"
                  "JOIN trajectories t ON t.id = p.trajectory_id\n"
                  "JOIN masks f ON f.id = t.final_mask_id\n"
                  f"WHERE list_contains(f.tags, '{names.tag}') AND p.idx > 0\n"
                  "ORDER BY t.name, p.idx"),
        TableSpec("curve", "Held-out accuracy (%) and held-out answer loss at each "
                  "recorded point of the trajectory runs (graded on the bf16 weights that "
                  "point's checkpoint would hold; the last point is the run's saved checkpoint)",
                  "Figure 4 and the training curves of Appendix B",
                  "SELECT name, c.step,\n       "
                  + _pct("c.heldout_acc", "heldout_acc_pct") + ",\n       "
                  "round(c.heldout_loss, 4) AS heldout_loss\n"
                  "FROM (SELECT name, notes, unnest(from_json(json_extract(notes, '$.curve'), "
                  "'[{\"step\": \"INTEGER\", \"heldout_acc\": \"DOUBLE\", "
                  "\"heldout_loss\": \"DOUBLE\"}]')) AS c\n"
                  f"      FROM masks WHERE {runs} AND json_exists(notes, '$.curve'))\n"
                  f"ORDER BY {ORDER}, c.step"),
        TableSpec("conjecture1", "θ_sub (only dpo-s0's mask trained; the random-mask control "
                  "trains a random mask of the same count per tensor and |θ0| exponent) "
                  "against θ_full (dpo-s0): verify, % of equal entries, task accuracy (%)",
                  "Section 4 (Conjecture 1), Table 3 and Figure 4",
                  "SELECT name, json_extract_string(notes, '$.masked_with') AS masked_with,\n"
                  "       " + ",\n       ".join([
                      _fact("conjecture1.verify_ok", "verify_ok", "BOOLEAN"),
                      _fact("conjecture1.verify_n_outside", "changed_outside_mask", "BIGINT"),
                      agreement,
                      _fact_pct("accuracy_heldout_after", "sub_heldout_acc"),
                      "(SELECT round(100 * CAST(json_extract(f.notes, "
                      "'$.accuracy_heldout_after') AS "
                      f"DOUBLE), 2)\n        FROM masks f WHERE f.name = "
                      f"'{names.mask('dpo-s0')}') AS full_heldout_acc",
                      _fact("loss_last", "sub_loss_last", digits=4),
                      "(SELECT round(CAST(json_extract(f.notes, '$.loss_last') AS DOUBLE), 4)\n"
                      f"        FROM masks f WHERE f.name = '{names.mask('dpo-s0')}') "
                      "AS full_loss_last"])
                  + f"\nFROM masks\nWHERE {runs} AND json_exists(notes, '$.conjecture1')\n"
                  f"ORDER BY {ORDER}"),
    ]
