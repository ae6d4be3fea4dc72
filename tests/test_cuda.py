"""The GPU paths, end to end, against the CPU paths they must equal bit for bit: ``maskhub
diff --device cuda`` (masks, patch values, sweep, strata), the live recorder on a CUDA model,
and masked training (``apply_mask``, ``MaskedAdamW``) with the parameters on the GPU.

Skipped without a CUDA GPU (CI has none); run on a GPU machine with
``pytest -q tests/test_cuda.py tests/test_kernel.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import run_json
from factory import save

from maskhub import Registry
from maskhub.demo.tinymodel import TinyConfig, TinyLlama, synthetic_batches
from maskhub.kernels.gpukernel import GPU_CHUNK
from maskhub.torch import DictMask, MaskedAdamW, apply_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CFG = TinyConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2,
                 num_heads=2, max_len=16)


def _pair(root: Path) -> tuple[Path, Path]:
    """A pair whose largest tensor spans three GPU transfers (both slots reused, odd tail),
    in bf16, fp16 and fp32, with NaNs, ±0 and sub-tolerance changes planted."""
    g = torch.Generator().manual_seed(7)
    big = 2 * GPU_CHUNK + 13
    base = {
        "model.embed_tokens.weight": (torch.randn(big, generator=g) * 0.02).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(37, 29, generator=g).half(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(64, 33, generator=g),
        "model.norm.weight": torch.ones(33),
    }
    target = {}
    for k, v in base.items():
        t = v.float()
        hit = torch.rand(t.shape, generator=g) < 0.15
        small = torch.rand(t.shape, generator=g) < 0.05  # below the tolerance
        t = torch.where(hit, t + 1e-2, torch.where(small, t + 1e-7, t))
        target[k] = t.to(v.dtype)
    flat_b = base["model.layers.0.mlp.up_proj.weight"].view(-1)
    flat_t = target["model.layers.0.mlp.up_proj.weight"].view(-1)
    flat_b[:4] = torch.tensor([float("nan"), 0.0, float("nan"), 1.0])
    flat_t[:4] = torch.tensor([float("nan"), -0.0, 2.0, 1.0])
    return save(base, root / "base"), save(target, root / "target")


def test_cli_diff_on_cuda_equals_cpu_masks_values_sweep_and_strata(tmp_path) -> None:
    base, target = _pair(tmp_path)
    args = ("--patch", "--sweep", "0,1e-4")
    cpu = run_json("diff", str(base), str(target), "--name", "cpu", "--device", "cpu", *args)
    gpu = run_json("diff", str(base), str(target), "--name", "gpu", "--device", "cuda", *args)
    assert gpu["n_updated"] == cpu["n_updated"] > 0
    reg = Registry()
    a, b = reg.get("cpu"), reg.get("gpu")
    for name in a.tensor_names():
        assert np.array_equal(a.packed(name), b.packed(name)), name
        assert np.array_equal(a.store.values(name), b.store.values(name)), name
    for table, cols in (("tensors", "tensor, numel, n_updated, sparsity"),
                        ("tensor_sweep", "tensor, tol, n_updated"),
                        ("tensor_strata", "tensor, stratum, numel, n_updated")):
        rows = [reg.sql(f"SELECT {cols} FROM {table} WHERE mask_id = (SELECT id FROM masks "
                        f"WHERE name = '{m}') ORDER BY ALL")[1] for m in ("cpu", "gpu")]
        assert rows[0] == rows[1] and rows[0], table
    run_json("apply", "gpu", str(base), str(tmp_path / "rebuilt"))
    back = run_json("diff", str(target), str(tmp_path / "rebuilt"), "--tol", "0",
                    "--name", "check", "--device", "cuda")
    assert back["n_updated"] == 0


def _save_model(model: torch.nn.Module, path: Path) -> Path:
    return save({n: p.detach().cpu().clone() for n, p in model.named_parameters()}, path)


@pytest.mark.parametrize("keep, values", [("cpu", False), ("disk", False), ("cpu", True)])
def test_recorder_on_a_cuda_model_equals_the_dense_diff(tmp_path, keep, values) -> None:
    torch.manual_seed(0)
    model = TinyLlama(CFG).to(torch.bfloat16).cuda()
    ck0 = _save_model(model, tmp_path / "ckpt-0")
    reg = Registry()
    rec = reg.recorder(model, "live", keep=keep, values=values, per_step=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    ckpts = {}
    for step, ids in enumerate(synthetic_batches(CFG, 4, batch=4, seq=12, seed=1), start=1):
        opt.zero_grad()
        model.loss(ids.cuda()).backward()
        opt.step()
        if step in (2, 4):
            rec.record(step)
            ckpts[step] = _save_model(model, tmp_path / f"ckpt-{step}")
    rec.finish()
    for step, ck in ckpts.items():
        extra = ("--patch",) if values else ()
        dense = run_json("diff", str(ck0), str(ck), "--name", f"dense-{step}", *extra)
        live, want = reg.get(f"live-step-{step}"), reg.get(f"dense-{step}")
        assert live.n_updated == dense["n_updated"] > 0
        for n, _ in model.named_parameters():
            assert np.array_equal(live.packed(n), want.packed(n)), n
            if values:
                assert np.array_equal(live.store.values(n), want.store.values(n)), n
    if values:
        run_json("apply", "live-step-4", str(ck0), str(tmp_path / "rebuilt"))
        back = run_json("diff", str(ckpts[4]), str(tmp_path / "rebuilt"), "--tol", "0",
                        "--name", "rebuilt")
        assert back["n_updated"] == 0


def _masks(model: torch.nn.Module, density: float = 0.2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: (np.zeros(p.shape, bool) if "norm" in n else rng.random(p.shape) < density)
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_apply_mask_on_cuda_freezes_exactly_and_equals_masked_adamw(dtype) -> None:
    """Dense AdamW + ``apply_mask`` (exact) and ``MaskedAdamW`` on the GPU: frozen entries
    keep their bits, trainable ones move, and (fp32) both give the same bits."""
    torch.manual_seed(0)
    ref = TinyLlama(CFG).to(dtype).cuda()
    ours = copy.deepcopy(ref)
    theta0 = {n: p.detach().clone() for n, p in ref.named_parameters()}
    masks = _masks(ref)
    handle = apply_mask(ref, DictMask(masks))
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, foreach=False)
    opt = MaskedAdamW(ours, masks, lr=3e-3, weight_decay=0.1)
    for ids in synthetic_batches(CFG, 20, batch=4, seq=12, seed=3):
        for model, o in ((ref, opt_ref), (ours, opt)):
            o.zero_grad()
            model.loss(ids.cuda()).backward()
            o.step()
    handle.remove()
    for model in (ref, ours):
        moved = 0
        for n, p in model.named_parameters():
            assert p.device.type == "cuda"
            inside = torch.from_numpy(masks[n]).cuda()
            now, then = p.detach(), theta0[n]
            assert torch.equal(now[~inside].view(torch.uint8), then[~inside].view(torch.uint8)), n
            moved += int((now[inside] != then[inside]).sum())
        assert moved > 0.5 * sum(int(m.sum()) for m in masks.values())
    if dtype == torch.float32:
        for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters(),
                                     strict=True):
            assert torch.equal(a, b), name


def test_a_dropped_fused_optimizer_gives_its_gpu_memory_back() -> None:
    """A sweep of runs in one process: each dropped model and MaskedAdamW(fused_backward)
    must free its GPU memory (they leaked through the backward hooks before)."""
    import gc

    def run() -> None:
        model = TinyLlama(CFG).cuda()
        opt = MaskedAdamW(model, _masks(model), lr=1e-3, fused_backward=True)
        for ids in synthetic_batches(CFG, 2, batch=4, seq=12, seed=3):
            opt.zero_grad()
            model.loss(ids.cuda()).backward()
            opt.step()

    gc.collect()
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        run()
    gc.collect()
    assert torch.cuda.memory_allocated() == before


def test_patch_apply_to_a_model_on_cuda_rebuilds_the_target(tmp_path) -> None:
    """``Mask.apply_to`` writes a patch's values into a model whose parameters live on the
    GPU: afterwards every parameter holds the target's bits (NaN payloads and -0 too)."""
    from safetensors.torch import load_file

    base, target = _pair(tmp_path)
    run_json("diff", str(base), str(target), "--patch", "--name", "p", "--device", "cpu")
    model = torch.nn.Module()
    for name, t in load_file(str(base / "model.safetensors")).items():
        model.register_parameter(name.replace(".", "_"),
                                 torch.nn.Parameter(t.cuda(), requires_grad=False))
    mask = Registry().get("p")
    assert mask.apply_to(model, name_map=lambda n: n.replace(".", "_")) == mask.n_updated
    for name, want in load_file(str(target / "model.safetensors")).items():
        got = getattr(model, name.replace(".", "_")).detach()
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8)), name
