"""``maskhub export MASK DIR --peft``: a mask as a SHiRA adapter that plain PEFT loads
(``PeftModel.from_pretrained``) in a process that never imports maskhub.

A tiny ``transformers`` Llama is built in the test and saved as the base; the target is the
base plus planted deltas at random entries of every Linear weight (per-layer densities that
no single ``r * (m + n)`` matches), one norm entry and a few embedding entries; ``maskhub
diff`` makes the mask. The subprocess loads the exported adapter with PEFT alone, checks
that the trainable positions are exactly the mask's, per layer and in count, then plants
the deltas into the adapter, merges, and gets the target's weights bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from clitools import fail_line, ok, run_json  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

DENSITY = {"q_proj": 0.2, "k_proj": 0.05, "v_proj": 0.3, "o_proj": 0.1, "gate_proj": 0.15,
           "up_proj": 0.25, "down_proj": 0.12, "lm_head": 0.08}

PLAIN_PEFT = r'''
import json, sys
import torch
from peft import PeftModel
from peft.tuners.shira.layer import ShiraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

base_dir, target_file, adapter_dir = sys.argv[1:4]
base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
before = {k: v.clone() for k, v in base.state_dict().items()}
target = load_file(target_file)
model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
layers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, ShiraLayer)}
out = {"layers": {}, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
       "trainable_names": sorted(n for n, p in model.named_parameters() if p.requires_grad)}
with torch.no_grad():
    for name, layer in layers.items():
        idx = layer.shira_indices["default"].long()
        flat = idx[0] * layer.in_features + idx[1]
        uniq, first = [], {}
        for j, f in enumerate(flat.tolist()):
            first.setdefault(f, j)
        delta = (target[name + ".weight"] - before[name + ".weight"]).reshape(-1)
        planted = torch.zeros_like(layer.shira_weight["default"])
        pos = torch.tensor(sorted(first.values()))
        planted[pos] = delta[flat[pos]]
        layer.shira_weight["default"].copy_(planted)
        out["layers"][name] = {"positions": sorted(first), "slots": int(flat.numel())}
merged = model.merge_and_unload().state_dict()
out["equal"] = sorted(k for k in merged if k + "" in target and torch.equal(merged[k], target[k]))
out["maskhub_imported"] = any(m == "maskhub" or m.startswith("maskhub.") for m in sys.modules)
print(json.dumps(out))
'''


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float()


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(base dir, target file, the planted mask per Linear weight)."""
    model = tiny_llama()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    state = load_file(str(base_dir / "model.safetensors"))
    rng = np.random.default_rng(7)
    target, mask = {}, {}
    for name, value in state.items():
        kind = name.split(".")[-2]
        density = DENSITY.get(kind, 0.0)
        if name == "model.norm.weight":
            bits = np.zeros(value.shape, dtype=bool)
            bits[3] = True
        elif name == "model.embed_tokens.weight":
            bits = np.zeros(value.shape, dtype=bool)
            bits[5, :4] = True
        else:
            bits = rng.random(tuple(value.shape)) < density
        sign = np.where(rng.random(value.shape) < 0.5, -1.0, 1.0)
        delta = torch.from_numpy((sign * rng.uniform(0.01, 0.1, value.shape) * bits)
                                 .astype(np.float32))
        target[name] = value + delta
        if density:
            mask[name] = bits
    target_dir = tmp_path / "target"
    target_dir.mkdir()
    save_file(target, str(target_dir / "model.safetensors"))
    return base_dir, target_dir / "model.safetensors", mask


