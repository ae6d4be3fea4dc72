"""The PEFT bridge (maskhub.integrations.peft) with real ``peft``: a mask's subnetwork as a
SHiRA adapter with the mask's own per-layer counts, trained like ``apply_mask``, saved,
reloaded onto a fresh base model, and turned back into the same mask.

The model is a tiny ``transformers`` LlamaForCausalLM built from a config (no download);
the mask is registered with ``Registry.add`` so that it has an id and a name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest_plugins = ["hub_fixture"]
transformers = pytest.importorskip("transformers")

from peft.tuners.shira.layer import ShiraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402

from maskhub import Registry  # noqa: E402
from maskhub.errors import MaskMismatchError, UsageError  # noqa: E402
from maskhub.integrations.peft import (  # noqa: E402
    adapter_mask_info,
    load_shira_adapter,
    mask_from_adapter,
    shira_adapter,
)
from maskhub.torch import apply_mask  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEPS = 5
LR = 1e-2
#: Per-layer densities: no layer's count is r * (m + n) for a shared r, one layer is empty.
DENSITY = {"q_proj": 0.2, "k_proj": 0.05, "v_proj": 0.3, "o_proj": 0.1, "gate_proj": 0.15,
           "up_proj": 0.25, "down_proj": 0.12, "lm_head": 0.08}
EMPTY = "model.layers.1.self_attn.k_proj.weight"


def tiny_llama(hidden: int = 32) -> nn.Module:
    """The same initial weights every time."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float()


def llama_mask(model: nn.Module, seed: int = 1) -> dict[str, np.ndarray]:
    """Random entries of every Linear weight (per-layer densities), all False elsewhere."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, param in model.named_parameters():
        kind = name.split(".")[-2]
        density = 0.0 if name == EMPTY else DENSITY.get(kind, 0.0)
        out[name] = rng.random(tuple(param.shape)) < density
    return out


def batches(n: int = STEPS, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 12), generator=g) for _ in range(n)]


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def train(model: nn.Module, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(params, lr=LR)
    for ids in batches():
        opt.zero_grad(set_to_none=True)
        loss_of(model, ids).backward()
        opt.step()
    return opt


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def shira_layers(peft_model: nn.Module) -> dict[str, ShiraLayer]:
    base = peft_model.get_base_model()
    return {n: m for n, m in base.named_modules() if isinstance(m, ShiraLayer)}


def effective_weights(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Base parameter name -> the weight the forward uses (base + SHiRA delta)."""
    out = {}
    layers = shira_layers(peft_model)
    for name, param in peft_model.get_base_model().named_parameters():
        if ".shira_weight." in name:
            continue
        key = name.replace(".base_layer.", ".")
        value = param.detach().clone()
        module = key.rsplit(".", 1)[0]
        if module in layers and key.endswith(".weight"):
            value += layers[module].get_delta_weight("default").to_dense().detach()
        out[key] = value
    return out


@pytest.fixture
def registered() -> tuple[object, dict[str, np.ndarray]]:
    """(the registered Mask, its bits)."""
    bits = llama_mask(tiny_llama())
    mask = Registry().add(bits, name="tiny-rl", base_model="maskhub-test/tiny-llama")
    return mask, bits


def test_adapter_holds_exactly_the_masks_entries(registered) -> None:
    """(a) Per layer, the adapter trains exactly the mask's count of entries (not r(m+n));
    an all-False layer gets no adapter; after Adam steps the merged delta is nonzero only
    inside the mask, and nothing outside the adapter moved."""
    mask, bits = registered
    model = tiny_llama()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = shira_adapter(model, mask)
    layers = shira_layers(peft_model)
    expected = {n[: -len(".weight")] for n, b in bits.items() if b.any()}
    assert set(layers) == expected
    assert EMPTY[: -len(".weight")] not in layers
    for name, layer in layers.items():
        count = int(bits[name + ".weight"].sum())
        assert layer.shira_weight["default"].numel() == count
        assert count != layer.in_features + layer.out_features
        assert layer.shira_indices["default"].shape == (2, count)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == mask.n_updated == sum(
        int(b.sum()) for b in bits.values())
    train(peft_model, trainable)
    after = effective_weights(peft_model)
    moved = 0
    for name, before in theta0.items():
        changed = (after[name] != before).numpy()
        assert not (changed & ~bits[name]).any(), name
        moved += int(changed.sum())
    assert moved > 0.99 * mask.n_updated
    for name, param in peft_model.get_base_model().named_parameters():
        if ".shira_weight." not in name:
            assert torch.equal(param, theta0[name.replace(".base_layer.", ".")]), name


