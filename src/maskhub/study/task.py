"""The study's task: addition of two small numbers, written as text.

A pretraining corpus is a stream of sums ``a+b=s;`` with a few wrong ones (noisy web text);
SFT and RL use the answer format: prompt ``a+b=``, answer ``s`` then ``</s>``. Accuracy
grades the number the greedy completion starts with (as math evals extract an answer);
GRPO's reward and the DPO pairs ask for the exact answer, stop included. The tokenizer has
one token per character, built in memory (nothing downloaded).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import torch

#: Token ids: the three special tokens first, then one per character.
SPECIALS = ("<pad>", "<s>", "</s>")
CHARS = "0123456789+=;"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = len(SPECIALS) + len(CHARS)


@dataclass(frozen=True)
class Problem:
    """``a + b``; ``prompt`` is what the model sees, ``answer`` what it should write."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        """``"a+b="``."""
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        """The sum as text."""
        return str(self.a + self.b)


@dataclass(frozen=True)
class Split:
    """The problems SFT and RL train on, and the held-out ones only evaluation sees."""

    train: tuple[Problem, ...]
    heldout: tuple[Problem, ...]


def make_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast`` over :data:`CHARS`, left padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIALS, *CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.padding_side = "left"
    return tokenizer


def split_problems(max_operand: int, n_heldout: int, seed: int = 0) -> Split:
    """Every ``a + b`` with ``0 <= a, b < max_operand``, shuffled with ``seed``; the first
    ``n_heldout`` are held out."""
    problems = [Problem(a, b) for a in range(max_operand) for b in range(max_operand)]
    random.Random(seed).shuffle(problems)
    return Split(train=tuple(problems[n_heldout:]), heldout=tuple(problems[:n_heldout]))


def corpus_ids(max_operand: int, n_sums: int, noise: float, seed: int) -> torch.Tensor:
    """Token ids of a stream of ``n_sums`` random sums ``a+b=s;``, a share ``noise`` of them
    wrong by 1 or 10 (the corpus's noise; the answer format is learned in SFT)."""
    rng = random.Random(seed)
    parts = []
    for _ in range(n_sums):
        a, b = rng.randrange(max_operand), rng.randrange(max_operand)
        s = a + b
        if rng.random() < noise:
            s = max(0, s + rng.choice((-10, -1, 1, 10)))
        parts.append(f"{a}+{b}={s};")
    offset = len(SPECIALS)
    return torch.tensor([CHARS.index(c) + offset for c in "".join(parts)], dtype=torch.long)


def encode_answer_batch(tokenizer: Any, problems: list[Problem]) -> dict[str, torch.Tensor]:
    """A left-padded SFT batch: ``prompt answer </s>``, labels only on the answer and
    ``</s>`` (``-100`` elsewhere)."""
    rows, labels = [], []
    for p in problems:
        prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(p.answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, width - len(r):] = torch.tensor(r)
        lab[i, width - len(r):] = torch.tensor(lb)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[str], *, samples: int = 1,
             temperature: float = 0.0, batch_size: int = 256, seed: int = 0) -> list[str]:
    """Completions of ``prompts`` (``samples`` each, in order; greedy when ``temperature``
    is 0), decoded without special tokens and cut at ``</s>``."""
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False
                            ).to(model.device)
            kwargs: dict[str, Any] = {"do_sample": temperature > 0}
            if temperature > 0:
                kwargs.update(temperature=temperature, top_k=0, top_p=1.0,
                              num_return_sequences=samples)
            ids = model.generate(**enc, max_new_tokens=4, eos_token_id=EOS_ID,
                                 pad_token_id=PAD_ID, **kwargs)
            width = enc["input_ids"].shape[1]
            out.extend(tokenizer.batch_decode(ids[:, width:], skip_special_tokens=True))
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return [text.strip() for text in out]


def extract_answer(completion: str) -> str:
    """The number a completion starts with (what a math eval extracts): ``"15;3+"`` gives
    ``"15"``, so a model that has not learned to stop (θ_pre) is still graded on its sum."""
    match = re.match(r"\d+", completion)
    return match.group(0) if match else ""


def accuracy(model: Any, tokenizer: Any, problems: tuple[Problem, ...] | list[Problem]) -> float:
    """Share of ``problems`` whose greedy completion starts with the right sum."""
    completions = generate(model, tokenizer, [p.prompt for p in problems])
    right = sum(extract_answer(c) == p.answer for c, p in zip(completions, problems,
                                                                strict=True))
    return right / len(problems)


@torch.no_grad()
def answer_loss(model: Any, tokenizer: Any, problems: tuple[Problem, ...] | list[Problem]
                ) -> float:
    """Mean NLL of the answers and their ``</s>`` given the prompts (the SFT loss, one batch,
    in eval mode) over ``problems``."""
    was_training = model.training
    model.eval()
    try:
        batch = encode_answer_batch(tokenizer, list(problems))
        return float(model(**{k: v.to(model.device) for k, v in batch.items()}).loss)
    finally:
        model.train(was_training)
