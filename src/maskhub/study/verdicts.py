"""The report's verdict table: for each claim of the paper, the paper's number, this run's,
its control's, and a verdict (``reproduced``, ``not reproduced``, ``explained by precision``,
``cannot tell``).

:func:`judge` is a pure function of the figures (:class:`Figures`, every one in percent), so
its logic is tested exactly; :func:`verdicts` reads the figures off the report's tables.

The rules (constants below):

* a claim about RL runs is ``cannot tell`` when a run it rests on did not learn (held-out
  accuracy not above its start's, or loss not below its first steps'; GRPO: accuracy only);
* sparsity: ``not reproduced`` below the paper's lowest RL sparsity (68.5%); ``explained by
  precision`` when the equal-budget SFT control (plain SFT at the RL learning rate and steps)
  is within :data:`MARGIN` points of the RL run's sparsity, when the run's fp32 master
  weights (its fp32 control) are below 68.5% sparse (the bf16 cast made the run look sparse),
  or when the sparsity among the entries that could move (outside the precision null) is
  below 68.5%; else ``reproduced``;
* overlap: ``not reproduced`` when o1 is within :data:`MARGIN` points of the uniform
  baseline; ``explained by precision`` when within :data:`MARGIN` of the magnitude baseline
  (random placement keeping each tensor's count per |θ0| exponent); else ``reproduced``;
* Conjecture 1: ``not reproduced`` when θ_sub's accuracy is more than :data:`ACC_MARGIN`
  points below θ_full's; ``explained by precision`` when the random-mask control (same count
  per tensor and exponent, random positions) also comes within :data:`ACC_MARGIN` points;
  else ``reproduced``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: Percentage points within which two sparsities or overlaps count as the same.
MARGIN = 5.0
#: Percentage points of held-out accuracy within which two runs count as equally good.
ACC_MARGIN = 2.0
#: The paper's lowest RL sparsity (Table 1), percent.
PAPER_RL_SPARSITY = 68.5

REPRODUCED, NOT_REPRODUCED = "reproduced", "not reproduced"
PRECISION, CANNOT_TELL = "explained by precision", "cannot tell"


@dataclass(frozen=True)
class Figures:
    """What the verdicts rest on (percent; None: not measured)."""

    learned: dict[str, bool]
    rl_sparsity: dict[str, float]  # every RL run from θ_sft: dpo-s0, dpo-s1, grpo-s0, seeds
    sparsity_movable: float | None  # dpo-s0, outside the precision null
    null_share: float | None  # dpo-s0
    sft_sparsity: float
    sfteq_sparsity: float | None  # equal-budget SFT from θ_sft
    fp32_sparsity: float | None  # dpo-s0's fp32 master weights (its fp32 control)
    nosft_sparsity: float | None  # DPO from θ_pre
    sfteq_nosft_sparsity: float | None  # equal-budget SFT from θ_pre
    #: label -> (o1, uniform baseline, magnitude baseline, the two runs)
    overlaps: dict[str, tuple[float, float, float, tuple[str, str]]]
    min_rank: float | None
    cancelled: float | None
    sub_acc: float | None
    full_acc: float | None
    random_acc: float | None
    #: Across seeds (the seeds table): kind (``dpo``, ``grpo``, ``sfteq``) -> figure
    #: (``sparsity``, ``acc``) -> (mean, min, max, number of seeds), for kinds of 2+ seeds.
    seeds: dict[str, dict[str, tuple[float, float, float, int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """One row of the verdict table."""

    claim: str
    paper: str
    this_run: str
    control: str
    verdict: str
    why: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def _p(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}%"


def _across(f: Figures, kind: str, figure: str) -> str:
    """`` (seeds: mean M%, min-max L-H%, n=N)`` for ``kind``'s ``figure``, or ``""``."""
    t = f.seeds.get(kind, {}).get(figure)
    if t is None:
        return ""
    mean, lo, hi, n = t
    return f" (seeds: mean {mean:.1f}%, {lo:.1f}-{hi:.1f}%, n={n})"


