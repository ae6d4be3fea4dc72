"""``maskhub.torch.Recorder``: the masks of a run recorded while it trains equal, bit for bit,
the masks of ``maskhub diff`` / ``maskhub trajectory`` of the same weights saved to disk."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import run_json
from factory import tiny_hf_llama
from safetensors.torch import save_file

from maskhub import Registry
from maskhub.demo.tinymodel import TinyConfig, TinyLlama, synthetic_batches
from maskhub.errors import NameTakenError, UsageError
from maskhub.torch import DictMask, Recorder

CFG = TinyConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2,
                 num_heads=2, max_len=16)
STEPS = (2, 4, 6)


def _save(model: torch.nn.Module, path: Path) -> Path:
    path.mkdir(parents=True)
    save_file({n: p.detach().clone().contiguous() for n, p in model.named_parameters()},
              str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("keep, kernel, with_base", [
    ("cpu", "auto", False),   # host copy, the CPU diff kernel
    ("disk", "torch", False),  # θ0 written aside; the device path (what runs on a GPU)
    ("disk", "auto", True),    # θ0 read back from the base checkpoint the run started from
])
def test_live_masks_equal_the_dense_diff_and_trajectory(tmp_path, keep, kernel,
                                                        with_base) -> None:
    """A bf16 run recorded at steps 2, 4, 6: each RUN-step-N equals `maskhub diff ckpt0
    ckptN`, and the trajectory rows (vs first, vs previous, ever, Figure 6) and the split
    equal `maskhub trajectory` of the saved checkpoints."""
    torch.manual_seed(0)
    model = TinyLlama(CFG).to(torch.bfloat16)
    ckpts = [_save(model, tmp_path / "ckpt-0")]
    reg = Registry()
    rec = reg.recorder(model, "live", keep=keep, kernel=kernel, per_step=True,
                       base=ckpts[0] if with_base else None, algorithm="sgd", seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step, ids in enumerate(synthetic_batches(CFG, STEPS[-1], batch=4, seq=12, seed=1),
                               start=1):
        opt.zero_grad()
        model.loss(ids).backward()
        opt.step()
        if step in STEPS:
            rec.record(step)
            ckpts.append(_save(model, tmp_path / f"ckpt-{step}"))
    live = rec.finish()
    names = [n for n, _ in model.named_parameters()]
    for step, ck in zip(STEPS, ckpts[1:], strict=True):
        dense = run_json("diff", str(ckpts[0]), str(ck), "--name", f"dense-{step}")
        live_mask = reg.get(f"live-step-{step}")
        assert live_mask.n_updated == dense["n_updated"] > 0
        dense_mask = reg.get(f"dense-{step}")
        for n in names:
            assert np.array_equal(live_mask.packed(n), dense_mask.packed(n)), n
        assert live_mask.row["algorithm"] == "sgd" and live_mask.row["seed"] == 3
    traj = run_json("trajectory", *map(str, ckpts), "--name", "dense")
    ours = live.to_dict()
    keys = ("n_updated_vs_first", "n_updated_vs_prev", "n_ever", "n_not_in_final")
    assert [[p[k] for k in keys] for p in ours["points"]] == \
        [[p[k] for k in keys] for p in traj["points"]]
    assert [p["step"] for p in ours["points"]] == [0, *STEPS]
    for k in ("n_never", "n_cancelled", "n_subnetwork", "n_params"):
        assert ours[k] == traj[k]
    ever_live, ever_dense = reg.get("live-ever"), reg.get("dense-ever")
    for n in names:
        assert np.array_equal(ever_live.packed(n), ever_dense.packed(n))
    rows = reg.sql("SELECT p.idx, p.n_updated_vs_first FROM trajectory_points p JOIN "
                   "trajectories t ON t.id = p.trajectory_id WHERE t.name = 'live' "
                   "ORDER BY p.idx")[1]
    assert rows == [(i, p["n_updated_vs_first"]) for i, p in enumerate(traj["points"])]
    assert not list((Path(os.environ["MASKHUB_HOME"]) / "tmp").glob("*.partial"))


def test_without_per_step_the_vs_previous_column_is_null(tmp_path) -> None:
    """Without per_step the previous values are not kept (no second copy) and the SQL
    column says unknown rather than a wrong number."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    reg = Registry()
    with reg.recorder(model, "plain", tol=0.0) as rec:
        with torch.no_grad():
            model.weight[0, 0] += 1.0
        rec.record(10)
        assert rec.host_bytes() == {"snapshot": 15 * 4, "previous": 0, "packed_bits": 2 + 1}
    rows = reg.sql("SELECT idx, step, n_updated_vs_first, n_updated_vs_prev, n_ever "
                   "FROM trajectory_points ORDER BY idx")[1]
    assert rows == [(0, 0, 0, 0, 0), (1, 10, 1, None, 1)]
    assert reg.get("plain-step-10")["weight"].tolist() == [[True, False, False, False],
                                                           [False] * 4, [False] * 4]


