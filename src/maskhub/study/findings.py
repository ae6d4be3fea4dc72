"""The report's "what this run found": sentences read off the tables (never the other way
round), each beside the paper's figure for it."""

from __future__ import annotations

from typing import Any

from maskhub.study.measure import StudyNames
from maskhub.study.report import StudyReport


def _by_name(report: StudyReport, key: str, column: str = "name") -> dict[str, dict[str, Any]]:
    return {r[column]: r for r in report.table(key).records()}


def findings(report: StudyReport, names: StudyNames) -> list[str]:
    """One sentence per claim of the paper, with this run's numbers."""
    out = []
    t1 = _by_name(report, "table1")
    runs = _by_name(report, "runs")
    rl = [t1[names.mask(r)]["sparsity_pct"] for r in ("dpo-s0", "dpo-s1", "grpo-s0")]
    out.append(f"Update sparsity (Table 1, Figure 1): SFT {t1[names.mask('sft')]['sparsity_pct']}%"
               f", RL from θ_sft {min(rl)}-{max(rl)}% (paper: SFT 6-15%, RL 68.5-96%).")
    nosft = runs[names.mask("dpo-nosft-s0")]
    out.append(f"DPO from θ_pre without SFT, on pairs out of its distribution (Table 5): "
               f"{t1[names.mask('dpo-nosft-s0')]['sparsity_pct']}% sparsity against "
               f"{t1[names.mask('dpo-s0')]['sparsity_pct']}% for the same DPO from θ_sft "
               f"(paper: out-of-distribution DPO is denser); its loss went "
               f"{nosft['loss_first']} -> {nosft['loss_last']} and its held-out accuracy "
               f"{nosft['heldout_acc_before']}% -> {nosft['heldout_acc_after']}%.")
    moves = ", ".join(f"{r['name'].removeprefix(names.prefix + '-')} "
                      f"{r['heldout_acc_before']}% -> {r['heldout_acc_after']}%"
                      for r in runs.values() if r["algorithm"] in ("dpo", "grpo"))
    out.append(f"Held-out accuracy before -> after each RL run: {moves}.")
    stalled = [r for r in runs.values() if not r["learned"]]
    if stalled:
        out.append("**Runs that did not learn** (held-out accuracy not up, or loss not down): "
                   + ", ".join(f"{r['name'].removeprefix(names.prefix + '-')} (accuracy "
                               f"{r['heldout_acc_before']}% -> {r['heldout_acc_after']}%, loss "
                               f"{r['loss_first']} -> {r['loss_last']})" for r in stalled)
                   + ": their masks measure movement, not learning.")
    sfteq = t1.get(names.mask("sfteq-s0"))
    if sfteq is not None:
        out.append(f"Equal-budget control: plain SFT at the DPO learning rate and steps is "
                   f"{sfteq['sparsity_pct']}% sparse from θ_sft (DPO: "
                   f"{t1[names.mask('dpo-s0')]['sparsity_pct']}%) and "
                   f"{t1[names.mask('sfteq-nosft-s0')]['sparsity_pct']}% from θ_pre (DPO: "
                   f"{t1[names.mask('dpo-nosft-s0')]['sparsity_pct']}%).")
    dpo = t1[names.mask("dpo-s0")]
    if dpo.get("null_share_pct") is not None:
        out.append(f"Precision null of dpo-s0: {dpo['null_share_pct']}% of the entries could "
                   f"not have moved at its largest |Δ| ({dpo['max_abs_update']:.3g}); among the "
                   f"others the sparsity is {dpo['sparsity_movable_pct']}%.")
    fp32 = _by_name(report, "fp32")
    if names.mask("dpo-s0") in fp32:
        r = fp32[names.mask("dpo-s0")]
        out.append(f"fp32 control of dpo-s0: its fp32 master weights are {r['fp32_sparsity_pct']}"
                   f"% sparse at tol 1e-5 ({r['fp32_sparsity_pct tol=0']}% at tol 0) "
                   f"where its bf16 checkpoint is {r['bf16_sparsity_pct']}% sparse: the masters "
                   f"updated {r['more_updated_in_fp32_pct']}% more of the parameters than the "
                   "bf16 checkpoint shows.")
    curve = [r for r in report.table("curve").records() if r["name"] == names.mask("dpo-s0")]
    if curve:
        out.append("dpo-s0's held-out curve (accuracy %, loss) at steps "
                   + ", ".join(f"{r['step']}: {r['heldout_acc_pct']}, {r['heldout_loss']}"
                               for r in curve) + ".")
    for pair, label in (((names.mask("dpo-s0"), names.mask("dpo-s1")), "two DPO seeds"),
                        ((names.mask("dpo-s0"), names.mask("grpo-s0")), "DPO vs GRPO")):
        row = next((r for r in report.table("table4").records()
                    if (r["name_a"], r["name_b"]) == pair), None)
        if row:
            out.append(f"Overlap of {label} (Table 4): o1 {row['o1']}% / o2 {row['o2']}% against "
                       f"{row['o1_uniform']}% / {row['o2_uniform']}% uniform, "
                       f"{row['o1_stratified']}% / {row['o2_stratified']}% per-tensor and "
                       f"{row['o1_magnitude']}% / {row['o2_magnitude']}% magnitude baselines.")
    ranks = [r["mean_rank_pct"] for r in report.table("table2").records()
             if r["mean_rank_pct"] is not None]
    if ranks:
        out.append(f"Updates are nearly full rank (Table 2): mean rank {min(ranks)}-{max(ranks)}% "
                   "of the maximum (paper: >99%).")
    traj = _by_name(report, "figure2").get(names.trajectory("dpo-s0"))
    if traj:
        out.append(f"dpo-s0's trajectory (Figure 2): {traj['never_pct']}% never updated, "
                   f"{traj['cancelled_pct']}% updated then cancelled out, "
                   f"{traj['subnetwork_pct']}% final subnetwork (paper, PRIME: 72 / 8 / 20).")
    for r in report.table("conjecture1").records():
        out.append(f"Conjecture 1, {r['masked_with']}: verify "
                   f"{'passes' if r['verify_ok'] else 'FAILS'} ({r['changed_outside_mask']} "
                   f"entries changed outside the mask); {r['equal_pct tol=0']:.2f}% of all "
                   f"entries bit-identical to θ_full; held-out accuracy θ_sub "
                   f"{r['sub_heldout_acc']}% vs θ_full {r['full_heldout_acc']}% (paper: θ_sub "
                   "matches or beats θ_full; 94.0% of weights equal for DPO).")
    return out
