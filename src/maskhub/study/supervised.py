"""θ_pre and θ_sft: next-token pretraining on the noisy corpus, then SFT on the answer
format (loss on the answer only). Plain fp32 PyTorch loops, deterministic for a seed."""

from __future__ import annotations

import random
from typing import Any

import torch

from maskhub.study.sizes import StudySize
from maskhub.study.task import Split, corpus_ids, encode_answer_batch


def pretrain(model: Any, size: StudySize, seed: int) -> list[float]:
    """Train ``model`` on random ``seq_len`` windows of the corpus (AdamW, one-cycle
    schedule); return the loss of every step."""
    torch.manual_seed(seed)
    stream = corpus_ids(size.max_operand, n_sums=size.pretrain_steps * size.pretrain_batch * 4,
                        noise=0.05, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=size.pretrain_lr,
                                                   total_steps=size.pretrain_steps,
                                                   pct_start=0.1)
    losses = []
    model.train()
    for _ in range(size.pretrain_steps):
        starts = torch.randint(0, len(stream) - size.seq_len - 1, (size.pretrain_batch,))
        batch = torch.stack([stream[s:s + size.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def sft(model: Any, tokenizer: Any, size: StudySize, split: Split, seed: int) -> list[float]:
    """Supervised fine-tuning on the train problems' answers (AdamW, constant learning
    rate); return the loss of every step."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.sft_lr, weight_decay=0.0)
    losses = []
    model.train()
    problems = list(split.train)
    for _ in range(size.sft_steps):
        batch = encode_answer_batch(tokenizer, rng.sample(problems, size.sft_batch))
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
