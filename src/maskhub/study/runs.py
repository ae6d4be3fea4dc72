"""Train every model of the study: θ_pre, θ_sft and the RL runs from them.

Each run's facts (steps, learning rate, batch, losses, task accuracy before and after, wall
time) are kept in a :class:`RunFacts`; :mod:`maskhub.study.measure` stores them with the
run's mask, in the registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskhub.study.model import load_bf16, new_model, save_bf16, save_fp32
from maskhub.study.rl import RunOutput, preference_pairs, run_dpo, run_grpo
from maskhub.study.sizes import StudySize
from maskhub.study.supervised import pretrain, sft
from maskhub.study.task import Split, accuracy, answer_loss

#: The study's RL runs: name -> (algorithm, starting checkpoint, seed).
RL_RUNS = {
    "dpo-s0": ("dpo", "sft", 0),
    "dpo-s1": ("dpo", "sft", 1),
    "grpo-s0": ("grpo", "sft", 0),
    "dpo-nosft-s0": ("dpo", "pre", 0),
    "dpo-sub-s0": ("dpo", "sft", 0),
    "dpo-subcb-s0": ("dpo", "sft", 0),
    "dpo-rand-s0": ("dpo", "sft", 0),
}
#: The runs of Conjecture 1 (θ_sub) and how each applies its mask: dpo-s0's, or (the
#: random-mask control) a random mask with dpo-s0's count per tensor and |θ0| exponent.
MASKED_RUNS = {"dpo-sub-s0": "masked optimizer (MaskedAdamW)",
               "dpo-subcb-s0": "Trainer callback (MaskCallback)",
               "dpo-rand-s0": "random mask like dpo-s0 (per magnitude), MaskedAdamW"}
#: The random-mask control run.
RANDOM_RUN = "dpo-rand-s0"
#: Equal-budget controls: plain SFT at the DPO runs' learning rate, steps and batch, from
#: θ_sft and from θ_pre (name -> (algorithm, start, seed)). If their sparsity matches the RL
#: runs', the movement budget and the start weights explain it, not the algorithm.
CONTROL_RUNS = {"sfteq-s0": ("sft", "sft", 0), "sfteq-nosft-s0": ("sft", "pre", 0)}
#: The runs whose fp32 master weights are saved at the start and the end (the unmasked RL
#: runs and the equal-budget controls): the diff of those is the fp32 control of the run's
#: bf16 mask (how much of its sparsity is the bf16 cast).
FP32_RUNS = ("dpo-s0", "dpo-s1", "grpo-s0", "dpo-nosft-s0", *CONTROL_RUNS)
#: The most ``--seeds`` accepted.
MAX_SEEDS = 10


@dataclass(frozen=True)
class StudyRuns:
    """The runs of a study of ``seeds`` seeds: the base runs (:data:`RL_RUNS`,
    :data:`CONTROL_RUNS`) and, for each seed k beyond them, ``dpo-sK`` (from 2; dpo-s1 is
    a base run), ``grpo-sK`` and ``sfteq-sK`` from θ_sft, trained after the base runs of
    their kind so that the base runs are the same whatever ``seeds``."""

    seeds: int = 1

    @property
    def rl(self) -> dict[str, tuple[str, str, int]]:
        """The RL runs (name -> algorithm, start, seed), in training order."""
        out = dict(RL_RUNS)
        for k in range(1, self.seeds):
            if k >= 2:
                out[f"dpo-s{k}"] = ("dpo", "sft", k)
            out[f"grpo-s{k}"] = ("grpo", "sft", k)
        return out

    @property
    def from_sft(self) -> list[str]:
        """The unmasked RL runs from θ_sft (every seed): the runs of the sparsity claims."""
        return [run for run, (_, start, _) in self.rl.items()
                if start == "sft" and run not in MASKED_RUNS]

    @property
    def controls(self) -> dict[str, tuple[str, str, int]]:
        """The equal-budget SFT controls, in training order."""
        return {**CONTROL_RUNS, **{f"sfteq-s{k}": ("sft", "sft", k)
                                   for k in range(1, self.seeds)}}

    @property
    def fp32(self) -> tuple[str, ...]:
        """The runs whose fp32 masters are saved and diffed (every unmasked run)."""
        return (*FP32_RUNS, *(r for r in (*self.rl, *self.controls)
                              if r not in RL_RUNS and r not in CONTROL_RUNS))

    @property
    def masks(self) -> tuple[str, ...]:
        """Every run with a mask, in report order."""
        return ("sft", *self.rl, *self.controls)


def check_seeds(seeds: int) -> int:
    """``seeds`` if it is a whole number from 1 to :data:`MAX_SEEDS` (else a one-line
    :class:`~maskhub.errors.UsageError`)."""
    from maskhub.errors import UsageError

    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS:
        raise UsageError(f"--seeds must be a whole number from 1 to {MAX_SEEDS}, not {seeds!r}")
    return seeds


@dataclass
class RunFacts:
    """What one training run did and what it reached."""

    run: str
    algorithm: str
    start: str
    seed: int
    steps: int
    learning_rate: float
    batch_size: int
    loss_first: float | None
    loss_last: float | None
    accuracy_heldout_before: float
    accuracy_heldout_after: float
    accuracy_train_before: float
    accuracy_train_after: float
    train_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The facts as a JSON-ready dict (``extra`` merged in)."""
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


