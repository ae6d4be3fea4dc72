"""How big the study is: the model, the task and every run's steps and learning rate.

Two sizes: :data:`DEFAULT` (731,264 parameters; ~4 minutes on 2 CPU cores) and
:data:`QUICK` (93,248; what CI runs). The RL learning rates are the largest-sparsity ones
that still measurably raise the task accuracy: in bf16 a weight moves only when its fp32
master crosses a rounding boundary, so at 1e-4 every RL run updates ~90% of the weights and
at 1e-6 the accuracy barely moves (measured in docs/study.md). Plain sigmoid DPO lowered the
accuracy at every rate tried, hence DPO plus the chosen answers' NLL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    record_every=10,
)

QUICK = StudySize(
    name="quick", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=172,
    max_operand=20, n_heldout=100,
    pretrain_steps=300, pretrain_lr=3e-3, pretrain_batch=32, seq_len=32,
    sft_steps=100, sft_lr=1e-3, sft_batch=32,
    dpo_prompts=128, dpo_steps=20, dpo_lr=5e-6, dpo_batch=16, dpo_beta=0.1,
    grpo_steps=20, grpo_lr=5e-6, grpo_batch=32, grpo_generations=8,
    record_every=5,
)

SIZES = {s.name: s for s in (DEFAULT, QUICK)}
