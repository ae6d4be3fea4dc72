"""Every measurement of the study, through maskhub's public API (:class:`maskhub.Registry`).

Each run's mask is a diff of its final checkpoint against its start, with the tolerance
sweep (Tables 1/6), update rank and |Δ| statistics (Table 2); the run's facts go into the
mask's ``notes`` as JSON, so ``json_extract(notes, '$.accuracy_heldout_after')`` reads them.
Then: overlaps between seeds and algorithms with every baseline (Table 4), trajectories of
the intermediate checkpoints (Figures 2, 5-7), and for the masked runs ``compare`` against
the full run and ``verify`` (Conjecture 1), recorded in the masked run's notes.

The trajectories (Figures 2, 5-7) are recorded live while their runs train
(:class:`~maskhub.study.rl.LiveTrajectory`, :meth:`Measurer.record_for`): no intermediate
checkpoint is written, the recorder registers ``NAME-step-N`` at each point and ``NAME-ever``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskhub.registry.api import Mask, Registry
from maskhub.study.runs import (
    CONTROL_RUNS,
    MASKED_RUNS,
    RANDOM_RUN,
    RL_RUNS,
    StudyRuns,
    TrainedStudy,
)
from maskhub.study.sizes import StudySize

#: The update tolerance of every mask (the paper's, and maskhub's default).
TOL = 1e-5
#: The tolerances of the sweep (Table 6).
SWEEP = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3)
#: Tolerances at which θ_sub and θ_full are compared (Conjecture 1).
AGREEMENT_TOLS = (0.0, 1e-5, 1e-4, 1e-3)
#: The masks whose overlaps make Table 4 (same base θ_sft: two seeds, two algorithms).
OVERLAP_RUNS = ("dpo-s0", "dpo-s1", "grpo-s0")
#: The runs whose per-layer x module sparsity is drawn (Figure 3: the paper's DPO and PRIME).
FIGURE3_RUNS = ("dpo-s0", "grpo-s0")
#: Every run with a mask, in report order (of one seed: see :class:`StudyRuns`).
MASK_RUNS = ("sft", *RL_RUNS, *CONTROL_RUNS)
#: The runs whose trajectories are recorded live (no intermediate checkpoint written).
TRAJECTORY_RUNS = ("dpo-s0", "dpo-s1", "grpo-s0", "dpo-nosft-s0")


@dataclass(frozen=True)
class StudyNames:
    """How the study names its masks, models and trajectories, from one ``prefix``; and
    which runs it has (``seeds``: see :class:`~maskhub.study.runs.StudyRuns`)."""

    prefix: str
    seeds: int = 1

    @property
    def runs(self) -> StudyRuns:
        """The study's runs."""
        return StudyRuns(self.seeds)

    @property
    def tag(self) -> str:
        """The tag on every mask of this study (``study:PREFIX``)."""
        return f"study:{self.prefix}"

    def mask(self, run: str) -> str:
        """The mask of ``run`` (``sft`` or one of :data:`RL_RUNS`)."""
        return f"{self.prefix}-{run}"

    def model(self, checkpoint: str) -> str:
        """The recorded model name of a checkpoint (``pre``, ``sft`` or a run)."""
        return f"maskhub-study/{self.prefix}-{checkpoint}"

    def trajectory(self, run: str) -> str:
        """The trajectory of ``run``, recorded live: it registers ``NAME-step-N`` at each
        point (the last one is the final subnetwork) and ``NAME-ever``."""
        return f"{self.prefix}-traj-{run}"

    def fp32(self, run: str) -> str:
        """The fp32 control of ``run``'s mask: the diff of its fp32 master weights."""
        return f"{self.mask(run)}-fp32"

    @property
    def random_mask(self) -> str:
        """The random-placement control of dpo-s0's mask (``combine random``)."""
        return self.mask("dpo-s0-random")

    def every_mask(self) -> list[str]:
        """Every mask name the study registers, but the trajectories' ``NAME-step-N`` (see
        :meth:`is_point`)."""
        names = [self.mask(r) for r in self.runs.masks] + [self.random_mask]
        names += [self.fp32(r) for r in self.runs.fp32]
        for run in TRAJECTORY_RUNS:
            names.append(f"{self.trajectory(run)}-ever")
        return names

    def is_point(self, mask: str) -> bool:
        """Whether ``mask`` is a live trajectory point ``NAME-step-N`` of this study."""
        return any(mask.startswith(f"{self.trajectory(run)}-step-") for run in TRAJECTORY_RUNS)