@dataclass
class TrainedStudy:
    """Checkpoints and facts of every run, by run name (``pretrain``, ``sft``, then
    :data:`RL_RUNS`)."""

    directory: Path
    checkpoints: dict[str, list[Path]] = field(default_factory=dict)
    facts: dict[str, RunFacts] = field(default_factory=dict)
    pairs: dict[int, int] = field(default_factory=dict)
    #: The live-recorded trajectories (``TrajectoryResult``), by run, and the seconds
    #: spent recording them (maskhub's time, inside the training loops).
    trajectories: dict[str, Any] = field(default_factory=dict)
    record_seconds: float = 0.0
    #: The fp32 master weights (start, final) of each run of :data:`FP32_RUNS`.
    fp32: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    #: Seconds spent grading the recorded points (the loss/accuracy curves).
    curve_seconds: float = 0.0

    def start_of(self, run: str) -> Path:
        """The checkpoint a run started from."""
        return self.checkpoints[run][0]

    def final_of(self, run: str) -> Path:
        """The checkpoint a run ended at."""
        return self.checkpoints[run][-1]


class _Evaluator:
    """Task accuracy on the held-out problems and on (up to 200 of) the train problems."""

    def __init__(self, tokenizer: Any, split: Split) -> None:
        self.tokenizer = tokenizer
        self.heldout = split.heldout
        self.train = split.train[:200]
        self.of_start: dict[str, tuple[float, float]] = {}

    def __call__(self, model: Any) -> tuple[float, float]:
        """(held-out accuracy, train accuracy) of ``model``."""
        return (accuracy(model, self.tokenizer, self.heldout),
                accuracy(model, self.tokenizer, self.train))

    def point(self, model: Any) -> dict[str, float]:
        """The curve's grades of ``model``: held-out accuracy and held-out answer loss."""
        return {"heldout_acc": accuracy(model, self.tokenizer, self.heldout),
                "heldout_loss": answer_loss(model, self.tokenizer, self.heldout)}

    def start(self, start: str, model: Any) -> tuple[float, float]:
        """Accuracy of starting checkpoint ``start`` (``model`` holds it), measured once:
        greedy decoding of the same weights gives the same answers for every run."""
        if start not in self.of_start:
            self.of_start[start] = self(model)
        return self.of_start[start]


def _mean(values: list[float], head: bool) -> float | None:
    """Mean of the first (or last) five losses (one step's loss is noisy); None without."""
    part = values[:5] if head else values[-5:]
    return sum(part) / len(part) if part else None


