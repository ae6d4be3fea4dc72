"""Build safetensors checkpoints with planted updates for the tests.

``make_pair`` writes a base and a target checkpoint whose differences are known exactly, so
tests can check every stored bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def llama_shapes(layers: int = 2, hidden: int = 16, inter: int = 24, vocab: int = 32
                 ) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a tiny Llama-like model."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights (norms set to one, as at init)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if "norm" in name:
            out[name] = torch.ones(shape, dtype=dtype)
        else:
            out[name] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    return out


def plant_updates(state: dict[str, torch.Tensor], density: float, seed: int = 1,
                  skip_norms: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """Copy of ``state`` with a random ``density`` of entries changed by a large step.

    Returns the target state and the exact boolean masks of the changed entries.
    """
    g = torch.Generator().manual_seed(seed)
    target, masks = {}, {}
    for name, t in state.items():
        m = torch.rand(t.shape, generator=g) < density
        if skip_norms and "norm" in name:
            m = torch.zeros_like(m)
        delta = torch.where(m, torch.full(t.shape, 0.25), torch.zeros(t.shape))
        target[name] = (t.to(torch.float64) + delta).to(t.dtype)
        masks[name] = m.numpy()
    return target, masks


def save(state: dict[str, torch.Tensor], path: Path, shards: int = 1) -> Path:
    """Save a state dict: one ``model.safetensors`` file or ``shards`` files with an index."""
    path.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
        return path
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * per:(i + 1) * per]
        save_file({k: state[k].contiguous() for k in part}, str(path / fname))
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def make_pair(root: Path, density: float = 0.1, dtype: torch.dtype = torch.bfloat16,
              shards: int = 1, seed: int = 0) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Write ``root/base`` and ``root/target`` with planted updates; return paths and masks."""
    base = random_state(llama_shapes(), dtype, seed)
    target, masks = plant_updates(base, density, seed + 1)
    return save(base, root / "base", shards), save(target, root / "target", shards), masks


def tiny_hf_llama(seed: int = 0) -> torch.nn.Module:
    """A real ``transformers`` ``LlamaForCausalLM`` small enough for a test (vocab 61)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def assert_moved_only_inside(model: torch.nn.Module, masks: dict, theta0: dict,
                             share: float = 0.9) -> int:
    """Every entry outside ``masks`` (``{name: bool array or tensor}``) kept its bits, and
    more than ``share`` of the entries inside moved from ``theta0``; returns how many moved."""
    moved = 0
    for n, p in model.named_parameters():
        inside = torch.as_tensor(masks[n], dtype=torch.bool)
        now, then = p.detach(), theta0[n]
        assert torch.equal(now[~inside].view(torch.uint8), then[~inside].view(torch.uint8)), n
        moved += int((now[inside] != then[inside]).sum())
    assert moved > share * sum(int(m.sum()) for m in masks.values())
    return moved