@dataclass
class Measurements:
    """What the measurements registered and drew."""

    masks: dict[str, Mask] = field(default_factory=dict)
    trajectories: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)


class Measurer:
    """Registers and measures the study's runs in ``registry``."""

    def __init__(self, registry: Registry, names: StudyNames, size: StudySize,
                 dataset: str, say: Callable[[str], None]) -> None:
        """``dataset``: the dataset name recorded on every mask."""
        self.registry = registry
        self.names = names
        self.size = size
        self.dataset = dataset
        self.say = say
        self.out = Measurements()
        #: Seconds spent diffing the fp32 controls (part of the maskhub time).
        self.fp32_seconds = 0.0

    def register(self, trained: TrainedStudy, run: str, extra: dict[str, Any] | None = None
                 ) -> Mask:
        """Diff ``run``'s final checkpoint against its start (sweep, rank, stats) and
        register the mask with the run's facts (and ``extra``) as JSON notes."""
        if run in self.out.masks:
            return self.out.masks[run]
        facts = trained.facts[run]
        order = self.names.runs.masks.index(run)  # the report lists runs in this order
        notes = {"study": self.names.prefix, "size": self.size.name, "order": order,
                 **facts.to_dict(), **(extra or {})}
        self.say(f"maskhub diff {run}")
        mask = self.registry.diff(
            trained.start_of(run), trained.final_of(run), name=self.names.mask(run),
            algorithm=facts.algorithm, seed=facts.seed, dataset=self.dataset, tol=TOL,
            sweep=SWEEP, base_model=self.names.model(facts.start),
            target_model=self.names.model(run), tags=("maskhub-study", self.names.tag),
            notes=json.dumps(notes, sort_keys=True), rank=True, stats=True)
        self.out.masks[run] = mask
        return mask

    def register_fp32(self, trained: TrainedStudy, run: str) -> Mask:
        """The fp32 control of ``run``: diff its fp32 master weights (start, final) at the
        same tolerance (and at 0), registered as ``PREFIX-RUN-fp32`` with no notes (the runs'
        tables list masks with notes)."""
        facts = trained.facts[run]
        start, final = trained.fp32[run]
        self.say(f"maskhub diff {run} (fp32 masters)")
        t0 = time.perf_counter()
        mask = self.registry.diff(
            start, final, name=self.names.fp32(run), algorithm=facts.algorithm,
            seed=facts.seed, dataset=self.dataset, tol=TOL, sweep=(0.0,),
            base_model=self.names.model(facts.start) + "-fp32",
            target_model=self.names.model(run) + "-fp32",
            tags=("maskhub-study", self.names.tag, "fp32-control"))
        self.out.masks[run + ":fp32"] = mask
        self.fp32_seconds += time.perf_counter() - t0
        return mask

    def random_control(self, trained: TrainedStudy) -> Mask:
        """``combine random --like dpo-s0 --per magnitude``: the mask the random-mask control
        run trains with (same count per tensor and |θ0| exponent, random positions)."""
        if RANDOM_RUN + ":mask" in self.out.masks:
            return self.out.masks[RANDOM_RUN + ":mask"]
        full = self.register(trained, "dpo-s0")
        self.say(f"maskhub combine random --like {full.name} --per magnitude")
        mask = self.registry.combine("random", like=full.name, per="magnitude", seed=0,
                                     base=str(trained.start_of("dpo-s0")),
                                     name=self.names.random_mask)
        self.out.masks[RANDOM_RUN + ":mask"] = mask
        return mask

    def mask_for(self, trained: TrainedStudy, run: str) -> Mask:
        """The mask masked run ``run`` trains with."""
        if run == RANDOM_RUN:
            return self.random_control(trained)
        return self.register(trained, "dpo-s0")

    def conjecture1(self, trained: TrainedStudy, run: str) -> dict[str, Any]:
        """θ_sub (``run``) against θ_full (``dpo-s0``): ``compare`` inside/outside the full
        run's mask at :data:`AGREEMENT_TOLS`, and ``verify`` that nothing outside the mask the
        run trained with moved."""
        full = self.out.masks["dpo-s0"]
        used = self.mask_for(trained, run)
        self.say(f"maskhub compare / verify {run}")
        report = self.registry.compare(trained.final_of(run), trained.final_of("dpo-s0"),
                                       mask=full, tols=AGREEMENT_TOLS)
        check = self.registry.verify(used, trained.start_of(run), trained.final_of(run))
        return {"full_run": "dpo-s0", "full_mask": full.name, "trained_mask": used.name,
                "verify_ok": check.ok, "verify_n_changed": check.n_changed,
                "verify_n_outside": check.n_outside,
                "agreement": [{"tol": g.tol, "frac_equal": g.frac_equal,
                               "frac_equal_inside": g.frac_equal_inside,
                               "frac_equal_outside": g.frac_equal_outside}
                              for g in report.agreements]}

    def record_for(self, run: str) -> dict[str, Any] | None:
        """The live-recording arguments of ``run`` if it is one of :data:`TRAJECTORY_RUNS`
        (its masks carry the study's tags, tolerance and run facts), else ``None``."""
        if run not in TRAJECTORY_RUNS:
            return None
        algorithm, start, seed = RL_RUNS[run]
        return {"run": self.names.trajectory(run), "home": self.registry, "tol": TOL,
                "algorithm": algorithm, "seed": seed, "dataset": self.dataset,
                "tags": ("maskhub-study", self.names.tag),
                "base_model": self.names.model(start)}

    def measure_all(self, trained: TrainedStudy, figures: Path) -> Measurements:
        """Register every run's mask and the overlaps, take the trajectories recorded while
        the runs trained, draw the figures."""
        for run in self.names.runs.masks:
            extra = {"conjecture1": self.conjecture1(trained, run)} if run in MASKED_RUNS \
                else None
            self.register(trained, run, extra)
        for run in self.names.runs.fp32:
            self.register_fp32(trained, run)
        self.say("maskhub overlap " + " ".join(self.names.mask(r) for r in OVERLAP_RUNS))
        self.registry.overlap_all([self.names.mask(r) for r in OVERLAP_RUNS])
        for run in TRAJECTORY_RUNS:
            self.out.trajectories[run] = trained.trajectories[run]
        self.draw(figures, trained)
        return self.out

    def draw(self, figures: Path, trained: TrainedStudy) -> None:
        """The PNG figures: Figure 3 (per layer x module sparsity) of the DPO and GRPO
        masks, Table 4's overlap matrix, Figures 2/5-7 for each trajectory, and the
        trajectory runs' held-out loss/accuracy curves."""
        from maskhub.analytics.trajectory_plot import plot_trajectory

        figures.mkdir(parents=True, exist_ok=True)
        self.say("maskhub plot (figures)")
        for run in FIGURE3_RUNS:
            path = figures / f"figure3-{run}.png"
            self.out.figures[f"figure3-{run}"] = self.registry.plot(
                [self.names.mask(run)], path, kind="sparsity")
        self.out.figures["table4-overlap"] = self.registry.plot(
            [self.names.mask(r) for r in OVERLAP_RUNS], figures / "table4-overlap.png",
            kind="overlap", baseline="magnitude")
        for run, result in self.out.trajectories.items():
            key = f"figure5-{run}"
            self.out.figures[key] = plot_trajectory(result.to_dict(), figures / f"{key}.png")
        curves = {run: trained.facts[run].extra["curve"] for run in TRAJECTORY_RUNS
                  if "curve" in trained.facts[run].extra}
        if curves:
            from maskhub.study.curves import plot_curves

            self.out.figures["curves"] = plot_curves(curves, figures / "curves.png")
