"""Generate a bf16 Llama-shaped sharded checkpoint pair with planted updates.

The base has Llama-like names and shapes (TinyLlama-1.1B widths: hidden 2048, MLP 5632,
grouped k/v of 256 rows, vocab 32000) with as many layers as the requested size needs;
weights are N(0, 0.02), norms 1. The target moves a ``density`` fraction of the entries of
every matrix by 1-4 bf16 steps (realistic RL updates: tiny, so small-magnitude entries
exercise the exact path) and leaves the norms untouched, as in the paper.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HIDDEN, INTER, KV, VOCAB = 2048, 5632, 256, 32000
SHARD_BYTES = 512 << 20


def llama_shapes(size_bytes: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a bf16 Llama-like model of about ``size_bytes``."""
    per_layer = 2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    layers = max(1, round((size_bytes / 2 - fixed) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (KV, HIDDEN),
            p + "self_attn.v_proj.weight": (KV, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def _pair(shape: tuple[int, ...], norm: bool, density: float, rng: np.random.Generator,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if norm:
        t = torch.ones(shape, dtype=torch.bfloat16)
        return t, t.clone()
    base = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    bits = base.view(torch.int16).numpy().reshape(-1)
    n = bits.size
    k = rng.binomial(n, density)
    idx = rng.choice(n, size=k, replace=False) if k < n // 4 else np.flatnonzero(
        rng.random(n) < density)
    steps = rng.integers(1, 5, idx.size).astype(np.int16)
    steps[rng.random(idx.size) < 0.5] *= -1
    tbits = bits.copy()
    # Moving the magnitude's pattern by +-k moves the value by k steps of the format.
    mag = (bits[idx] & 0x7FFF).astype(np.int32) + steps
    tbits[idx] = (bits[idx] & np.int16(-0x8000)) | np.clip(mag, 1, 0x7F7F).astype(np.int16)
    target = torch.from_numpy(tbits.reshape(shape)).view(torch.bfloat16)
    return base, target


def make_pair(root: Path, size_bytes: int, density: float, seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/base`` and ``root/target`` (sharded safetensors with an index)."""
    shapes = llama_shapes(size_bytes)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    dirs = (root / "base", root / "target")
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    acc = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if acc and acc + nbytes > SHARD_BYTES:
            shards.append([])
            acc = 0
        shards[-1].append(name)
        acc += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        base, target = {}, {}
        for name in names:
            base[name], target[name] = _pair(shapes[name], "norm" in name, density, rng, gen)
            weight_map[name] = fname
        save_file(base, str(dirs[0] / fname))
        save_file(target, str(dirs[1] / fname))
    for d in dirs:
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dirs