def test_masked_run_in_a_trainer_records_only_inside_the_mask(tmp_path) -> None:
    """RecordCallback beside MaskedAdamW in a real transformers Trainer: masks at steps 2
    and 4 lie inside the training mask, and the last equals the dense diff of the saved
    model."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from maskhub.integrations.transformers import RecordCallback, masked_optimizer

    model = tiny_hf_llama()
    model.save_pretrained(tmp_path / "base")
    rng = np.random.default_rng(0)
    masks = {n: rng.random(p.shape) < 0.2 for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, 61, (24, 16), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0)
    callback = RecordCallback("trainer-run", record_every=2, keep="disk",
                              base=tmp_path / "base", algorithm="sft")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=masked_optimizer(model, DictMask(masks), args),
                                   callbacks=[callback])
    trainer.train()
    model.save_pretrained(tmp_path / "trained")
    reg = Registry()
    assert [p.step for p in callback.result.points] == [0, 2, 4]
    for step in (2, 4):
        m = reg.get(f"trainer-run-step-{step}")
        for n in masks:
            assert not (m[n] & ~masks[n]).any(), n  # nothing moved outside the mask
    dense = run_json("diff", str(tmp_path / "base"), str(tmp_path / "trained"), "--name",
                     "dense")
    last = reg.get("trainer-run-step-4")
    assert last.n_updated == dense["n_updated"] > 0.9 * sum(m.sum() for m in masks.values())
    for n in masks:
        assert np.array_equal(last.packed(n), reg.get("dense").packed(n)), n


class _Odd(torch.nn.Module):
    """Rows that do not fill whole bytes: FSDP2's shards start mid-byte."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(7, 5)
        self.b = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = _Odd()
        fully_shard(model, mesh=init_device_mesh("cpu", (2,)))  # gloo: not the GPU's mesh
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            save_file(full, f"{out}/base.safetensors")
        rec = Recorder(model, "fsdp", home=f"{out}/home", keep="disk", per_step=True,
                       tol=0.0)
        patches = Recorder(model, "fsdp-patch", home=f"{out}/home", values=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(rank)
        for step in range(1, 4):
            opt.zero_grad()
            x = torch.randn(8, 7, generator=g)
            y = model(x)
            # only some outputs get a gradient: the masks stay sparse
            (y[:, 0] ** 2).mean().backward()
            opt.step()
            rec.record(step)
            patches.record(step)
            full = {n: p.full_tensor() for n, p in model.named_parameters()}
            if rank == 0:
                save_file(full, f"{out}/step-{step}.safetensors")
        result = rec.finish()
        patches.finish()
        if rank == 0:
            Path(f"{out}/result.json").write_text(json.dumps(result.to_dict()))
        else:
            assert result is None
    finally:
        dist.destroy_process_group()


def test_fsdp2_shards_on_two_gloo_ranks_equal_the_dense_diff(tmp_path, monkeypatch) -> None:
    """Each rank diffs its own shard; rank 0 gathers only packed bits: the registered masks
    equal the dense diffs of the gathered checkpoints, bit for bit (shards starting
    mid-byte included)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed with the gloo backend")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(port, str(tmp_path)), nprocs=2)
    monkeypatch.setenv("MASKHUB_HOME", str(tmp_path / "home"))
    reg = Registry()
    names = ["a.weight", "a.bias", "b.weight", "b.bias"]
    for step in (1, 2, 3):
        dense = run_json("diff", str(tmp_path / "base.safetensors"),
                         str(tmp_path / f"step-{step}.safetensors"), "--tol", "0",
                         "--name", f"dense-{step}")
        live = reg.get(f"fsdp-step-{step}")
        assert live.n_updated == dense["n_updated"] > 0
        for n in names:
            assert np.array_equal(live.packed(n), reg.get(f"dense-{step}").packed(n)), n
    # the values of each shard gathered too: the live patch rebuilds the gathered checkpoint
    run_json("apply", "fsdp-patch-step-3", str(tmp_path / "base.safetensors"),
             str(tmp_path / "rebuilt"))
    assert (tmp_path / "rebuilt" / "base.safetensors").read_bytes() == \
        (tmp_path / "step-3.safetensors").read_bytes() or _same_tensors(
            tmp_path / "rebuilt" / "base.safetensors", tmp_path / "step-3.safetensors")
    result = json.loads((tmp_path / "result.json").read_text())
    traj = run_json("trajectory", str(tmp_path / "base.safetensors"),
                    *(str(tmp_path / f"step-{s}.safetensors") for s in (1, 2, 3)),
                    "--tol", "0", "--name", "dense")
    keys = ("n_updated_vs_first", "n_updated_vs_prev", "n_ever", "n_not_in_final")
    assert [[p[k] for k in keys] for p in result["points"]] == \
        [[p[k] for k in keys] for p in traj["points"]]


def _same_tensors(a: Path, b: Path) -> bool:
    """The two safetensors files hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(torch.uint8).reshape(-1),
                                                   tb[k].view(torch.uint8).reshape(-1))
        for k in ta)


