"""Masked training (maskhub.torch.apply_mask): gradient masking, exact freeze, name matching,
DDP and FSDP2 on two CPU processes, the transformers callback, and Conjecture 1 (small).

Masks come from real diffs: a tiny Llama-named model's state gets updates planted at known
entries (tests/factory.py), both sides are saved as safetensors and diffed into the registry.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factory import assert_moved_only_inside, plant_updates, save, tiny_hf_llama
from torch import nn

from maskhub import Registry
from maskhub.demo.tinymodel import TinyConfig, TinyLlama, synthetic_batches
from maskhub.errors import MaskMismatchError, UsageError
from maskhub.torch import apply_mask
from maskhub.training import masking as training

ROOT = Path(__file__).resolve().parent.parent
# vocab 61: embeddings and lm_head shard unevenly over two FSDP2 ranks (31 + 30 rows).
CFG = TinyConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                 num_heads=4, max_len=24)
DENSITY = 0.3


def tiny_model() -> TinyLlama:
    """The same initial weights every time."""
    torch.manual_seed(0)
    return TinyLlama(CFG)


def lm_loss(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss through ``module(ids)`` (works for wrapped modules too)."""
    logits = module(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def batches(n: int = 4, seed: int = 3) -> list[torch.Tensor]:
    return synthetic_batches(CFG, n, batch=4, seq=16, seed=seed)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit identity of two fp32 tensors."""
    return a.view(torch.int32) == b.view(torch.int32)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    """A mask registered in a registry of its own whose bits are known:
    (mask, {name: bool tensor}). Built once for the module."""
    root = tmp_path_factory.mktemp("planted")
    state = {k: v.detach().clone() for k, v in tiny_model().state_dict().items()}
    target, masks = plant_updates(state, DENSITY, seed=1)
    base_dir = save(state, root / "base")
    target_dir = save(target, root / "target")
    mask = Registry(root / "home").diff(base_dir, target_dir, name="planted")
    for name, bits in masks.items():
        assert np.array_equal(mask[name], bits)
    return mask, {k: torch.from_numpy(v) for k, v in masks.items()}


def train_steps(model: nn.Module, make_opt, steps: int = 4) -> None:
    opt = make_opt(model.parameters())
    for ids in batches(steps):
        opt.zero_grad(set_to_none=True)
        lm_loss(model, ids).backward()
        opt.step()


def reference_run(masks: dict[str, torch.Tensor], make_opt, steps: int = 4
                  ) -> dict[str, torch.Tensor]:
    """The definition, written out by hand: grad *= m before each step, frozen entries set
    back to θ0 after it."""
    model = tiny_model()
    theta0 = snapshot(model)
    opt = make_opt(model.parameters())
    for ids in batches(steps):
        opt.zero_grad(set_to_none=True)
        lm_loss(model, ids).backward()
        for n, p in model.named_parameters():
            p.grad.mul_(masks[n])
        opt.step()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p[~masks[n]] = theta0[n][~masks[n]]
    return snapshot(model)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


# -- gradient masking and exact freeze ------------------------------------------------------


@pytest.mark.parametrize("path", ["numpy", "device-kernels"])
def test_exact_freeze_adamw_weight_decay_matches_definition(planted, monkeypatch, path):
    """Masked-out entries stay bit-identical through AdamW steps with weight decay, masked-in
    entries move, and the result equals the hand-written definition bit for bit. Small chunks
    exercise the per-chunk offsets; ``device-kernels`` runs the torch code used on GPUs."""
    mask, masks = planted
    monkeypatch.setattr(training, "CPU_CHUNK", 256)
    if path == "device-kernels":
        monkeypatch.setattr(training, "_use_numpy", lambda device: False)
    model = tiny_model()
    theta0 = snapshot(model)
    handle = apply_mask(model, mask)
    assert handle.n_params == sum(p.numel() for p in model.parameters())
    assert handle.n_trainable == mask.n_updated == sum(int(m.sum()) for m in masks.values())
    train_steps(model, adamw)
    expected = reference_run(masks, adamw)
    moved_in = 0
    for n, p in model.named_parameters():
        m = masks[n]
        assert same_bits(p.detach()[~m], theta0[n][~m]).all(), n
        assert same_bits(p.detach(), expected[n]).all(), n
        moved_in += int((p.detach()[m] != theta0[n][m]).sum())
    # weight decay moves every non-zero trainable entry
    assert moved_in >= sum(int((theta0[n][m] != 0).sum()) for n, m in masks.items())
    assert handle.drift() == {}
    handle.remove()


def test_gradient_is_masked_before_the_step(planted):
    mask, masks = planted
    plain, masked = tiny_model(), tiny_model()
    ids = batches(1)[0]
    lm_loss(plain, ids).backward()
    with apply_mask(masked, mask, exact=False):
        lm_loss(masked, ids).backward()
    grads = dict(plain.named_parameters())
    for n, p in masked.named_parameters():
        assert torch.equal(p.grad, grads[n].grad * masks[n]), n


def test_without_exact_weight_decay_moves_frozen_entries(planted):
    """Why exact mode exists: with gradient masking only, AdamW's decoupled weight decay
    moves every non-zero frozen entry."""
    mask, masks = planted
    model = tiny_model()
    theta0 = snapshot(model)
    handle = apply_mask(model, mask, exact=False)
    assert handle.memory()["snapshot"] == 0
    train_steps(model, adamw, steps=2)
    moved = sum(int((~same_bits(p.detach(), theta0[n]))[~masks[n]].sum())
                for n, p in model.named_parameters())
    assert moved == sum(int((theta0[n][~m] != 0).sum()) for n, m in masks.items())
    with pytest.raises(UsageError):
        handle.drift()


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, foreach=False),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, weight_decay=0.1),
], ids=["sgd-nesterov", "adam-l2", "adamw-fused", "rmsprop"])
def test_exact_freeze_any_optimizer(planted, make_opt):
    mask, masks = planted
    model = tiny_model()
    theta0 = snapshot(model)
    with apply_mask(model, mask):
        train_steps(model, make_opt, steps=3)
    for n, p in model.named_parameters():
        assert same_bits(p.detach()[~masks[n]], theta0[n][~masks[n]]).all(), n
        assert (p.detach()[masks[n]] != theta0[n][masks[n]]).any() or "norm" in n, n


def test_exact_freeze_muon_which_mixes_entries(planted):
    """Muon orthogonalises the whole update matrix, so zero gradients do not keep frozen
    entries still; the restore does."""
    mask, masks = planted
    model = tiny_model()
    theta0 = snapshot(model)
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    others = [p for n, p in model.named_parameters() if p.ndim != 2 or "embed" in n]
    with apply_mask(model, mask):
        opts = [torch.optim.Muon(matrices, lr=0.05, weight_decay=0.1),
                torch.optim.AdamW(others, lr=1e-2, weight_decay=0.1)]
        for ids in batches(2):
            for o in opts:
                o.zero_grad()
            lm_loss(model, ids).backward()
            for o in opts:
                o.step()
    for n, p in model.named_parameters():
        assert same_bits(p.detach()[~masks[n]], theta0[n][~masks[n]]).all(), n


def test_stale_momentum_from_earlier_unmasked_steps(planted):
    """A mask applied mid-training: optimizer state already holds momentum for entries that
    are now frozen; they must stay at their values from when the mask was applied."""
    mask, masks = planted
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for ids in batches(2, seed=7):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()
    at_apply = snapshot(model)
    handle = apply_mask(model, mask)
    for ids in batches(3):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()
    for n, p in model.named_parameters():
        assert same_bits(p.detach()[~masks[n]], at_apply[n][~masks[n]]).all(), n
    handle.remove()
    # removed: the next step moves frozen entries again (momentum is still there)
    opt.step()
    assert any((p.detach()[~masks[n]] != at_apply[n][~masks[n]]).any()
               for n, p in model.named_parameters())


def test_snapshot_memory_and_cpu_storage(planted):
    mask, masks = planted
    model = tiny_model()
    n_frozen = sum(int((~m).sum()) for m in masks.values())
    handle = apply_mask(model, mask, snapshot_device="cpu")
    mem = handle.memory()
    assert mem["snapshot"] == 4 * n_frozen
    assert mem["mask"] == sum((p.numel() + 7) // 8 for p in model.parameters())
    assert handle.n_frozen == n_frozen
    assert "planted" in repr(handle)
    handle.remove()


def test_mask_given_as_name_path_or_dict(planted):
    mask, masks = planted
    theta0 = snapshot(tiny_model())
    for spec in ("planted", mask.id[:10], str(mask.path), {k: v for k, v in masks.items()}):
        model = tiny_model()
        with apply_mask(model, spec, home=mask.registry.home) as handle:
            assert handle.n_trainable == mask.n_updated
            train_steps(model, adamw, steps=1)
        for n, p in model.named_parameters():
            assert same_bits(p.detach()[~masks[n]], theta0[n][~masks[n]]).all()


def test_remove_restores_plain_training(planted):
    mask, masks = planted
    model = tiny_model()
    handle = apply_mask(model, mask)
    handle.remove()
    handle.remove()  # idempotent
    ids = batches(1)[0]
    lm_loss(model, ids).backward()
    assert any((p.grad[~masks[n]] != 0).any() for n, p in model.named_parameters())
    with apply_mask(model, mask):  # can be applied again once removed
        pass


def test_applying_twice_is_refused(planted):
    mask, _ = planted
    model = tiny_model()
    with apply_mask(model, mask):
        with pytest.raises(UsageError, match="already has a mask"):
            apply_mask(model, mask)


def test_whole_tensors_trainable_and_frozen():
    """Fast paths: an all-ones tensor gets no hook and no snapshot, an all-zeros one is
    zeroed whole."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    torch.manual_seed(0)
    masks = {"0.weight": np.ones((3, 4), bool), "0.bias": np.zeros(3, bool),
             "1.weight": np.eye(2, 3, dtype=bool), "1.bias": np.array([True, False])}
    theta0 = snapshot(model)
    handle = apply_mask(model, masks)
    assert handle.masked["0.weight"].hook is None
    assert handle.memory()["snapshot"] == 4 * (3 + 4 + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        assert torch.equal(model[0].bias.grad, torch.zeros(3))
        opt.step()
    assert (model[0].weight != theta0["0.weight"]).all()
    assert torch.equal(model[0].bias, theta0["0.bias"])
    eye = torch.eye(2, 3, dtype=torch.bool)
    assert torch.equal(model[1].weight[~eye], theta0["1.weight"][~eye])
    assert (model[1].weight[eye] != theta0["1.weight"][eye]).all()
    assert model[1].bias[1] == theta0["1.bias"][1] and model[1].bias[0] != theta0["1.bias"][0]


@pytest.mark.parametrize("path", ["numpy", "device-kernels"])
def test_bf16_parameters_and_non_finite_frozen_gradients(monkeypatch, path):
    """bf16 weights (no numpy dtype: handled through int16 views) stay bit-identical; a NaN
    or inf gradient of a frozen entry becomes exactly 0, so it cannot poison the optimizer
    state of that entry."""
    if path == "device-kernels":
        monkeypatch.setattr(training, "_use_numpy", lambda device: False)
    torch.manual_seed(0)
    layer = nn.Linear(16, 12).to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    masks = {"weight": torch.rand(12, 16, generator=g) < 0.4, "bias": torch.rand(12) < 0.5}
    w0 = layer.weight.detach().clone()
    handle = apply_mask(layer, masks)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(5, 16, dtype=torch.bfloat16)).float().square().sum().backward()
        opt.step()
    frozen = ~masks["weight"]
    assert torch.equal(layer.weight.view(torch.int16)[frozen], w0.view(torch.int16)[frozen])
    assert (layer.weight[~frozen] != w0[~frozen]).all()
    grad = torch.full((12, 16), float("nan"), dtype=torch.bfloat16)
    grad[0, 0] = float("inf")
    handle.masked["weight"].mask_grad(grad)
    assert torch.equal(grad[frozen].float(), torch.zeros(int(frozen.sum())))
    assert grad[~frozen].isnan().all()


# -- name matching ------------------------------------------------------------------------


class Wrapped(nn.Module):
    """Adds a ``base.`` prefix and a value head the mask does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.base = tiny_model()
        self.value_head = nn.Linear(CFG.hidden_size, 1)
        self.register_buffer("steps", torch.zeros(()))


def test_prefix_mismatch_is_one_clear_error_with_a_hint(planted):
    mask, _ = planted
    backbone = tiny_model().model  # names without "model." and no lm_head
    with pytest.raises(MaskMismatchError) as info:
        apply_mask(backbone, mask)
    err = info.value
    message = str(err)
    assert "\n" not in message
    assert "mask 'planted' does not match the model" in message
    assert ("22 mask tensor(s) have no parameter in the model: lm_head.weight, model.embed"
            in message)
    assert "21 trainable parameter(s) have no tensor in the mask: pos, embed_tokens" in message
    assert "hint: strip_prefix='model.' matches 21 of the 22" in message
    assert len(err.missing_in_target) == 22 and "lm_head.weight" in err.missing_in_target
    assert len(err.missing_in_mask) == 21
    handle = apply_mask(backbone, mask, strip_prefix="model.", extra="ignore")
    assert handle.ignored == ["lm_head.weight"]
    assert len(handle.masked) == 21


def test_add_prefix_buffers_and_missing_policies(planted):
    mask, masks = planted
    with pytest.raises(MaskMismatchError, match="hint: add_prefix='base.' matches 22 of the 22"):
        apply_mask(Wrapped(), mask)
    with pytest.raises(MaskMismatchError, match=r"2 trainable parameter\(s\) have no tensor in "
                       r"the mask: value_head.weight, value_head.bias"):
        apply_mask(Wrapped(), mask, add_prefix="base.")
    # missing="freeze": the value head is held at θ0; missing="train": it trains
    for policy in ("freeze", "train"):
        model = Wrapped()
        head0 = model.value_head.weight.detach().clone()
        handle = apply_mask(model, mask, add_prefix="base.", missing=policy)
        assert handle.unmasked == (["value_head.weight", "value_head.bias"]
                                   if policy == "train" else [])
        opt = adamw(model.parameters())
        for ids in batches(2):
            opt.zero_grad()
            hidden = model.base.model(ids)
            (lm_loss(model.base, ids) + model.value_head(hidden).square().mean()).backward()
            opt.step()
        assert torch.equal(model.value_head.weight, head0) == (policy == "freeze")
        handle.remove()


def test_buffers_in_the_mask_are_ignored():
    model = nn.BatchNorm1d(4)
    masks = {"weight": np.array([1, 0, 1, 0], bool), "bias": np.ones(4, bool),
             "running_mean": np.ones(4, bool), "running_var": np.ones(4, bool),
             "num_batches_tracked": np.ones((), bool)}
    handle = apply_mask(model, masks)
    assert sorted(handle.ignored) == ["num_batches_tracked", "running_mean", "running_var"]
    assert sorted(handle.masked) == ["bias", "weight"]


def test_name_map_callable_and_skipping(planted):
    mask, masks = planted
    backbone = tiny_model().model

    def rename(name: str) -> str | None:
        return None if name == "lm_head.weight" else name.removeprefix("model.")

    handle = apply_mask(backbone, mask, name_map=rename)
    assert handle.ignored == [] and len(handle.masked) == 21
    assert handle.n_trainable == sum(int(m.sum()) for n, m in masks.items()
                                     if n != "lm_head.weight")


def test_shape_mismatch_and_bad_options(planted):
    mask, _ = planted
    other = TinyLlama(TinyConfig(vocab_size=61, hidden_size=32, intermediate_size=40,
                                 num_layers=2, num_heads=4, max_len=24))
    with pytest.raises(MaskMismatchError, match=r"6 shape\(s\) differ: .*\[48, 32\] in "
                       r"the mask vs \[40, 32\] in the model"):
        apply_mask(other, mask)
    with pytest.raises(UsageError, match="missing must be one of"):
        apply_mask(tiny_model(), mask, missing="ignore")
    with pytest.raises(UsageError, match="extra must be one of"):
        apply_mask(tiny_model(), mask, extra="train")
    with pytest.raises(UsageError, match="cannot use int as a mask"):
        apply_mask(tiny_model(), 42)
    with pytest.raises(UsageError, match="./nope/m.zarr: no such mask store directory"):
        apply_mask(tiny_model(), "./nope/m.zarr")


def test_tied_weights_take_the_union_of_both_names(planted):
    mask, masks = planted
    model = tiny_model()
    model.lm_head.weight = model.model.embed_tokens.weight
    theta0 = snapshot(model)
    union = masks["lm_head.weight"] | masks["model.embed_tokens.weight"]
    handle = apply_mask(model, mask)
    assert handle.masked["model.embed_tokens.weight"].n_trainable == int(union.sum())
    train_steps(model, adamw, steps=2)
    w = model.model.embed_tokens.weight.detach()
    assert same_bits(w[~union], theta0["model.embed_tokens.weight"][~union]).all()


# -- DDP and FSDP2 on two CPU processes ------------------------------------------------------


def _dist_worker(rank: int, world: int, port: int, store: str, out: str) -> None:
    """One rank: the same masked training under DDP, then under FSDP2 (fully_shard)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out_dir = Path(out)

    def sgd(params):  # momentum and weight decay both push frozen entries
        return torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1)

    def frozen_grads(handle) -> int:
        """Non-zero gradient entries outside the mask, on this rank's (local) gradients."""
        n = 0
        for mp in handle.masked.values():
            frozen = training._unpack(mp.packed, 0, mp.numel, invert=True).view(torch.bool)
            n += int((training._local(mp.param.grad).reshape(-1)[frozen] != 0).sum())
        return n

    def run(module: nn.Module) -> dict:
        handle = apply_mask(module, store)
        opt = sgd(module.parameters())
        nonzero = []
        for ids in synthetic_batches(CFG, 3, batch=4, seq=16, seed=20 + rank):
            opt.zero_grad()
            lm_loss(module, ids).backward()
            nonzero.append(frozen_grads(handle))  # after DDP's all-reduce / FSDP's RS
            opt.step()
        info = {"n_params": handle.n_params, "mask_bytes": handle.memory()["mask"],
                "drift": sum(handle.drift().values()), "frozen_grad_nonzero": nonzero}
        handle.remove()
        return info

    try:
        model = tiny_model()
        info = {"ddp": run(DistributedDataParallel(model))}
        torch.save(snapshot(model), out_dir / f"ddp-{rank}.pt")
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as exc:  # torch < 2.6 has FSDP2 under a private name only
            info["fsdp"] = {"skip": f"this torch has no torch.distributed.fsdp.fully_shard "
                            f"({exc})"}
        else:
            from torch.distributed.device_mesh import init_device_mesh

            model = tiny_model()
            mesh = init_device_mesh("cpu", (2,))  # gloo ranks: not the GPU when one is seen
            for block in model.model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            info["fsdp"] = run(model)
            full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
            torch.save(full, out_dir / f"fsdp-{rank}.pt")
        (out_dir / f"info-{rank}.json").write_text(json.dumps(info))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_run(planted, tmp_path_factory):
    """Run both distributed scenarios once (one spawn; the ranks read the mask store by
    path) and hand back what they saved."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed with the gloo backend")
    mask, masks = planted
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_dist_worker, args=(2, _free_port(), str(mask.path), str(out)), nprocs=2)
    return masks, snapshot(tiny_model()), out


def _check_masked_result(result, masks, theta0) -> None:
    for n, p in result.items():
        m = masks[n]
        assert same_bits(p[~m], theta0[n][~m]).all(), n
        # every non-zero trainable entry moved (weight decay alone moves it)
        nonzero = m & (theta0[n] != 0)
        assert (p[nonzero] != theta0[n][nonzero]).all(), n


def test_ddp_two_cpu_processes(distributed_run):
    masks, theta0, out = distributed_run
    r0, r1 = (torch.load(out / f"ddp-{r}.pt") for r in (0, 1))
    for n in r0:
        assert torch.equal(r0[n], r1[n]), n  # the ranks agree
    _check_masked_result(r0, masks, theta0)
    for r in (0, 1):
        info = json.loads((out / f"info-{r}.json").read_text())["ddp"]
        assert info["frozen_grad_nonzero"] == [0, 0, 0]  # masked before the optimizer sees it
        assert info["drift"] == 0 and info["n_params"] == sum(t.numel() for t in theta0.values())


def test_fsdp2_two_cpu_processes(distributed_run):
    """fully_shard on gloo: each rank holds the mask bits of its own shard only (uneven
    shards included) and the result matches DDP's."""
    masks, theta0, out = distributed_run
    infos = [json.loads((out / f"info-{r}.json").read_text())["fsdp"] for r in (0, 1)]
    if "skip" in infos[0]:
        pytest.skip(infos[0]["skip"])
    full, ddp = torch.load(out / "fsdp-0.pt"), torch.load(out / "ddp-0.pt")
    _check_masked_result(full, masks, theta0)
    for n in full:
        torch.testing.assert_close(full[n], ddp[n], rtol=1e-5, atol=1e-6)
    total = sum(t.numel() for t in theta0.values())
    assert infos[0]["n_params"] + infos[1]["n_params"] == total
    assert infos[0]["n_params"] != infos[1]["n_params"]  # the vocab rows split 31 + 30
    assert all(i["drift"] == 0 and i["frozen_grad_nonzero"] == [0, 0, 0] for i in infos)
    assert infos[0]["mask_bytes"] + infos[1]["mask_bytes"] < total // 8 + 50


