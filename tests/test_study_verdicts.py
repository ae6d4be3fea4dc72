"""The study's verdict logic (``maskhub.study.verdicts.judge``), a pure function of the
figures: every branch with hand-picked numbers."""

from __future__ import annotations

import dataclasses

from maskhub.study.verdicts import Figures, judge

LEARNED = {"dpo-s0": True, "dpo-s1": True, "grpo-s0": True}
SEEDS, ALGOS = ("dpo-s0", "dpo-s1"), ("dpo-s0", "grpo-s0")


def figures(**changes: object) -> Figures:
    """A run that reproduces every claim; ``changes`` override single figures."""
    base = Figures(
        learned=dict(LEARNED), rl_sparsity={"dpo-s0": 80.0, "dpo-s1": 78.0, "grpo-s0": 85.0},
        sparsity_movable=75.0, null_share=20.0, sft_sparsity=10.0, sfteq_sparsity=50.0,
        fp32_sparsity=70.0,
        nosft_sparsity=60.0, sfteq_nosft_sparsity=48.0,
        overlaps={"two DPO seeds": (70.0, 20.0, 40.0, SEEDS),
                  "DPO and GRPO": (60.0, 15.0, 30.0, ALGOS)},
        min_rank=99.5, cancelled=6.0, sub_acc=70.0, full_acc=71.0, random_acc=60.0)
    return dataclasses.replace(base, **changes)


def verdicts(f: Figures) -> list[str]:
    return [v.verdict for v in judge(f)]


def test_every_claim_reproduced() -> None:
    rows = judge(figures())
    assert [r.claim for r in rows] == [
        "RL updates only a small subnetwork (Table 1)",
        "SFT updates densely, RL sparsely (Figure 1)",
        "DPO without SFT (out of distribution) is denser (Table 5)",
        "Subnetworks of two DPO seeds overlap above random (Table 4)",
        "Subnetworks of DPO and GRPO overlap above random (Table 4)",
        "Updates are nearly full rank (Table 2)",
        "Many updates cancel out during training (Figure 2)",
        "Training only the subnetwork matches full training (Conjecture 1)"]
    assert verdicts(figures()) == ["reproduced"] * 8
    assert rows[0].this_run == "78.0-85.0% (75.0% among movable entries, 20.0% could not move)"
    assert rows[0].control == "equal-budget SFT 50.0%; fp32 masters 70.0%"
    assert judge(figures(fp32_sparsity=None))[0].control == "equal-budget SFT 50.0%"
    assert rows[3].this_run == "o1 70.0%"
    assert rows[3].control == "magnitude baseline 40.0% (uniform 20.0%)"
    assert rows[3].why == "30.0 points above the magnitude baseline"


def test_precision_explains_the_sparsity() -> None:
    # the equal-budget SFT within 5 points of DPO's 80%: the budget, not the algorithm
    v = verdicts(figures(sfteq_sparsity=75.0))
    assert v[0] == v[1] == "explained by precision"
    assert verdicts(figures(sfteq_sparsity=74.9))[:2] == ["reproduced", "reproduced"]
    # sparse only because entries could not move
    assert verdicts(figures(sparsity_movable=60.0))[0] == "explained by precision"
    # the fp32 masters of the same run moved densely: the bf16 cast made it sparse
    fp32 = judge(figures(fp32_sparsity=68.4))[0]
    assert (fp32.verdict, fp32.why) == (
        "explained by precision", "the fp32 masters moved densely: the bf16 cast hides their "
        "moves")
    assert verdicts(figures(fp32_sparsity=68.5))[0] == "reproduced"


def test_sparsity_not_reproduced_and_runs_that_did_not_learn() -> None:
    assert verdicts(figures(rl_sparsity={"dpo-s0": 80.0, "dpo-s1": 60.0,
                                         "grpo-s0": 85.0}))[0] == "not reproduced"
    assert verdicts(figures(sft_sparsity=80.0))[1] == "not reproduced"
    stalled = judge(figures(learned={**LEARNED, "grpo-s0": False}))
    # the seeds' overlap rests on the two DPO runs only
    assert [r.verdict for r in stalled] == [
        "cannot tell", "reproduced", "reproduced", "reproduced", "cannot tell", "reproduced",
        "reproduced", "reproduced"]
    assert stalled[0].why == "did not learn: grpo-s0"
    assert verdicts(figures(learned={**LEARNED, "dpo-s0": False}))[7] == "cannot tell"


def test_out_of_distribution_dpo() -> None:
    # DPO drops 20 points from θ_pre; SFT drops 2: reproduced. SFT drops 15 (>= 20 - 5):
    # the start weights explain it. No drop: not reproduced.
    assert verdicts(figures())[2] == "reproduced"
    assert verdicts(figures(sfteq_nosft_sparsity=35.0))[2] == "explained by precision"
    assert verdicts(figures(nosft_sparsity=80.0))[2] == "not reproduced"


def test_overlaps() -> None:
    seeds = {"two DPO seeds": (44.0, 20.0, 40.0, SEEDS)}
    assert verdicts(figures(overlaps=seeds))[3] == "explained by precision"
    assert verdicts(figures(overlaps={"two DPO seeds": (25.0, 20.0, 40.0, SEEDS)}))[3] == \
        "not reproduced"
    assert verdicts(figures(overlaps={"two DPO seeds": (45.1, 20.0, 40.0, SEEDS)}))[3] == \
        "reproduced"


def test_rank_cancelled_and_conjecture1() -> None:
    v = verdicts(figures(min_rank=98.9, cancelled=0.3))
    assert v[5:7] == ["not reproduced", "not reproduced"]
    assert verdicts(figures(sub_acc=68.9))[7] == "not reproduced"  # 2.1 below θ_full
    assert verdicts(figures(sub_acc=69.0))[7] == "reproduced"
    assert verdicts(figures(random_acc=69.0))[7] == "explained by precision"
    assert judge(figures(random_acc=69.0))[7].why == \
        "a random mask of the same size and magnitudes does as well"


def test_seeds_intervals_and_every_seed_must_learn() -> None:
    seeds = {"dpo": {"sparsity": (79.0, 78.0, 80.0, 3), "acc": (70.5, 70.0, 71.0, 3)},
             "sfteq": {"sparsity": (50.5, 50.0, 51.0, 2)}}
    rows = judge(figures(seeds=seeds))
    assert [r.verdict for r in rows] == ["reproduced"] * 8
    assert rows[0].this_run == ("78.0-85.0% (75.0% among movable entries, 20.0% could not "
                                "move); DPO (seeds: mean 79.0%, 78.0-80.0%, n=3)")
    assert rows[0].control == ("equal-budget SFT 50.0% (seeds: mean 50.5%, 50.0-51.0%, n=2); "
                               "fp32 masters 70.0%")
    assert rows[1].this_run == "SFT 10.0%, DPO 80.0% (seeds: mean 79.0%, 78.0-80.0%, n=3)"
    assert rows[7].this_run == ("θ_sub 70.0% vs θ_full 71.0% (seeds: mean 70.5%, "
                                "70.0-71.0%, n=3)")
    # a third seed that did not learn makes the sparsity claim untellable; its lower
    # sparsity widens the range
    more = figures(rl_sparsity={"dpo-s0": 80.0, "dpo-s1": 78.0, "grpo-s0": 85.0,
                                "dpo-s2": 76.0}, learned={**LEARNED, "dpo-s2": False})
    first = judge(more)[0]
    assert (first.verdict, first.why) == ("cannot tell", "did not learn: dpo-s2")
    assert first.this_run.startswith("76.0-85.0%")