def test_training_matches_apply_mask_with_less_optimizer_state(registered) -> None:
    """(b) Five Adam steps through the adapter land where five Adam steps on the dense model
    under apply_mask land (float rounding apart: the adapter keeps W0 + delta, the dense run
    updates W in place), with optimizer state for the subnetwork only."""
    mask, bits = registered
    dense = tiny_llama()
    with apply_mask(dense, mask):
        dense_opt = train(dense, list(dense.parameters()))
    peft_model = shira_adapter(tiny_llama(), mask)
    peft_opt = train(peft_model, [p for p in peft_model.parameters() if p.requires_grad])
    after = effective_weights(peft_model)
    diff = max(float((after[n] - p.detach()).abs().max()) for n, p in dense.named_parameters())
    moved = max(float((after[n] - p.detach()).abs().max())
                for n, p in tiny_llama().named_parameters())
    print(f"max |adapter - apply_mask| = {diff:.3g} after {STEPS} steps "
          f"(largest move {moved:.3g})")
    assert moved > 1e-2
    assert diff < 1e-6
    ids = batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.allclose(loss_of(peft_model, ids), loss_of(dense, ids), atol=1e-6)
    ratio = state_bytes(peft_opt) / state_bytes(dense_opt)
    print(f"Adam state: adapter {state_bytes(peft_opt)} B, dense {state_bytes(dense_opt)} B, "
          f"ratio {ratio:.4f} (mask density {mask.density:.4f})")
    assert state_bytes(peft_opt) == 2 * 4 * mask.n_updated
    assert ratio == pytest.approx(mask.density)


def test_save_reload_onto_a_fresh_base_model(registered, tmp_path: Path) -> None:
    """(c) save_pretrained -> a fresh base model -> load_shira_adapter: the same outputs
    bit for bit, the same shira weights and indices, and the config names the mask."""
    mask, _ = registered
    peft_model = shira_adapter(tiny_llama(), mask)
    train(peft_model, [p for p in peft_model.parameters() if p.requires_grad])
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SHIRA"
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())  # the sparse delta only, not a copy of lm_head's base weight
    assert keys == {f"base_model.model.{n}.shira_{t}" for n in shira_layers(peft_model)
                    for t in ("weight", "indices")}
    assert adapter_mask_info(tmp_path / "adapter") == {"id": mask.id, "name": "tiny-rl"}
    assert adapter_mask_info(peft_model) == {"id": mask.id, "name": "tiny-rl"}

    reloaded = load_shira_adapter(tiny_llama(), tmp_path / "adapter")
    assert not reloaded.training
    assert not any(p.requires_grad for p in reloaded.parameters())
    ids = batches(1, seed=7)[0]
    peft_model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, peft_model(input_ids=ids).logits)
    old, new = shira_layers(peft_model), shira_layers(reloaded)
    assert set(old) == set(new)
    for name in old:
        assert torch.equal(old[name].shira_weight["default"], new[name].shira_weight["default"])
        assert torch.equal(old[name].shira_indices["default"],
                           new[name].shira_indices["default"])
    resumed = load_shira_adapter(tiny_llama(), tmp_path / "adapter", is_trainable=True)
    assert sum(p.numel() for p in resumed.parameters() if p.requires_grad) == mask.n_updated


def test_mask_from_adapter_gives_back_the_mask(registered, tmp_path: Path) -> None:
    """(d) The adapter's mask is the original, bit for bit (all tensors, in order), from the
    PeftModel and from the saved directory, and registers with Registry.add."""
    mask, bits = registered
    peft_model = shira_adapter(tiny_llama(), mask)
    whole = mask_from_adapter(peft_model, all_tensors=True)
    assert list(whole) == list(bits)
    for name in bits:
        assert whole[name].dtype == bool and np.array_equal(whole[name], bits[name]), name
    adapted = mask_from_adapter(peft_model)
    assert list(adapted) == [n for n, b in bits.items() if b.any()]
    peft_model.save_pretrained(tmp_path / "adapter")
    from_file = mask_from_adapter(tmp_path / "adapter", model=tiny_llama())
    assert list(from_file) == list(adapted)
    assert all(np.array_equal(from_file[n], adapted[n]) for n in adapted)

    again = Registry().add(whole, name="from-adapter", base_model="maskhub-test/tiny-llama")
    assert again.n_updated == mask.n_updated and again.n_params == mask.n_params
    for name in bits:
        assert np.array_equal(again[name], bits[name]), name


