"""The RL runs, with the real TRL trainers: DPO on preference pairs from the model's own
samples, GRPO with a correctness reward, and the masked DPO run of Conjecture 1.

Every run starts from a bf16 checkpoint loaded into fp32 (:func:`~maskhub.study.model.load_bf16`)
and writes two bf16 checkpoints, ``step-0000`` (the start) and its last step (accuracy is graded
on it, ``diff``/``verify`` read both). A run given ``record=`` also records its trajectory live
(:class:`LiveTrajectory`): no intermediate checkpoint is written.
"""

from __future__ import annotations

import copy
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from maskhub.study.model import save_bf16, save_fp32, study_device
from maskhub.study.sizes import StudySize
from maskhub.study.task import Problem, Split, generate


@dataclass
class RunOutput:
    """Where a run's checkpoints are and what its trainer logged."""

    directory: Path
    checkpoints: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    #: The live trajectory (a :class:`~maskhub.analytics.trajectory.TrajectoryResult`),
    #: for a run given ``record=``; and the seconds spent recording it.
    trajectory: Any = None
    record_seconds: float = 0.0
    #: The fp32 master weights at the last step (a run given ``fp32=True``): the control of
    #: its bf16 checkpoints.
    fp32_final: Path | None = None
    #: The per-point grades of a recorded run given ``grade=``: ``{"step", "heldout_acc",
    #: "heldout_loss"}`` at each recorded point, and the seconds they took.
    curve: list[dict[str, Any]] = field(default_factory=list)
    curve_seconds: float = 0.0


class Bf16Checkpoints(TrainerCallback):
    """Save the model as a bf16 checkpoint ``step-0000`` at train begin and ``step-NNNN``
    at the last step (``fp32``: also the fp32 master weights there, ``fp32-step-NNNN``),
    and collect the logged losses."""

    def __init__(self, output: RunOutput, fp32: bool = False) -> None:
        """Write under ``output.directory``."""
        self.output = output
        self.fp32 = fp32

    def _save(self, model: Any, step: int) -> None:
        """Write checkpoint ``step-NNNN``."""
        self.output.checkpoints.append(save_bf16(model, self.output.directory / f"step-{step:04d}"))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        """Save the starting point as ``step-0000``."""
        self._save(model, 0)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    **kwargs: Any) -> None:
        """Save the last step."""
        if state.global_step == state.max_steps:
            self._save(model, state.global_step)
            if self.fp32:
                self.output.fp32_final = save_fp32(
                    model, self.output.directory / f"fp32-step-{state.global_step:04d}")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        """Keep the training loss of every logged step."""
        if logs and "loss" in logs:
            self.output.losses.append(float(logs["loss"]))


