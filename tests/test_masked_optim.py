"""``maskhub.torch.MaskedAdamW``: optimizer state only for a mask's entries, with the same
bits as dense AdamW plus gradient masking and the exact freeze."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from factory import assert_moved_only_inside, tiny_hf_llama

from maskhub.demo.tinymodel import TinyConfig, TinyLlama, synthetic_batches
from maskhub.errors import UsageError
from maskhub.torch import DictMask, MaskedAdamW, MaskedSGD, apply_mask

CFG = TinyConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2,
                 num_heads=2, max_len=16)


def planted_mask(model: torch.nn.Module, density: float = 0.2) -> dict[str, np.ndarray]:
    """Random entries of every matrix trainable; the norms entirely frozen."""
    rng = np.random.default_rng(0)
    return {n: (np.zeros(p.shape, bool) if "norm" in n else rng.random(p.shape) < density)
            for n, p in model.named_parameters()}


def batches(n: int = 50) -> list[torch.Tensor]:
    return synthetic_batches(CFG, n, batch=4, seq=12, seed=3)


def test_fp32_bit_identical_to_adamw_with_masking_and_exact_freeze() -> None:
    torch.manual_seed(0)
    ref = TinyLlama(CFG)
    ours = copy.deepcopy(ref)
    theta0 = {n: p.detach().clone() for n, p in ref.named_parameters()}
    masks = planted_mask(ref)
    handle = apply_mask(ref, DictMask(masks))  # exact mode
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, foreach=False)
    opt = MaskedAdamW(ours, masks, lr=3e-3, weight_decay=0.1)
    for ids in batches():
        for model, o in ((ref, opt_ref), (ours, opt)):
            o.zero_grad()
            model.loss(ids).backward()
            o.step()
    handle.remove()
    for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
        assert torch.equal(a, b), name  # bit for bit, trainable and frozen entries alike
        frozen = ~torch.from_numpy(masks[name])
        assert torch.equal(b[frozen], theta0[name][frozen]), name
        if masks[name].any():
            assert not torch.equal(b, theta0[name]), name  # it did train
    norms = [n for n in masks if "norm" in n]
    assert sorted(opt.frozen) == sorted(norms)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if n in norms)
    n_train = sum(int(m.sum()) for m in masks.values())
    assert opt.trainable_entries() == n_train
    assert opt.state_bytes() == n_train * (4 + 4 + 4)  # int32 index, m, v (fp32)


def test_bf16_with_fp32_masters_matches_a_dense_master_reference() -> None:
    """bf16 parameters, fp32 masters: the reference keeps an fp32 master of every entry and
    runs torch's AdamW on it with masked gradients and the frozen masters restored."""
    torch.manual_seed(1)
    ref = TinyLlama(CFG).to(torch.bfloat16)
    ours = copy.deepcopy(ref)
    masks = planted_mask(ref)
    masters = [p.detach().float().clone().requires_grad_(True) for p in ref.parameters()]
    theta0 = [m.detach().clone() for m in masters]
    bits = [torch.from_numpy(masks[n]) for n, _ in ref.named_parameters()]
    opt_ref = torch.optim.AdamW(masters, lr=3e-3, weight_decay=0.1, foreach=False)
    opt = MaskedAdamW(ours, masks, lr=3e-3, weight_decay=0.1)
    for ids in batches(30):
        ref.zero_grad(set_to_none=True)
        ref.loss(ids).backward()
        for p, m, b in zip(ref.parameters(), masters, bits, strict=True):
            m.grad = torch.where(b, p.grad.float(), torch.zeros_like(m))
        opt_ref.step()
        with torch.no_grad():
            for p, m, b, t0 in zip(ref.parameters(), masters, bits, theta0, strict=True):
                m.copy_(torch.where(b, m, t0))
                p.copy_(m.to(torch.bfloat16))
        opt.zero_grad()
        ours.loss(ids).backward()
        opt.step()
    for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), name
    n_train = sum(int(m.sum()) for m in masks.values())
    assert opt.state_bytes() == n_train * (4 + 4 + 4 + 4)  # index, master, m, v


