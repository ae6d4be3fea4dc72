"""The RL runs, with the real TRL trainers: DPO on preference pairs from the model's own
samples, GRPO with a correctness reward, and the masked DPO run of Conjecture 1.

Every run starts from a bf16 checkpoint loaded into fp32 (:func:`~maskhub.study.model.load_bf16`)
and writes a bf16 checkpoint every ``save_every`` steps (``step-0000`` is the start).
"""

from __future__ import annotations

import copy
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PrinterCallback, TrainerCallback

from maskhub.study.model import save_bf16
from maskhub.study.sizes import StudySize
from maskhub.study.task import Problem, Split, generate


@dataclass
class RunOutput:
    """Where a run's checkpoints are and what its trainer logged."""

    directory: Path
    checkpoints: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


class Bf16Checkpoints(TrainerCallback):
    """Save the model as a bf16 checkpoint ``step-NNNN`` every ``every`` steps and at the
    last step, and collect the logged losses."""

    def __init__(self, output: RunOutput, every: int) -> None:
        """Write under ``output.directory``."""
        self.output = output
        self.every = every

    def _save(self, model: Any, step: int) -> None:
        """Write checkpoint ``step-NNNN``."""
        self.output.checkpoints.append(save_bf16(model, self.output.directory / f"step-{step:04d}"))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        """Save the starting point as ``step-0000``."""
        self._save(model, 0)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    **kwargs: Any) -> None:
        """Save every ``every`` steps and at the last one."""
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._save(model, state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        """Keep the training loss of every logged step."""
        if logs and "loss" in logs:
            self.output.losses.append(float(logs["loss"]))


def _common_args(size_steps: int, lr: float, batch: int, seed: int, directory: Path
                 ) -> dict[str, Any]:
    """The TrainingArguments both trainers share: CPU, constant learning rate, no weight
    decay, no Trainer checkpoints (the study writes its own bf16 ones), a loss every step."""
    return dict(output_dir=str(directory / "trainer"), max_steps=size_steps, learning_rate=lr,
                per_device_train_batch_size=batch, seed=seed, data_seed=seed, use_cpu=True,
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
            optimizers: Callable[[Any, Any], tuple[Any, Any]] | None = None) -> RunOutput:
    """DPO (sigmoid loss plus the NLL of the chosen answer, as in RPO) from ``model`` with
    a frozen copy of it as the reference. ``optimizers(model, args)``: a builder for
    ``Trainer(optimizers=...)`` (the masked run's masked optimizer)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**_common_args(size.dpo_steps, size.dpo_lr, size.dpo_batch, seed,
                                    directory),
                     beta=size.dpo_beta, loss_type=["sigmoid", "sft"])
    output = RunOutput(directory)
    reference = copy.deepcopy(model).eval()
    extra = {"optimizers": optimizers(model, args)} if optimizers else {}
    trainer = DPOTrainer(model=model, ref_model=reference, args=args,
                         train_dataset=Dataset.from_list(pairs), processing_class=tokenizer,
                         callbacks=[*callbacks, Bf16Checkpoints(output, size.save_every)],
                         **extra)
    _train(trainer)
    return output


def correctness_reward(prompts: list[str], completions: list[str], answer: list[str],
                       **kwargs: Any) -> list[float]:
    """1.0 for a completion that is exactly the answer, else 0.0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def run_grpo(model: Any, tokenizer: Any, size: StudySize, split: Split, seed: int,
             directory: Path) -> RunOutput:
    """GRPO with :func:`correctness_reward` over the train prompts (no KL term, as in
    DAPO-style recipes; ``grpo_generations`` completions per prompt at temperature 1)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": p.prompt, "answer": p.answer} for p in _shuffled(split.train, seed)]
    args = GRPOConfig(**_common_args(size.grpo_steps, size.grpo_lr, size.grpo_batch, seed,
                                     directory),
                      num_generations=size.grpo_generations, max_completion_length=4,
                      temperature=1.0, beta=0.0)
    output = RunOutput(directory)
    trainer = GRPOTrainer(model=model, reward_funcs=correctness_reward, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[Bf16Checkpoints(output, size.save_every)])
    _train(trainer)
    return output


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