class LiveTrajectory(TrainerCallback):
    """Record the run's trajectory while it trains, with :class:`maskhub.torch.Recorder`:
    masks ``RUN-step-N`` every ``every`` steps and at the last step, then ``RUN-ever`` and
    the trajectory rows (``output.trajectory``). No checkpoint is written.

    The trainers keep fp32 master weights and the study's checkpoints are their bf16 casts,
    so the recorder watches a bf16 view of the model (one bf16 copy, 2 bytes per parameter,
    refreshed from the fp32 weights by the same round-to-nearest cast as ``save_bf16`` before
    each record): every recorded mask is, bit for bit, the diff of the bf16 checkpoint the
    run would have written at that step against the bf16 start. ``recorder_kwargs`` go to
    the Recorder (``home``, ``tol``, ``tags``, ``algorithm``...); ``per_step=True`` so the
    "vs previous" counts are filled.

    ``grade(view)``: called on the bf16 view at each recorded point (step 0 included); its
    dict, with ``step``, is appended to ``output.curve`` (the per-checkpoint loss/accuracy
    curve of the checkpoints the run would have written)."""

    def __init__(self, output: RunOutput, run: str, every: int,
                 grade: Callable[[Any], dict[str, Any]] | None = None,
                 **recorder_kwargs: Any) -> None:
        """Record ``run`` every ``every`` optimizer steps into ``output``."""
        self.output = output
        self.run = run
        self.every = every
        self.grade = grade
        self.recorder_kwargs = recorder_kwargs
        self.recorder: Any = None
        self.model: Any = None
        self.view: Any = None
        self.params: dict[str, Any] = {}

    def _sync(self) -> None:
        """Refresh the bf16 view from the trained (fp32) weights."""
        with torch.no_grad():
            for name, p in self.view.named_parameters():
                p.copy_(self.params[name])

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        """Keep θ0: the bf16 view of the model as training starts (its exact bf16 start)."""
        from maskhub.torch import Recorder, unwrap_model

        t0 = time.perf_counter()
        self.model = unwrap_model(model)
        self.params = dict(self.model.named_parameters())
        self.view = copy.deepcopy(self.model).to(torch.bfloat16).requires_grad_(False)
        self._sync()
        self.recorder = Recorder(self.view, self.run, step=state.global_step, per_step=True,
                                 **self.recorder_kwargs)
        self.output.record_seconds += time.perf_counter() - t0
        self._grade(state.global_step)

    def _grade(self, step: int) -> None:
        """Grade the bf16 view (just synced) at ``step`` into ``output.curve``."""
        if self.grade is None:
            return
        t0 = time.perf_counter()
        self.output.curve.append({"step": step, **self.grade(self.view)})
        self.output.curve_seconds += time.perf_counter() - t0

    def _record(self, step: int) -> None:
        t0 = time.perf_counter()
        self._sync()
        self.recorder.record(step)
        self.output.record_seconds += time.perf_counter() - t0
        self._grade(step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Record every ``every`` steps and at the last one."""
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._record(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Record the last step (if not yet), register the trajectory, free the copies."""
        if self.recorder is None:
            return
        if state.global_step > self.recorder.last_step:
            self._record(state.global_step)
        t0 = time.perf_counter()
        self.output.trajectory = self.recorder.finish()
        self.output.record_seconds += time.perf_counter() - t0
        self.recorder = self.view = self.model = None
        self.params = {}


def _common_args(size_steps: int, lr: float, batch: int, seed: int, directory: Path
                 ) -> dict[str, Any]:
    """The TrainingArguments both trainers share: the study's device (the CPU unless a GPU is
    present), constant learning rate, no weight decay, no Trainer checkpoints (the study
    writes its own bf16 ones), a loss every step."""
    return dict(output_dir=str(directory / "trainer"), max_steps=size_steps, learning_rate=lr,
                per_device_train_batch_size=batch, seed=seed, data_seed=seed,
                use_cpu=study_device() == "cpu",
                report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                dataloader_num_workers=0)


def preference_pairs(model: Any, tokenizer: Any, size: StudySize, split: Split,
                     seed: int) -> list[dict[str, str]]:
    """DPO pairs from ``model``'s own samples: for ``dpo_prompts`` train prompts, 4 samples
    at temperature 1; chosen = the correct answer, rejected = the first wrong sample
    (prompts whose samples were all correct give no pair)."""
    problems = random.Random(seed).sample(list(split.train), size.dpo_prompts)
    samples = generate(model, tokenizer, [p.prompt for p in problems], samples=4,
                       temperature=1.0, seed=seed)
    pairs = []
    for i, p in enumerate(problems):
        wrong = [s for s in samples[4 * i:4 * i + 4] if s != p.answer]
        if wrong:
            pairs.append({"prompt": p.prompt, "chosen": p.answer, "rejected": wrong[0]})
    return pairs


def run_dpo(model: Any, tokenizer: Any, size: StudySize, pairs: list[dict[str, str]],
            seed: int, directory: Path, *, callbacks: Sequence[Any] = (),
            optimizers: Callable[[Any, Any], tuple[Any, Any]] | None = None,
            record: dict[str, Any] | None = None,
            grade: Callable[[Any], dict[str, Any]] | None = None, fp32: bool = False
            ) -> RunOutput:
    """DPO (sigmoid loss plus the NLL of the chosen answer, as in RPO) from ``model`` with
    a frozen copy of it as the reference. ``optimizers(model, args)``: a builder for
    ``Trainer(optimizers=...)`` (the masked run's masked optimizer). ``record``: the
    :class:`LiveTrajectory` arguments (``run``, ``home``, ...) to record the trajectory live;
    ``grade``: grade each recorded point (:class:`LiveTrajectory`); ``fp32``: also save the
    fp32 master weights at the last step."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**_common_args(size.dpo_steps, size.dpo_lr, size.dpo_batch, seed,
                                    directory),
                     beta=size.dpo_beta, loss_type=["sigmoid", "sft"])
    output = RunOutput(directory)
    model.to(study_device())  # before the optimizer and the reference are built on it
    reference = copy.deepcopy(model).eval()
    extra = {"optimizers": optimizers(model, args)} if optimizers else {}
    trainer = DPOTrainer(model=model, ref_model=reference, args=args,
                         train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
                         callbacks=[*callbacks, *_recording(output, size, record, grade),
                                    Bf16Checkpoints(output, fp32)],
                         **extra)
    _train(trainer)
    return output


def correctness_reward(prompts: list[str], completions: list[str], answer: list[str],
                       **kwargs: Any) -> list[float]:
    """1.0 for a completion that is exactly the answer, else 0.0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def run_grpo(model: Any, tokenizer: Any, size: StudySize, split: Split, seed: int,
             directory: Path, *, record: dict[str, Any] | None = None,
             grade: Callable[[Any], dict[str, Any]] | None = None, fp32: bool = False
             ) -> RunOutput:
    """GRPO with :func:`correctness_reward` over the train prompts (no KL term, as in
    DAPO-style recipes; ``grpo_generations`` completions per prompt at temperature 1).
    ``record``, ``grade``, ``fp32``: as for :func:`run_dpo`."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": p.prompt, "answer": p.answer} for p in _shuffled(split.train, seed)]
    args = GRPOConfig(**_common_args(size.grpo_steps, size.grpo_lr, size.grpo_batch, seed,
                                     directory),
                      num_generations=size.grpo_generations, max_completion_length=4,
                      temperature=1.0, beta=0.0)
    output = RunOutput(directory)
    model.to(study_device())
    trainer = GRPOTrainer(model=model, reward_funcs=correctness_reward, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[*_recording(output, size, record, grade),
                                     Bf16Checkpoints(output, fp32)])
    _train(trainer)
    return output


def _recording(output: RunOutput, size: StudySize, record: dict[str, Any] | None,
               grade: Callable[[Any], dict[str, Any]] | None = None) -> list[LiveTrajectory]:
    """The live trajectory callback of a run given ``record=`` (none otherwise)."""
    if record is None:
        return []
    return [LiveTrajectory(output, every=size.record_every, grade=grade, **record)]


def _shuffled(problems: tuple[Problem, ...], seed: int) -> list[Problem]:
    """``problems`` in a seeded random order."""
    out = list(problems)
    random.Random(seed).shuffle(out)
    return out


def _train(trainer: Any) -> None:
    """Train without the Trainer's per-step log lines (the study reports its own progress),
    then remove the Trainer's (empty) output directory."""
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