def test_state_dict_round_trip_resumes_the_same_run() -> None:
    torch.manual_seed(2)
    a = TinyLlama(CFG).to(torch.bfloat16)
    b = copy.deepcopy(a)
    masks = planted_mask(a)
    opt_a = MaskedAdamW(a, masks, lr=1e-2)
    data = batches(10)
    for ids in data[:5]:
        opt_a.zero_grad()
        a.loss(ids).backward()
        opt_a.step()
    saved = copy.deepcopy(opt_a.state_dict())
    b.load_state_dict(a.state_dict())
    opt_b = MaskedAdamW(b, masks, lr=1e-2)
    opt_b.load_state_dict(saved)
    for ids in data[5:]:
        for model, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            model.loss(ids).backward()
            o.step()
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), name
    masters = [s for s in opt_b.state.values() if s]
    assert masters and all(s["exp_avg"].dtype == torch.float32 for s in masters)


def test_bad_input_is_one_clear_error() -> None:
    model = TinyLlama(CFG)
    none = {n: np.zeros(p.shape, bool) for n, p in model.named_parameters()}
    with pytest.raises(UsageError, match="^the mask leaves nothing to train in this model$"):
        MaskedAdamW(model, none)
    with pytest.raises(UsageError, match="^invalid AdamW hyperparameters"):
        MaskedAdamW(TinyLlama(CFG), planted_mask(model), lr=-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backward_same_bits_and_gradients_freed(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    a = TinyLlama(CFG).to(dtype)
    b = copy.deepcopy(a)
    masks = planted_mask(a)
    opt_a = MaskedAdamW(a, masks, lr=3e-3, weight_decay=0.1)
    opt_b = MaskedAdamW(b, masks, lr=3e-3, weight_decay=0.1, fused_backward=True)
    for ids in batches(20):
        opt_a.zero_grad()
        a.loss(ids).backward()
        opt_a.step()
        b.loss(ids).backward()  # the updates run here
        assert all(p.grad is None for p in b.parameters())  # dense gradients already freed
        opt_b.step()  # a no-op, as a training loop would still call it
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), name
    opt_b.remove_hooks()


def test_fused_backward_accumulates_and_clips_like_the_unfused_optimizer() -> None:
    """Two backward passes per step (gradient accumulation) and clipping by the trainable
    entries' norm: fused_backward updates once per step(), with the same bits."""
    torch.manual_seed(4)
    a = TinyLlama(CFG)
    b = copy.deepcopy(a)
    masks = planted_mask(a)
    opt_a = MaskedAdamW(a, masks, lr=3e-3, weight_decay=0.1)
    opt_b = MaskedAdamW(b, masks, lr=3e-3, weight_decay=0.1, fused_backward=True)
    data = batches(12)
    norms = []
    for i in range(0, 12, 2):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            for ids in data[i:i + 2]:
                (model.loss(ids) / 2).backward()
            norms.append(opt.clip_grad_norm_(0.05))
            opt.step()
        assert all(p.grad is None for p in b.parameters())
        assert norms[-2] == norms[-1] > 0.05  # the same norm, and it did clip
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), name
    steps = {float(s["step"]) for s in opt_b.state.values()}
    assert steps == {6.0}  # one update per step(), not per backward
    opt_b.remove_hooks()


def test_clip_grad_norm_counts_trainable_entries_only() -> None:
    model = TinyLlama(CFG)
    masks = planted_mask(model)
    opt = MaskedAdamW(model, masks)
    model.loss(batches(1)[0]).backward()
    want = float(torch.sqrt(sum(
        (p.grad[torch.from_numpy(masks[n])].double() ** 2).sum()
        for n, p in model.named_parameters() if p.grad is not None)))
    assert opt.clip_grad_norm_(1e-3) == pytest.approx(want, rel=1e-5)
    after = float(torch.sqrt(sum(
        (p.grad[torch.from_numpy(masks[n])].double() ** 2).sum()
        for n, p in model.named_parameters() if p.grad is not None)))
    assert after == pytest.approx(1e-3, rel=1e-3)


