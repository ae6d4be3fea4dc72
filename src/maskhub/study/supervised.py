"""θ_pre and θ_sft: next-token pretraining on the noisy corpus, then SFT on the answer
format (loss on the answer only). Plain fp32 PyTorch loops, deterministic for a seed."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import torch

from maskhub.study.model import study_device
from maskhub.study.sizes import StudySize
from maskhub.study.task import Split, corpus_ids, encode_answer_batch

#: Progress lines per long loop (pretraining, SFT).
PROGRESS_LINES = 5


def _progress(say: Callable[[str], None] | None, what: str, step: int, steps: int,
              losses: list[float], t0: float) -> None:
    """One progress line every ``steps / PROGRESS_LINES`` steps (the loss: mean of the last
    ten steps)."""
    every = max(1, steps // PROGRESS_LINES)
    if say is not None and step and step % every == 0 and losses:
        recent = losses[-10:]
        say(f"  {what} step {step}/{steps}, loss {sum(recent) / len(recent):.4f} "
            f"({time.perf_counter() - t0:.0f} s)")


def pretrain(model: Any, size: StudySize, seed: int,
             say: Callable[[str], None] | None = None) -> list[float]:
    """Train ``model`` on random ``seq_len`` windows of the corpus (AdamW, one-cycle
    schedule); return the loss of every step. ``say``: progress lines."""
    torch.manual_seed(seed)
    stream = corpus_ids(size.max_operand, n_sums=size.pretrain_steps * size.pretrain_batch * 4,
                        noise=0.05, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=size.pretrain_lr,
                                                   total_steps=size.pretrain_steps,
                                                   pct_start=0.1)
    losses: list[float] = []
    device = study_device()
    model.to(device).train()
    t0 = time.perf_counter()
    for step in range(size.pretrain_steps):
        _progress(say, "pretraining", step, size.pretrain_steps, losses, t0)
        starts = torch.randint(0, len(stream) - size.seq_len - 1, (size.pretrain_batch,))
        batch = torch.stack([stream[s:s + size.seq_len] for s in starts.tolist()]).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def sft(model: Any, tokenizer: Any, size: StudySize, split: Split, seed: int, *,
        steps: int | None = None, lr: float | None = None, batch: int | None = None,
        say: Callable[[str], None] | None = None) -> list[float]:
    """Supervised fine-tuning on the train problems' answers (AdamW, constant learning
    rate); return the loss of every step. ``steps``/``lr``/``batch``: override the size's
    SFT ones (the equal-budget controls train at the DPO runs'). ``say``: progress lines."""
    steps = size.sft_steps if steps is None else steps
    lr = size.sft_lr if lr is None else lr
    batch_size = size.sft_batch if batch is None else batch
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    device = study_device()
    model.to(device).train()
    problems = list(split.train)
    t0 = time.perf_counter()
    for step in range(steps):
        _progress(say, "SFT", step, steps, losses, t0)
        batch = {k: v.to(device) for k, v in
                 encode_answer_batch(tokenizer, rng.sample(problems, batch_size)).items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