def train_all(directory: Path, size: StudySize, split: Split, tokenizer: Any, seed: int,
              mask_for: Callable[[TrainedStudy, str], Any],
              say: Callable[[str], None],
              record_for: Callable[[str], dict[str, Any] | None] = lambda run: None,
              runs: StudyRuns = StudyRuns()) -> TrainedStudy:
    """Train θ_pre, θ_sft, every run of :data:`RL_RUNS` and the controls of
    :data:`CONTROL_RUNS` under ``directory``. Accuracy after a run is graded on its saved
    bf16 checkpoint (the weights whose sparsity is measured), not the in-memory fp32 model.

    ``mask_for(trained, run)``: called before each masked run (``dpo-s0`` is trained by then:
    its checkpoints and facts are in ``trained``); returns the registered mask it trains with.
    ``record_for(run)``: the :class:`~maskhub.study.rl.LiveTrajectory` arguments of a run
    whose trajectory is recorded live (``None`` for the others). ``runs``: the runs (the
    seeds' runs beyond the base ones)."""
    out = TrainedStudy(directory)
    evaluate = _Evaluator(tokenizer, split)

    def graded(path: Path) -> tuple[float, float]:
        return evaluate(load_bf16(size, path))

    grader = new_model(size, seed=0)

    def grade_view(view: Any) -> dict[str, float]:
        """Grade a bf16 view: its values in fp32, as :func:`load_bf16` reads a checkpoint."""
        values = dict(view.named_parameters())
        with torch.no_grad():
            for name, p in grader.named_parameters():
                p.copy_(values[name])
        return evaluate.point(grader)

    say(f"pretraining θ_pre ({size.pretrain_steps} steps)")
    t0 = time.perf_counter()
    model = new_model(size, seed)
    before = evaluate(model)
    losses = pretrain(model, size, seed, say=say)
    pre = save_bf16(model, directory / "pre")
    out.checkpoints["pretrain"] = [pre]
    evaluate.of_start["pre"] = graded(pre)
    out.facts["pretrain"] = RunFacts("pretrain", "pretrain", "init", seed, size.pretrain_steps,
                                     size.pretrain_lr, size.pretrain_batch, _mean(losses, True),
                                     _mean(losses, False), *_pair(before, evaluate.of_start["pre"]),
                                     time.perf_counter() - t0)

    say(f"SFT θ_sft ({size.sft_steps} steps)")
    t0 = time.perf_counter()
    model = load_bf16(size, pre)
    before = evaluate.start("pre", model)
    losses = sft(model, tokenizer, size, split, seed, say=say)
    sft_dir = save_bf16(model, directory / "sft")
    out.checkpoints["sft"] = [pre, sft_dir]
    evaluate.of_start["sft"] = graded(sft_dir)
    out.facts["sft"] = RunFacts("sft", "sft", "pre", seed, size.sft_steps, size.sft_lr,
                                size.sft_batch, _mean(losses, True), _mean(losses, False),
                                *_pair(before, evaluate.of_start["sft"]),
                                time.perf_counter() - t0)

    starts = {"pre": pre, "sft": sft_dir}
    # The fp32 masters every run starts from: its start checkpoint's bf16 values in fp32.
    fp32_starts = {k: save_fp32(load_bf16(size, v), directory / f"{k}-fp32")
                   for k, v in starts.items()}
    pairs: dict[int, list[dict[str, str]]] = {}
    for run, (algorithm, start, run_seed) in runs.rl.items():
        mask = mask_for(out, run) if run in MASKED_RUNS else None  # maskhub's time
        t0 = time.perf_counter()
        model = load_bf16(size, starts[start])
        before = evaluate.start(start, model)
        record = record_for(run)
        if algorithm == "grpo":
            steps, lr, batch = size.grpo_steps, size.grpo_lr, size.grpo_batch
            say(f"GRPO {run} from θ_{start} ({steps} steps)")
            result = run_grpo(model, tokenizer, size, split, run_seed, directory / run,
                              record=record, grade=grade_view if record else None,
                              fp32=run in runs.fp32)
            extra: dict[str, Any] = {"num_generations": size.grpo_generations, "beta": 0.0}
        else:
            steps, lr, batch = size.dpo_steps, size.dpo_lr, size.dpo_batch
            if run_seed not in pairs:  # the pairs come from θ_sft's samples for every run
                sampler = model if start == "sft" else load_bf16(size, sft_dir)
                pairs[run_seed] = preference_pairs(sampler, tokenizer, size, split, run_seed)
                out.pairs[run_seed] = len(pairs[run_seed])
            say(f"DPO {run} from θ_{start} ({steps} steps, {len(pairs[run_seed])} pairs)")
            result = _dpo(run, model, tokenizer, size, pairs[run_seed], run_seed,
                          directory / run, mask, record, grade_view if record else None,
                          fp32=run in runs.fp32)
            extra = {"beta": size.dpo_beta, "loss_type": "sigmoid+sft",
                     "n_pairs": len(pairs[run_seed])}
            if run in MASKED_RUNS:
                extra["masked_with"] = MASKED_RUNS[run]
        out.checkpoints[run] = result.checkpoints
        if result.trajectory is not None:
            out.trajectories[run] = result.trajectory
        out.record_seconds += result.record_seconds
        out.curve_seconds += result.curve_seconds
        if result.curve:
            extra["curve"] = result.curve
        if result.fp32_final is not None:
            out.fp32[run] = (fp32_starts[start], result.fp32_final)
        out.facts[run] = RunFacts(run, algorithm, start, run_seed, steps, lr, batch,
                                  _mean(result.losses, True), _mean(result.losses, False),
                                  *_pair(before, graded(result.checkpoints[-1])),
                                  time.perf_counter() - t0, extra)

    for run, (_, start, run_seed) in runs.controls.items():
        say(f"control {run}: SFT from θ_{start} at the DPO budget ({size.dpo_steps} steps, "
            f"lr {size.dpo_lr:g})")
        t0 = time.perf_counter()
        model = load_bf16(size, starts[start])
        before = evaluate.start(start, model)
        losses = sft(model, tokenizer, size, split, run_seed, steps=size.dpo_steps,
                     lr=size.dpo_lr, batch=size.dpo_batch)
        final = save_bf16(model, directory / run)
        out.checkpoints[run] = [starts[start], final]
        if run in runs.fp32:
            out.fp32[run] = (fp32_starts[start], save_fp32(model, directory / f"{run}-fp32"))
        out.facts[run] = RunFacts(run, "sft", start, run_seed, size.dpo_steps, size.dpo_lr,
                                  size.dpo_batch, _mean(losses, True), _mean(losses, False),
                                  *_pair(before, graded(final)), time.perf_counter() - t0,
                                  {"control": "equal-budget SFT"})
    return out