def test_masked_optimizer_in_a_real_transformers_trainer(tmp_path) -> None:
    """Trainer(optimizers=masked_optimizer(...)) on a tiny Llama: the frozen entries keep
    their bits, nearly every trainable entry moves, the schedule decays the learning rate,
    and verify against the mask passes on the saved checkpoint."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from maskhub import Registry
    from maskhub.integrations.transformers import masked_optimizer

    model = tiny_hf_llama()
    model.save_pretrained(tmp_path / "base")
    masks = planted_mask(model)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, 61, (24, 16), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-2, weight_decay=0.1, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    optimizer, scheduler = masked_optimizer(model, masks, args)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(optimizer, scheduler))
    trainer.train()
    moved = assert_moved_only_inside(model, masks, theta0)
    assert scheduler.get_last_lr()[0] < 1e-2  # the linear schedule ran
    model.save_pretrained(tmp_path / "trained")
    report = Registry().verify(DictMask(masks, name="planted"), tmp_path / "base",
                               tmp_path / "trained")  # the public API's verify, tol 0
    assert report.ok and report.n_outside == 0 and report.n_changed == moved


def test_fused_backward_with_trainer_gradient_accumulation(tmp_path) -> None:
    """A real Trainer with gradient_accumulation_steps=2: MaskedAdamW(fused_backward=True)
    steps 3 times in 3 optimizer steps (6 micro-batches) and ends with the unfused run's
    bits; with the Trainer's max_grad_norm clipping (which reads the dense gradients that it
    frees) it is refused with one clear error."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from maskhub.integrations.transformers import masked_optimizer

    masks = planted_mask(tiny_hf_llama())
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, 61, (24, 16), generator=g)]

    def train(fused: bool, max_grad_norm: float = 0.0) -> tuple[torch.nn.Module, MaskedAdamW]:
        model = tiny_hf_llama()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"out-{fused}"), max_steps=3,
            per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_grad_norm=max_grad_norm, learning_rate=1e-2, weight_decay=0.1,
            use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
            disable_tqdm=True, seed=0)
        optimizer, scheduler = masked_optimizer(model, masks, args, fused_backward=fused)
        transformers.Trainer(model=model, args=args, train_dataset=data,
                             optimizers=(optimizer, scheduler)).train()
        return model, optimizer

    unfused, _ = train(False)
    fused, opt = train(True)
    assert {float(s["step"]) for s in opt.state.values()} == {3.0}
    for (name, x), (_, y) in zip(unfused.named_parameters(), fused.named_parameters(),
                                 strict=True):
        assert torch.equal(x, y), name
    with pytest.raises(UsageError) as err:
        train(True, max_grad_norm=1.0)
    assert str(err.value) == (
        "fused_backward=True frees the dense gradients that the Trainer's max_grad_norm=1.0 "
        "clipping reads: set max_grad_norm=0 in the TrainingArguments")