def judge(f: Figures) -> list[Verdict]:
    """The verdict of every claim (see the module docstring for the rules)."""
    out = []
    not_learned = [r for r in f.rl_sparsity if not f.learned.get(r, False)]
    dpo = f.rl_sparsity["dpo-s0"]
    lo, hi = min(f.rl_sparsity.values()), max(f.rl_sparsity.values())

    # 1. RL updates a sparse subnetwork.
    this = f"{lo:.1f}-{hi:.1f}%" + ("" if f.sparsity_movable is None else
                                    f" ({f.sparsity_movable:.1f}% among movable entries, "
                                    f"{_p(f.null_share)} could not move)")
    this += "".join(f"; {kind.upper()}{_across(f, kind, 'sparsity')}"
                    for kind in ("dpo", "grpo") if _across(f, kind, "sparsity"))
    control = f"equal-budget SFT {_p(f.sfteq_sparsity)}" + _across(f, "sfteq", "sparsity") + (
        "" if f.fp32_sparsity is None else f"; fp32 masters {_p(f.fp32_sparsity)}")
    if not_learned:
        v, why = CANNOT_TELL, f"did not learn: {', '.join(not_learned)}"
    elif lo < PAPER_RL_SPARSITY:
        v, why = NOT_REPRODUCED, f"below the paper's {PAPER_RL_SPARSITY}%"
    elif f.sfteq_sparsity is not None and f.sfteq_sparsity >= dpo - MARGIN:
        v, why = PRECISION, "plain SFT at the same budget is as sparse"
    elif f.fp32_sparsity is not None and f.fp32_sparsity < PAPER_RL_SPARSITY:
        v, why = PRECISION, "the fp32 masters moved densely: the bf16 cast hides their moves"
    elif f.sparsity_movable is not None and f.sparsity_movable < PAPER_RL_SPARSITY:
        v, why = PRECISION, "the sparsity comes from entries that could not move"
    else:
        v, why = REPRODUCED, "sparser than the control and among movable entries"
    out.append(Verdict("RL updates only a small subnetwork (Table 1)", "68.5-96%", this,
                       control, v, why))

    # 2. SFT is dense, RL sparse.
    if f.sft_sparsity >= dpo:
        v, why = NOT_REPRODUCED, "SFT is as sparse as RL"
    elif f.sfteq_sparsity is not None and f.sfteq_sparsity >= dpo - MARGIN:
        v, why = PRECISION, "SFT at the RL budget is as sparse as RL: the budget differs"
    else:
        v, why = REPRODUCED, "SFT at the RL budget stays denser than RL"
    out.append(Verdict("SFT updates densely, RL sparsely (Figure 1)", "SFT 6-15%",
                       f"SFT {_p(f.sft_sparsity)}, DPO {_p(dpo)}"
                       + _across(f, "dpo", "sparsity"), control, v, why))

    # 3. Out-of-distribution DPO (no SFT) is denser.
    if f.nosft_sparsity is not None:
        ctl = "-" if f.sfteq_nosft_sparsity is None else \
            f"equal-budget SFT from θ_pre {_p(f.sfteq_nosft_sparsity)} (from θ_sft " \
            f"{_p(f.sfteq_sparsity)})"
        drop = dpo - f.nosft_sparsity
        if drop <= 0:
            v, why = NOT_REPRODUCED, "DPO from θ_pre is not denser"
        elif f.sfteq_nosft_sparsity is not None and f.sfteq_sparsity is not None and \
                f.sfteq_sparsity - f.sfteq_nosft_sparsity >= drop - MARGIN:
            v, why = PRECISION, "SFT from θ_pre is denser by as much: the start weights"
        else:
            v, why = REPRODUCED, "denser than the control explains"
        out.append(Verdict("DPO without SFT (out of distribution) is denser (Table 5)",
                           "denser", f"{_p(f.nosft_sparsity)} vs {_p(dpo)} from θ_sft", ctl,
                           v, why))

    # 4-5. Overlaps above random.
    for label, (o1, uniform, magnitude, pair) in f.overlaps.items():
        control = f"magnitude baseline {_p(magnitude)} (uniform {_p(uniform)})"
        stalled = [r for r in pair if not f.learned.get(r, False)]
        if stalled:
            v, why = CANNOT_TELL, f"did not learn: {', '.join(stalled)}"
        elif o1 <= uniform + MARGIN:
            v, why = NOT_REPRODUCED, "no more than random placement"
        elif o1 <= magnitude + MARGIN:
            v, why = PRECISION, "random placement with the same magnitude profile matches"
        else:
            v, why = REPRODUCED, f"{o1 - magnitude:.1f} points above the magnitude baseline"
        out.append(Verdict(f"Subnetworks of {label} overlap above random (Table 4)",
                           "o1 ~60%, far above random", f"o1 {_p(o1)}", control, v, why))

    # 6. Full rank.
    if f.min_rank is not None:
        v = REPRODUCED if f.min_rank >= 99.0 else NOT_REPRODUCED
        out.append(Verdict("Updates are nearly full rank (Table 2)", ">99%",
                           _p(f.min_rank), "-", v, "lowest mean rank of the RL runs"))

    # 7. Cancelled updates.
    if f.cancelled is not None:
        v = REPRODUCED if f.cancelled >= 4.0 else NOT_REPRODUCED
        out.append(Verdict("Many updates cancel out during training (Figure 2)", "8%",
                           _p(f.cancelled), "-", v, "at least half the paper's share"
                           if v == REPRODUCED else "under half the paper's share"))

    # 8. Conjecture 1.
    if f.sub_acc is not None and f.full_acc is not None:
        control = f"random mask {_p(f.random_acc)}"
        if not f.learned.get("dpo-s0", False):
            v, why = CANNOT_TELL, "θ_full did not learn"
        elif f.sub_acc < f.full_acc - ACC_MARGIN:
            v, why = NOT_REPRODUCED, "θ_sub is worse than θ_full"
        elif f.random_acc is not None and f.random_acc >= f.full_acc - ACC_MARGIN:
            v, why = PRECISION, "a random mask of the same size and magnitudes does as well"
        else:
            v, why = REPRODUCED, "θ_sub matches θ_full and the random mask does not"
        out.append(Verdict("Training only the subnetwork matches full training "
                           "(Conjecture 1)", "θ_sub ≥ θ_full",
                           f"θ_sub {_p(f.sub_acc)} vs θ_full {_p(f.full_acc)}"
                           + _across(f, "dpo", "acc"), control, v, why))
    return out