@pytest.mark.parametrize("kernel", ["cpu", "torch"])
def test_live_patch_rebuilds_the_model_bit_for_bit(tmp_path, kernel) -> None:
    """values=True: RUN-step-N is a patch with the same bits and values as `maskhub diff
    ckpt0 ckptN --patch` (every entry whose bits changed, ±0 and NaN payloads included), and
    `maskhub apply` turns ckpt0 into ckptN exactly."""
    torch.manual_seed(0)
    model = TinyLlama(CFG).to(torch.bfloat16)
    with torch.no_grad():  # values a lossless patch must carry: +0 -> -0, NaN payloads
        emb = next(p for n, p in model.named_parameters() if "embed" in n)
        emb.view(-1)[:3] = torch.tensor([0.0, float("nan"), 1.0], dtype=torch.bfloat16)
    ck0 = _save(model, tmp_path / "ckpt-0")
    reg = Registry()
    rec = reg.recorder(model, "live", values=True, kernel=kernel)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for ids in synthetic_batches(CFG, 2, batch=4, seq=12, seed=1):
        opt.zero_grad()
        model.loss(ids).backward()
        opt.step()
    with torch.no_grad():
        bits = emb.view(-1).view(torch.int16)
        bits[0] = -32768                           # -0.0: equal to +0, other bits
        bits[1] = 0x7FC1                           # another NaN payload
    rec.record(2)
    rec.finish()
    ck2 = _save(model, tmp_path / "ckpt-2")
    dense = run_json("diff", str(ck0), str(ck2), "--patch", "--name", "dense")
    live = reg.get("live-step-2")
    assert live.row["has_values"] and live.n_updated == dense["n_updated"] > 0
    for n, _ in model.named_parameters():
        assert np.array_equal(live.packed(n), reg.get("dense").packed(n)), n
        assert np.array_equal(live.store.values(n), reg.get("dense").store.values(n)), n
    run_json("apply", "live-step-2", str(ck0), str(tmp_path / "rebuilt"))
    assert _same_tensors(tmp_path / "rebuilt" / "model.safetensors", ck2 / "model.safetensors")


def test_bad_use_is_one_clear_error(tmp_path) -> None:
    """Steps that do not increase, an unknown keep, a base of another model."""
    model = torch.nn.Linear(4, 3)
    reg = Registry()
    with pytest.raises(UsageError, match="^keep must be one of cpu, disk, not 'gpu'$"):
        reg.recorder(model, "r", keep="gpu")
    with pytest.raises(UsageError, match=r"^values=True records a lossless patch: every entry "
                                         r"whose bits changed, at tol 0; drop tol or values$"):
        reg.recorder(model, "r", values=True, tol=1e-5)
    other = torch.nn.Linear(5, 3)
    (tmp_path / "other").mkdir()
    save_file({n: p.detach() for n, p in other.named_parameters()},
              str(tmp_path / "other" / "model.safetensors"))
    with pytest.raises(UsageError, match=r"is not this model's base: 1 parameter\(s\) "
                                         r"missing or of another shape, e.g. weight \[3, 5\] "
                                         r"vs \[3, 4\]$"):
        reg.recorder(model, "r", keep="disk", base=tmp_path / "other")
    rec = reg.recorder(model, "r")
    rec.record(5)
    with pytest.raises(UsageError, match="^step 5 recorded after step 5: the steps of a "
                                         "recording must increase$"):
        rec.record(5)
    with pytest.raises(NameTakenError, match="^a mask named 'r-step-5' already exists"):
        Recorder(model, "r", home=reg).record(5)
    rec.finish()
    with pytest.raises(UsageError, match="already finished"):
        rec.finish()


def test_a_taken_name_leaves_the_recording_as_it_was() -> None:
    """A step whose delta mask's name is taken is refused before anything is diffed: the
    next step's delta is still measured from the last recorded point (θ0 here), and no
    half of the refused step is registered."""
    reg = Registry()
    first = torch.nn.Linear(4, 3)
    rec = Recorder(first, "r", home=reg, delta_masks=True)
    with torch.no_grad():
        first.weight[0, 0] += 1
    rec.record(2)
    reg.rm("r-step-2")  # only r-delta-2 is taken now
    model = torch.nn.Linear(4, 3)
    again = Recorder(model, "r", home=reg, delta_masks=True)
    with torch.no_grad():
        model.weight[2, 2] += 1
    with pytest.raises(NameTakenError, match="^a mask named 'r-delta-2' already exists"):
        again.record(2)
    again.record(3)
    assert reg.get("r-step-3").n_updated == 1 and reg.get("r-delta-3").n_updated == 1
    assert "r-step-2" not in [m["name"] for m in reg.ls()]