def test_plain_peft_loads_the_exported_mask(pair, tmp_path: Path) -> None:
    base_dir, target_file, mask = pair
    run_json("diff", str(base_dir / "model.safetensors"), str(target_file), "--name", "tiny-rl")
    out = run_json("export", "tiny-rl", str(tmp_path / "adapter"), "--peft")
    shapes = {n: b.shape for n, b in mask.items()}
    counts = {n: int(b.sum()) for n, b in mask.items()}
    r = max(-(-counts[n] // sum(shapes[n])) for n in mask)
    assert out["r"] == r
    assert out["n_adapted"] == sum(counts.values())
    assert out["left_out"] == {"model.embed_tokens.weight": {"entries": 4,
                                                             "why": "excluded (an embedding?)"},
                               "model.norm.weight": {"entries": 1, "why": "not a 2-D weight"}}
    assert out["n_left_out"] == 5
    assert {n + ".weight" for n in out["layers"]} == set(mask)
    for n, layer in out["layers"].items():
        k, slots = counts[n + ".weight"], r * sum(shapes[n + ".weight"])
        assert layer == {"entries": k, "slots": slots, "max_copies": -(-slots // k)}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["r"] == r
    assert config["mask_type"].startswith('maskhub:{"id":')

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(base_dir), str(target_file),
                           str(tmp_path / "adapter")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["maskhub_imported"] is False
    # exactly the mask's positions, per layer; PEFT's slots r*(m+n) are all trainable
    assert set(got["layers"]) == {n[: -len(".weight")] for n in mask}
    for name, layer in got["layers"].items():
        bits = mask[name + ".weight"]
        assert layer["positions"] == np.flatnonzero(bits).tolist()
        assert layer["slots"] == r * sum(bits.shape)
    assert got["trainable"] == sum(r * sum(shapes[n]) for n in mask)
    assert all(".shira_weight" in n for n in got["trainable_names"])
    # merged with the planted deltas: every adapted weight equals the target's bit for bit
    assert set(mask) <= set(got["equal"])
    # maskhub's own reader agrees: the same mask back, and the mask's identity
    from maskhub import Registry
    from maskhub.integrations.peft import adapter_mask_info, load_shira_adapter, mask_from_adapter

    back = mask_from_adapter(tmp_path / "adapter", model=tiny_llama())
    assert set(back) == set(mask) and all(np.array_equal(back[n], mask[n]) for n in mask)
    loaded = mask_from_adapter(load_shira_adapter(tiny_llama(), tmp_path / "adapter"))
    assert set(loaded) == set(mask) and all(np.array_equal(loaded[n], mask[n]) for n in mask)
    assert adapter_mask_info(tmp_path / "adapter") == {"id": Registry().get("tiny-rl").id,
                                                       "name": "tiny-rl"}


def test_export_peft_errors(pair, tmp_path: Path) -> None:
    base_dir, target_file, _ = pair
    run_json("diff", str(base_dir / "model.safetensors"), str(target_file), "--name", "tiny-rl")
    assert fail_line("export", "tiny-rl", str(tmp_path / "a"), "--exclude", "x") == (
        "Error: --exclude goes with --peft, and --peft not with --packed")
    assert fail_line("export", "tiny-rl", str(tmp_path / "a"), "--peft", "--exclude", "(") \
        .startswith("Error: --exclude is not a valid regular expression: ")
    text = ok("export", "tiny-rl", str(tmp_path / "a"), "--peft", "--exclude", r"mlp\.")
    assert text.splitlines()[0].startswith(f"wrote {tmp_path / 'a'}/ (")
    assert "model.layers.0.mlp.down_proj.weight" in text.splitlines()[1]
    assert fail_line("export", "tiny-rl", str(tmp_path / "a"), "--peft") == (
        f"Error: {tmp_path / 'a'} already holds an adapter: remove it or pick another "
        "directory")
    # a full 3x64 layer: r = ceil(192 / 67) = 3 gives 201 slots, more than the layer holds
    from maskhub import Registry

    Registry().add({"x.weight": np.ones((3, 64), dtype=bool),
                    "y.weight": np.eye(8, dtype=bool)}, name="full",
                   base_model="maskhub-test/full")
    assert fail_line("export", "full", str(tmp_path / "b"), "--peft") == (
        "Error: PEFT's SHiRA gives every layer r*(m+n) entries with one r; this mask needs "
        "r=3, more entries than 1 layer(s) hold: x.weight (3x64 < 3*67) (leave them out "
        "with --exclude REGEX)")
    assert not (tmp_path / "b").exists()