def _dist_worker(rank: int, port: int, masks_file: str, out: str) -> None:
    """One of two gloo ranks: MaskedAdamW on a DDP-wrapped model, then on an FSDP2-sharded
    one, rank-specific batches; saves the full parameters of each."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        with np.load(masks_file, allow_pickle=False) as z:
            masks = {k: z[k] for k in z.files}

        def train(model: torch.nn.Module, forward: torch.nn.Module,
                  opt: torch.optim.Optimizer) -> None:
            for ids in synthetic_batches(CFG, 6, batch=4, seq=12, seed=40 + rank):
                opt.zero_grad()
                logits = forward(ids[:, :-1])
                torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                  ids[:, 1:].reshape(-1)).backward()
                opt.step()

        torch.manual_seed(0)
        model = TinyLlama(CFG)
        # Before wrapping: it turns off requires_grad on all-frozen parameters, which DDP
        # must know when it builds its buckets.
        opt = MaskedAdamW(model, masks, lr=3e-3, weight_decay=0.1)
        train(model, DistributedDataParallel(model), opt)
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()},
                   f"{out}/ddp-{rank}.pt")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = TinyLlama(CFG)
        # A CPU mesh: without one, FSDP2 puts the shards on the GPU when one is visible
        # (seen on an H200), while this test's gloo ranks and batches are on the CPU.
        mesh = init_device_mesh("cpu", (2,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = MaskedAdamW(model, masks, lr=3e-3, weight_decay=0.1)  # on the shards
        train(model, model, opt)
        torch.save({n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
                   f"{out}/fsdp-{rank}.pt")
        (Path(out) / f"entries-{rank}.txt").write_text(str(opt.trainable_entries()))
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_on_two_gloo_processes(tmp_path) -> None:
    """Under DDP and under FSDP2 (each rank keeping the state of its own shard's trainable
    entries) the ranks end bit-identical, frozen entries keep θ0's bits, and the result
    matches one process training on both ranks' batches (to float rounding: the gradients
    are averaged in another order)."""
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed with the gloo backend")
    torch.manual_seed(0)
    model = TinyLlama(CFG)
    masks = planted_mask(model)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    np.savez(tmp_path / "masks.npz", **masks)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(port, str(tmp_path / "masks.npz"), str(tmp_path)), nprocs=2)
    opt = MaskedAdamW(model, masks, lr=3e-3, weight_decay=0.1)
    for a, b in zip(synthetic_batches(CFG, 6, batch=4, seq=12, seed=40),
                    synthetic_batches(CFG, 6, batch=4, seq=12, seed=41), strict=True):
        opt.zero_grad()
        model.loss(torch.cat([a, b])).backward()
        opt.step()
    for kind in ("ddp", "fsdp"):
        r0, r1 = (torch.load(tmp_path / f"{kind}-{r}.pt") for r in (0, 1))
        for n, p in model.named_parameters():
            assert torch.equal(r0[n], r1[n]), (kind, n)
            frozen = ~torch.from_numpy(masks[n])
            assert torch.equal(r0[n][frozen], theta0[n][frozen]), (kind, n)
            torch.testing.assert_close(r0[n], p.detach(), rtol=1e-4, atol=1e-5)
    shards = [int((tmp_path / f"entries-{r}.txt").read_text()) for r in (0, 1)]
    assert sum(shards) == sum(int(m.sum()) for m in masks.values()) and min(shards) > 0


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_with_momentum_bit_identical_to_torch_sgd_with_masking(nesterov: bool) -> None:
    torch.manual_seed(4)
    ref = TinyLlama(CFG)
    ours = copy.deepcopy(ref)
    masks = planted_mask(ref)
    handle = apply_mask(ref, DictMask(masks))
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=nesterov)
    opt_ref = torch.optim.SGD(ref.parameters(), foreach=False, **kw)
    opt = MaskedSGD(ours, masks, **kw)
    for ids in batches(20):
        for model, o in ((ref, opt_ref), (ours, opt)):
            o.zero_grad()
            model.loss(ids).backward()
            o.step()
    handle.remove()
    for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    n_train = sum(int(m.sum()) for m in masks.values())
    assert opt.state_bytes() == n_train * (4 + 4)  # index + momentum buffer
    with pytest.raises(UsageError, match="^invalid SGD hyperparameters"):
        MaskedSGD(TinyLlama(CFG), masks, nesterov=True)


def test_masked_optimizer_in_a_real_trl_dpo_trainer(tmp_path) -> None:
    """TRL's DPOTrainer with optimizers=masked_optimizer(...): a tiny Llama, a word-level
    tokenizer built here, arithmetic preference pairs; the frozen entries keep their bits."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import DPOConfig, DPOTrainer

    from maskhub.integrations.transformers import masked_optimizer

    words = ["<pad>", "<eos>", "+", "="] + [str(i) for i in range(12)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>",
                                               eos_token="<eos>")
    config = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32,
                                      intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0,
                                      eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    masks = planted_mask(model)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = Dataset.from_list([{"prompt": f"{a} + {b} =", "chosen": f" {a + b}",
                               "rejected": f" {a + b + 1}"} for a in range(4) for b in range(4)])
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                     learning_rate=1e-2, weight_decay=0.1, use_cpu=True, report_to=[],
                     save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                         train_dataset=data, processing_class=tok,
                         optimizers=masked_optimizer(model, masks, args))
    trainer.train()
    assert_moved_only_inside(model, masks, theta0)


@pytest.mark.parametrize("fused", [False, True])
def test_a_dropped_model_and_optimizer_are_freed(fused: bool) -> None:
    """The fused-backward hooks sit on the model's parameters; they must not keep the model
    and the optimizer alive once the user drops both (found on a GPU, where each run of a
    sweep in one process kept its model's memory)."""
    import gc
    import weakref

    def train() -> tuple[list[weakref.ref], weakref.ref]:
        model = TinyLlama(CFG)
        opt = MaskedAdamW(model, planted_mask(model), lr=1e-3, fused_backward=fused)
        opt.zero_grad()
        model.loss(batches(1)[0]).backward()
        opt.step()
        return [weakref.ref(p) for p in model.parameters()], weakref.ref(opt)

    params, opt = train()
    gc.collect()
    assert opt() is None and all(p() is None for p in params)
