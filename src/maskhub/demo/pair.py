"""The embedded default job: a realistic small checkpoint pair, made offline.

A tiny Llama-shaped model is trained from a fixed init (the "SFT" base), then fine-tuned a
few more steps at a small learning rate (the "RL" target), both saved in bf16 as sharded
safetensors. As in the paper, many fp32 updates are smaller than one bf16 step, so the
target checkpoint differs from the base in only part of its parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors
import torch
from safetensors.torch import save_file

from maskhub.demo.tinymodel import TinyConfig, TinyLlama, synthetic_batches, train
from maskhub.errors import UsageError


def save_checkpoint(model: torch.nn.Module, directory: Path, dtype: torch.dtype = torch.bfloat16,
                    shards: int = 2) -> Path:
    """Save a model's parameters as sharded safetensors with a Hugging Face index.

    A directory that cannot be written is a :class:`~maskhub.errors.UsageError`."""
    try:
        return _save(model, directory, dtype, shards)
    except (OSError, safetensors.SafetensorError) as exc:
        text = str(exc).strip().splitlines()
        raise UsageError(f"cannot write the demo checkpoints to {directory}: "
                         f"{text[0] if text else type(exc).__name__}") from None


def _save(model: torch.nn.Module, directory: Path, dtype: torch.dtype, shards: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(directory / fname))
        weight_map.update({k: fname for k in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return directory


def make_demo_pair(directory: Path, sft_steps: int = 40, rl_steps: int = 12,
                   rl_lr: float = 2e-5) -> tuple[Path, Path, list[float]]:
    """Train and save ``base`` and ``target`` checkpoints under ``directory``.

    Returns the two checkpoint directories and the fine-tuning losses.
    """
    cfg = TinyConfig()
    torch.manual_seed(0)
    model = TinyLlama(cfg)
    train(model, synthetic_batches(cfg, sft_steps, seed=1), lr=3e-3, seed=1)
    base = save_checkpoint(model, directory / "base")
    losses = train(model, synthetic_batches(cfg, rl_steps, seed=2), lr=rl_lr,
                   weight_decay=0.0, seed=2)
    target = save_checkpoint(model, directory / "target")
    return base, target, losses