def _dpo(run: str, model: Any, tokenizer: Any, size: StudySize, pairs: list[dict[str, str]],
         seed: int, directory: Path, mask: Any, record: dict[str, Any] | None = None,
         grade: Callable[[Any], dict[str, Any]] | None = None, fp32: bool = False
         ) -> RunOutput:
    """A DPO run; the masked runs apply ``mask`` as :data:`MASKED_RUNS` says; ``record``:
    record its trajectory live (``grade``: grade each point); ``fp32``: save its fp32
    masters at the last step."""
    if run in ("dpo-sub-s0", RANDOM_RUN):
        from maskhub.integrations.transformers import masked_optimizer

        return run_dpo(model, tokenizer, size, pairs, seed, directory,
                       optimizers=lambda m, args: masked_optimizer(m, mask, args))
    if run == "dpo-subcb-s0":
        from maskhub.integrations.transformers import MaskCallback

        return run_dpo(model, tokenizer, size, pairs, seed, directory,
                       callbacks=[MaskCallback(mask)])
    return run_dpo(model, tokenizer, size, pairs, seed, directory, record=record, grade=grade,
                   fp32=fp32)


def _pair(before: tuple[float, float], after: tuple[float, float]
          ) -> tuple[float, float, float, float]:
    """(held-out before, held-out after, train before, train after)."""
    return before[0], after[0], before[1], after[1]