def verdicts(report: Any, names: Any) -> list[Verdict]:
    """:func:`judge` of the figures in ``report``'s tables (``names``: the study's
    :class:`~maskhub.study.measure.StudyNames`)."""
    def rows(key: str, column: str = "name") -> dict[str, dict[str, Any]]:
        return {r[column]: r for r in report.table(key).records()}

    t1, runs = rows("table1"), rows("runs")

    def sparsity(run: str) -> float | None:
        row = t1.get(names.mask(run))
        return None if row is None else row["sparsity_pct"]

    learned = {r.removeprefix(names.prefix + "-"): bool(v["learned"]) for r, v in runs.items()}
    overlaps = {}
    for (a, b), label in ((("dpo-s0", "dpo-s1"), "two DPO seeds"),
                          (("dpo-s0", "grpo-s0"), "DPO and GRPO")):
        for r in report.table("table4").records():
            if (r["name_a"], r["name_b"]) == (names.mask(a), names.mask(b)):
                overlaps[label] = (r["o1"], r["o1_uniform"], r["o1_magnitude"], (a, b))
    ranks = [r["mean_rank_pct"] for n, r in rows("table2").items()
             if r["mean_rank_pct"] is not None and n in
             {names.mask(x) for x in ("dpo-s0", "dpo-s1", "grpo-s0")}]
    traj = rows("figure2").get(names.trajectory("dpo-s0"))
    seeds = {}
    for r in report.table("seeds").records():
        kind = r["runs"].removeprefix(names.prefix + "-")
        seeds[kind] = {fig: (r[f"{col}_mean_pct"], r[f"{col}_min_pct"], r[f"{col}_max_pct"],
                             r["n_seeds"])
                       for fig, col in (("sparsity", "sparsity"), ("acc", "heldout_acc"))}
    from_sft = names.runs.from_sft
    dpo = t1[names.mask("dpo-s0")]
    fp32 = rows("fp32").get(names.mask("dpo-s0"))

    def acc(run: str) -> float | None:
        row = runs.get(names.mask(run))
        return None if row is None else row["heldout_acc_after"]

    return judge(Figures(
        learned=learned,
        rl_sparsity={r: sparsity(r) for r in from_sft},
        sparsity_movable=dpo.get("sparsity_movable_pct"), null_share=dpo.get("null_share_pct"),
        sft_sparsity=sparsity("sft"), sfteq_sparsity=sparsity("sfteq-s0"),
        fp32_sparsity=None if fp32 is None else fp32["fp32_sparsity_pct"],
        nosft_sparsity=sparsity("dpo-nosft-s0"), sfteq_nosft_sparsity=sparsity("sfteq-nosft-s0"),
        overlaps=overlaps, min_rank=min(ranks) if ranks else None,
        cancelled=None if traj is None else traj["cancelled_pct"],
        sub_acc=acc("dpo-sub-s0"), full_acc=acc("dpo-s0"), random_acc=acc("dpo-rand-s0"),
        seeds=seeds))