# -- transformers Trainer callback ----------------------------------------------------------


def test_trainer_callback_applies_mask_by_name(tmp_path):
    """A real transformers Llama: save_pretrained, plant updates, diff into the registry, then
    Trainer(callbacks=[MaskCallback(name)]) with AdamW weight decay."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    from maskhub.integrations.transformers import MaskCallback

    model = tiny_hf_llama()
    model.save_pretrained(tmp_path / "base")
    state = load_file(str(tmp_path / "base" / "model.safetensors"))
    target, planted_bits = plant_updates(state, DENSITY, seed=1)
    save(target, tmp_path / "target")
    Registry().diff(tmp_path / "base", tmp_path / "target", name="llama-planted")
    masks = {k: torch.from_numpy(v) for k, v in planted_bits.items()}
    theta0 = snapshot(model)
    data = [{"input_ids": ids, "labels": ids} for b in batches(3) for ids in b]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
        learning_rate=1e-2, weight_decay=0.1, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    callback = MaskCallback("llama-planted")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[callback])
    trainer.train()
    assert callback.handle is None  # removed at train end
    assert_moved_only_inside(model, masks, theta0)


def test_callback_passes_options_and_reports_mismatch(planted):
    pytest.importorskip("transformers")
    from maskhub.integrations.transformers import MaskCallback

    mask, _ = planted
    cb = MaskCallback(mask, strip_prefix="model.", extra="ignore", exact=False)
    backbone = tiny_model().model
    cb.on_train_begin(None, None, None, model=backbone)
    assert cb.handle is not None and len(cb.handle.masked) == 21 and not cb.handle.exact
    cb.on_train_end(None, None, None)
    assert cb.handle is None
    with pytest.raises(MaskMismatchError):
        MaskCallback(mask).on_train_begin(None, None, None, model=backbone)
    with pytest.raises(UsageError, match="no model"):
        MaskCallback(mask).on_train_begin(None, None, None)


# -- Conjecture 1, small ----------------------------------------------------------------------


def test_conjecture1_example_keeps_frozen_entries_at_theta0(tmp_path):
    """The example end to end at a small size: the masked rerun leaves every entry outside
    the full run's mask bit-identical to θ0 (in memory and per `maskhub verify` on fp32
    checkpoints), while gradient masking alone would not."""
    spec = importlib.util.spec_from_file_location("conjecture1", ROOT / "examples/conjecture1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = TinyConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, max_len=32)
    report = module.run(tmp_path, cfg=cfg, sft_steps=8, steps=6, batch=8, seq=24)
    assert report["exact"]["outside_changed"] == 0
    assert report["exact"]["verify_outside"] == 0
    assert report["gradient_masking_only"]["outside_changed"] > 0
    assert 0 < report["mask"]["density"] < 1
    for tol in ("1e-05", "0.0001"):
        frac = report["equal_fraction"][tol]
        assert 1 - report["mask"]["density"] <= frac <= 1
    assert len(report["losses"]["full"]) == len(report["losses"]["masked"]) == 6


def test_conjecture1_example_with_masked_adamw_gives_the_same_agreement(tmp_path):
    """``--optimizer masked-adamw``: θ_sub from MaskedAdamW; fp32 training, so the same bits
    as AdamW + apply_mask, hence the same θ_sub ≈ θ_full agreement and losses."""
    spec = importlib.util.spec_from_file_location("conjecture1", ROOT / "examples/conjecture1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = TinyConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, max_len=32)
    dense = module.run(tmp_path / "a", cfg=cfg, sft_steps=8, steps=6, batch=8, seq=24)
    masked = module.run(tmp_path / "b", cfg=cfg, sft_steps=8, steps=6, batch=8, seq=24,
                        optimizer="masked-adamw")
    assert masked["equal_fraction"] == dense["equal_fraction"]
    assert masked["losses"]["masked"] == dense["losses"]["masked"]
    assert masked["exact"]["outside_changed"] == 0 and masked["exact"]["verify_outside"] == 0