class Toy(nn.Module):
    """An embedding, a norm, a biased Linear and a one-output head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.norm(self.embed(ids))))


def toy_mask(**true: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: (rng.random(tuple(p.shape)) < 0.5) if true.get(n.replace(".", "_"))
            else np.zeros(tuple(p.shape), bool) for n, p in Toy().named_parameters()}


def test_what_shira_cannot_hold_is_named_once() -> None:
    """Masked entries of an embedding, a norm, a bias and a one-output Linear stay frozen:
    one warning names them; strict=True makes it a one-line UsageError."""
    bits = toy_mask(embed_weight=True, norm_weight=True, proj_bias=True, proj_weight=True,
                    head_weight=True)
    with pytest.warns(UserWarning, match=r"4 masked tensor\(s\) are not nn.Linear") as caught:
        peft_model = shira_adapter(Toy(), bits)
    text = str(caught[0].message)
    assert "\n" not in text
    for name in ("embed.weight (Embedding.weight)", "norm.weight (LayerNorm.weight)",
                 "proj.bias (Linear.bias)", "head.weight (1x8)"):
        assert name in text
    assert set(shira_layers(peft_model)) == {"proj"}
    with pytest.raises(UsageError, match="are not nn.Linear") as exc:
        shira_adapter(Toy(), bits, strict=True)
    assert "\n" not in str(exc.value)
    with pytest.raises(UsageError, match="nothing for a SHiRA adapter to train"):
        shira_adapter(Toy(), toy_mask(embed_weight=True), strict=False)


def test_a_mask_for_another_model_is_one_line() -> None:
    """(e) Shapes of another model, names of another model, an adapter of another model:
    one-line errors, nothing half-built."""
    other = llama_mask(tiny_llama(hidden=16))
    # issue 26: a mask of another model says so, whatever extra= says
    with pytest.raises(MaskMismatchError, match="is a mask of another model: only 0 of") as exc:
        shira_adapter(tiny_llama(), other)
    assert "\n" not in str(exc.value)
    renamed = {"transformer.h.0.attn.c_attn.weight": np.ones((96, 32), bool)}
    for extra in ("error", "ignore"):
        with pytest.raises(MaskMismatchError, match="is a mask of another model: only 0 of "
                           "the 1 tensors of the mask are in the model") as exc:
            shira_adapter(tiny_llama(), renamed, extra=extra)
        assert "\n" not in str(exc.value)


def test_reload_checks_the_base_model(tmp_path: Path) -> None:
    """An adapter reloaded onto a smaller model, a path with no adapter, or
    mask_from_adapter(path) without the base model: one-line errors."""
    model = tiny_llama()
    peft_model = shira_adapter(model, llama_mask(model))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(MaskMismatchError, match="does not fit the model") as exc:
        load_shira_adapter(tiny_llama(hidden=16), tmp_path / "adapter")
    assert "\n" not in str(exc.value)
    with pytest.raises(UsageError, match="no adapter_config.json"):
        load_shira_adapter(tiny_llama(), tmp_path)
    with pytest.raises(UsageError, match="needs model="):
        mask_from_adapter(tmp_path / "adapter")
    assert adapter_mask_info(tmp_path / "adapter") == {"name": "in-memory"}


def test_without_peft_the_import_says_which_extra() -> None:
    code = ("import sys; sys.modules['peft'] = None\n"
            "try:\n    import maskhub.integrations.peft\n"
            "except ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert "pip install 'maskhub[peft]'" in out.stdout, out.stderr


def test_a_pushed_mask_is_recorded_with_its_hub_repo(registered, hub_server,
                                                     tmp_path: Path) -> None:
    """A mask published on the Hub: the adapter config names its repo and commit too, and
    they survive save_pretrained."""
    mask, _ = registered
    mask.push_to_hub("maskhub-test/tiny-rl-mask")
    _, rows = Registry().sql("SELECT hub_repo, hub_revision FROM masks WHERE name = 'tiny-rl'")
    assert rows[0][0] == "maskhub-test/tiny-rl-mask" and len(rows[0][1]) == 40
    peft_model = shira_adapter(tiny_llama(), Registry().get("tiny-rl"))
    expected = {"id": mask.id, "name": "tiny-rl", "hub_repo": rows[0][0],
                "hub_revision": rows[0][1]}
    assert adapter_mask_info(peft_model) == expected
    peft_model.save_pretrained(tmp_path / "adapter")
    assert adapter_mask_info(tmp_path / "adapter") == expected
