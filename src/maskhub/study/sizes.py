"""How big the study is: the model, the task and every run's steps and learning rate.

Two sizes: :data:`DEFAULT` (731,264 parameters, two seeds; about 7 CPU-minutes, one torch
thread, docs/study.md) and :data:`QUICK` (93,248, one seed; what CI runs). The RL learning
rates are the largest-sparsity ones that still measurably raise the task accuracy: in bf16
a weight moves only when its fp32 master crosses a rounding boundary, so at 1e-4 every RL
run updates ~90% of the weights and at 1e-6 the accuracy barely moves (measured in
docs/study.md). Plain sigmoid DPO lowered the
accuracy at every rate tried, hence DPO plus the chosen answers' NLL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class StudySize:
    """One size of the study (all runs' hyperparameters)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_operand: int
    n_heldout: int
    pretrain_steps: int
    pretrain_lr: float
    pretrain_batch: int
    seq_len: int
    sft_steps: int
    sft_lr: float
    sft_batch: int
    dpo_prompts: int
    dpo_steps: int
    dpo_lr: float
    dpo_batch: int
    dpo_beta: float
    grpo_steps: int
    grpo_lr: float
    grpo_batch: int
    grpo_generations: int
    #: Steps between two points of a trajectory run's live recording (and its last step).
    record_every: int
    #: Seeds of DPO, GRPO and the equal-budget control from θ_sft, unless ``--seeds`` says.
    seeds: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The size as a JSON-ready dict."""
        return asdict(self)


DEFAULT = StudySize(
    name="default", hidden=128, layers=4, heads=4, kv_heads=2, intermediate=344,
    max_operand=30, n_heldout=200,
    pretrain_steps=600, pretrain_lr=3e-3, pretrain_batch=32, seq_len=32,
    sft_steps=400, sft_lr=1e-3, sft_batch=32,
    dpo_prompts=256, dpo_steps=60, dpo_lr=2e-6, dpo_batch=16, dpo_beta=0.1,
    grpo_steps=80, grpo_lr=2e-6, grpo_batch=32, grpo_generations=8,
    record_every=10, seeds=2,
)

QUICK = StudySize(
    name="quick", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=172,
    max_operand=20, n_heldout=100,
    pretrain_steps=300, pretrain_lr=3e-3, pretrain_batch=32, seq_len=32,
    sft_steps=100, sft_lr=1e-3, sft_batch=32,
    dpo_prompts=128, dpo_steps=20, dpo_lr=5e-6, dpo_batch=16, dpo_beta=0.1,
    grpo_steps=20, grpo_lr=5e-6, grpo_batch=32, grpo_generations=8,
    record_every=5, seeds=1,
)

SIZES = {s.name: s for s in (DEFAULT, QUICK)}

#: The largest ``--steps`` accepted (a run of more RL steps is not a miniature any more).
MAX_STEPS = 100_000


def resolve_size(size: str = "default", *, lr: float | None = None, steps: int | None = None
                 ) -> StudySize:
    """The study size named ``size`` (``default`` or ``quick``), with ``lr`` (the RL learning
    rate: DPO, GRPO and the equal-budget SFT controls) and ``steps`` (the RL steps: DPO,
    GRPO and the controls) overriding the size's own. A bad value is a one-line
    :class:`~maskhub.errors.UsageError`."""
    import math

    from maskhub.errors import UsageError

    if size not in SIZES:
        raise UsageError(f"--size {size!r} is not a study size; choose one of "
                         f"{', '.join(SIZES)}")
    chosen = SIZES[size]
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) \
                or not 0 < lr < 1:
            raise UsageError(f"--lr must be a learning rate above 0 and below 1, not {lr!r}")
        chosen = replace(chosen, dpo_lr=float(lr), grpo_lr=float(lr))
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise UsageError(f"--steps must be a whole number of RL steps from 1 to "
                             f"{MAX_STEPS:,}, not {steps!r}")
        chosen = replace(chosen, dpo_steps=steps, grpo_steps=steps)
    return chosen
