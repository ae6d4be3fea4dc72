"""Sparse patches in checkpoint coordinates (TRL delta sync, vLLM checkpoint patches): a
chain's trajectory equals the dense trajectory of the same weights, row for row; an imported
patch is the mask `diff` gives for its target; bad patches and chains are refused naming
the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from clitools import fail_line, run_json
from factory import llama_shapes, random_state, save
from safetensors.torch import load_file, save_file

from maskhub import Registry
from maskhub.analytics import patch_trajectory
from maskhub.cli import main

STEPS = 4
_POINT_COLS = ("idx", "step", "n_updated_vs_first", "n_updated_vs_prev", "n_ever",
               "n_not_in_final")


def _chain(seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """Base + STEPS states: big moves, reverts to the base (cancelled), one-ulp moves of
    tiny weights (within 1e-5), NaN/inf/±0 entries, a tensor no step touches."""
    base = random_state(llama_shapes(), torch.bfloat16, seed=seed)
    w = base["model.layers.0.self_attn.q_proj.weight"].reshape(-1)
    w[:4] = torch.tensor([float("nan"), float("inf"), 0.0, 1e-4])
    g = torch.Generator().manual_seed(seed + 1)
    states = [base]
    for k in range(1, STEPS + 1):
        cur = {}
        for name, t in states[-1].items():
            if name == "model.norm.weight":
                cur[name] = t.clone()
                continue
            u = torch.rand(t.shape, generator=g)
            bump = (t.to(torch.float64) + 0.125 * k).to(t.dtype)
            ulp = (t.view(torch.int16) + 1).view(torch.bfloat16)  # one bf16 step
            nxt = torch.where(u < 0.04, bump, t)
            nxt = torch.where((u >= 0.04) & (u < 0.06), base[name], nxt)  # back to base
            nxt = torch.where((u >= 0.06) & (u < 0.08), ulp, nxt)
            cur[name] = nxt
        q = cur["model.layers.0.self_attn.q_proj.weight"].reshape(-1)
        q[0] = 1.0 if k % 2 else float("nan")     # NaN -> 1 -> NaN: cancelled
        q[2] = -0.0 if k % 2 else 0.0             # ±0: never updated
        q[3] = (torch.tensor(1e-4, dtype=torch.bfloat16).view(torch.int16) + k) \
            .view(torch.bfloat16)                 # a tiny weight creeping one ulp a step
        states.append(cur)
    return states


def _write_patch(path: Path, prev: dict[str, torch.Tensor], cur: dict[str, torch.Tensor],
                 layout: str, step: int) -> Path:
    """The patch from ``prev`` to ``cur``: every entry whose bits changed (as TRL lists
    them), in one of the public layouts."""
    tensors: dict[str, torch.Tensor] = {}
    shapes = {}
    for name, t in cur.items():
        changed = (t.view(torch.int16) != prev[name].view(torch.int16)).reshape(-1)
        idx = changed.nonzero().reshape(-1)
        if layout == "generic":  # also list two unchanged entries: not updated
            idx = torch.unique(torch.cat([idx, torch.tensor([0, 5])]))
            idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(1))]
        if idx.numel() == 0:
            continue
        vals = t.reshape(-1)[idx].contiguous()
        if layout == "trl-v1":
            tensors[f"{name}.indices"] = idx.to(torch.int32)
            tensors[f"{name}.values"] = vals
        elif layout == "trl-v2" and name == "lm_head.weight":  # an anchor: the whole tensor
            tensors[name] = t.contiguous()
        elif layout == "trl-v2":
            gaps = torch.diff(idx, prepend=torch.tensor([-1])) - 1
            tensors[f"{name}.idx"] = gaps.to(torch.uint16 if int(gaps.max()) < 65536
                                             else torch.uint32)
            tensors[f"{name}.val"] = vals
        elif name == "model.embed_tokens.weight":  # (2, nnz) rows and columns
            tensors[f"{name}.indices"] = torch.stack([idx // t.shape[1], idx % t.shape[1]])
            tensors[f"{name}.values"] = vals
        else:
            tensors[f"{name}.indices"] = idx.to(torch.int64)
            tensors[f"{name}.values"] = vals
            shapes[name] = list(t.shape)
    if layout == "trl-v1":
        meta = {"format": "sparse_weight_patch", "version": "1", "model_version": str(step),
                "prev_model_version": str(step - 1)}
    elif layout == "trl-v2":
        meta = {"format": "sparse_weight_patch", "version": "1", "sparse": "True",
                "model_version": str(step), "encoding": "gap_delta"}
    else:
        meta = {"base_step": str(step - 1), "target_step": str(step),
                "shapes": json.dumps(shapes)}
    save_file(tensors, str(path), metadata=meta)
    return path


def _build(root: Path, layouts: tuple[str, ...] = ("trl-v1", "trl-v2", "generic", "trl-v1")
           ) -> tuple[list[Path], list[Path], list[dict[str, torch.Tensor]]]:
    states = _chain()
    dense = [save(st, root / f"ckpt-{k}") for k, st in enumerate(states)]
    patches = [_write_patch(root / f"patch-{k}.safetensors", states[k - 1], states[k],
                            layouts[k - 1], k) for k in range(1, STEPS + 1)]
    return dense, patches, states


def _rows(reg: Registry, name: str) -> list[tuple]:
    tid = reg.sql(f"select id from trajectories where name = '{name}'")[1][0][0]
    return reg.sql(f"select {', '.join(_POINT_COLS)} from trajectory_points "
                   f"where trajectory_id = '{tid}' order by idx")[1]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("tol", ["1e-5", "0"])
def test_patch_chain_equals_dense_trajectory(tmp_path: Path, tol: str, compiled: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # the compiled one-pass replay (numba) runs from a chain size on; both paths here
    monkeypatch.setattr(patch_trajectory, "COMPILED_MIN_ENTRIES", 0 if compiled else 1 << 62)
    dense, patches, _ = _build(tmp_path)
    d = run_json("trajectory", *map(str, dense), "--name", "dense", "--tol", tol,
                 "--device", "cpu")
    p = run_json("trajectory", "--patches", str(dense[0]), *map(str, patches), "--name",
                 "chain", "--tol", tol)
    reg = Registry()
    assert _rows(reg, "chain") == _rows(reg, "dense")
    for key in ("n_params", "n_never", "n_cancelled", "n_subnetwork"):
        assert p[key] == d[key], key
    assert d["n_cancelled"] > 0 and d["points"][2]["n_not_in_final"] > 0
    for kind in ("final", "ever"):
        a, b = reg.get(f"chain-{kind}"), reg.get(f"dense-{kind}")
        for name in a.tensor_names():
            assert np.array_equal(a[name], b[name]), (kind, name)
        strata = ("select tensor, stratum, numel, n_updated from tensor_strata "
                  "where mask_id = '{}' order by 1, 2")
        assert reg.sql(strata.format(a.id))[1] == reg.sql(strata.format(b.id))[1]
    # the tiny weight creeping one ulp a step: within 1e-5 of the base, not at tol 0
    q = reg.get("chain-final")["model.layers.0.self_attn.q_proj.weight"].reshape(-1)
    assert (bool(q[0]), bool(q[2]), bool(q[3])) == (False, False, tol == "0")


def test_import_patch_rebuilds_target_and_is_the_diff_mask(tmp_path: Path) -> None:
    dense, patches, states = _build(tmp_path)
    reg = Registry()
    for k, patch in enumerate(patches, start=1):  # every layout, lossless by default
        out = run_json("import", str(patch), "--base", str(dense[k - 1]), "--name", f"p{k}")
        mask = reg.get(f"p{k}")
        assert mask.metadata.has_values
        n = 0
        for name, target in states[k].items():
            # the README's two lines: zarr + numpy rebuild the tensor bit for bit
            flat = states[k - 1][name].reshape(-1).view(torch.int16).numpy().view(np.uint16)
            flat = flat.copy()
            bits = mask[name].reshape(-1)
            flat[np.flatnonzero(bits)] = mask.store.values(name)
            want = target.reshape(-1).view(torch.int16).numpy().view(np.uint16)
            assert np.array_equal(flat, want), (k, name)
            # lossless: exactly the entries whose bits differ (±0 and NaN payloads too)
            prev = states[k - 1][name].reshape(-1).view(torch.int16).numpy()
            assert np.array_equal(bits, prev != want.view(np.int16)), (k, name)
            n += int(bits.sum())
        assert out["n_updated"] == n > 0 and out["tol"] == 0
    q = reg.get("p1")["model.layers.0.self_attn.q_proj.weight"].reshape(-1)
    assert (bool(q[0]), bool(q[2])) == (True, True)  # NaN -> 1, +0 -> -0: carried
    # the imported TRL patch is the patch `diff --patch` makes: same bits, same values
    run_json("diff", str(dense[1]), str(dense[2]), "--patch", "--name", "dp2",
             "--device", "cpu")
    a, b = reg.get("p2"), reg.get("dp2")
    assert a.n_updated == b.n_updated
    for name in b.tensor_names():
        assert np.array_equal(a.packed(name), b.packed(name)), name
        assert np.array_equal(a.store.values(name), b.store.values(name)), name
    # and `maskhub apply` rebuilds the patched weights from the base, bit for bit
    applied = run_json("apply", "p2", str(dense[1]), str(tmp_path / "rebuilt"))
    assert applied["exact"] is True
    rebuilt = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    for name, t in states[2].items():
        assert torch.equal(rebuilt[name].view(torch.int16), t.view(torch.int16)), name
    # at the diff's tolerance, the mask is the diff's, strata included
    res = CliRunner().invoke(main, ["import", str(patches[0]), "--base", str(dense[0]),
                                    "--name", "step1", "--tol", "1e-5", "--json"])
    assert res.exit_code == 0, res.output
    assert " ".join(res.stderr.split()) == (
        "warning: at --tol 1e-05 the entries the patch moves by at most 1e-05 are left out, "
        "so `maskhub apply` will not rebuild the patched weights exactly; --tol 0 (the "
        "default) is lossless")
    out = json.loads(res.stdout)
    direct = run_json("diff", str(dense[0]), str(dense[1]), "--name", "direct",
                      "--device", "cpu")
    assert out["n_updated"] == direct["n_updated"] > 0
    a, b = reg.get("step1"), reg.get("direct")
    for name in b.tensor_names():
        assert np.array_equal(a[name], b[name]), name
    assert out["base_model"] == direct["base_model"] == str(dense[0].resolve())
    strata = ("select tensor, stratum, numel, n_updated from tensor_strata "
              "where mask_id = '{}' order by 1, 2")
    assert reg.sql(strata.format(a.id))[1] == reg.sql(strata.format(b.id))[1]
    assert a.metadata.extra["import"] == {"format": "patch:trl-v1",
                                          "source": "patch-1.safetensors",
                                          "base_step": 0, "target_step": 1}
    assert fail_line("import", str(patches[0])) == (
        f"Error: {patches[0]} is a sparse patch (indices + values): importing it needs "
        "--base BASE, the checkpoint it patches")


def test_bad_patches_refused_naming_the_file(tmp_path: Path) -> None:
    dense, patches, states = _build(tmp_path)
    base = str(dense[0])
    name = "model.layers.1.mlp.up_proj.weight"
    numel = states[0][name].numel()
    bad = tmp_path / "bad-range.safetensors"
    save_file({f"{name}.indices": torch.tensor([3, numel], dtype=torch.int32),
               f"{name}.values": torch.zeros(2, dtype=torch.bfloat16)}, str(bad))
    assert fail_line("trajectory", "--patches", base, str(patches[0]), str(bad)) == (
        f"Error: patch {bad}: tensor {name!r}: index {numel} is outside its {numel} "
        f"entries (shape [24, 16])")
    assert fail_line("import", str(bad), "--base", base) == (
        f"Error: patch {bad}: tensor {name!r}: index {numel} is outside its {numel} "
        f"entries (shape [24, 16])")
    # unsorted, in the file's own integer dtype: sorted first, then the ends are checked
    for idx, wrong in (([9, -1, 4], -1), ([numel + 16, 2], numel + 16)):
        for dt in (torch.int16, torch.int64):
            unsorted = tmp_path / f"unsorted-{wrong}-{dt}.safetensors"
            save_file({f"{name}.indices": torch.tensor(idx, dtype=dt),
                       f"{name}.values": torch.zeros(len(idx), dtype=torch.bfloat16)},
                      str(unsorted))
            assert fail_line("trajectory", "--patches", base, str(unsorted)) == (
                f"Error: patch {unsorted}: tensor {name!r}: index {wrong} is outside its "
                f"{numel} entries (shape [24, 16])")
    dtype = tmp_path / "dtype.safetensors"
    save_file({f"{name}.indices": torch.tensor([3], dtype=torch.int32),
               f"{name}.values": torch.zeros(1, dtype=torch.float32)}, str(dtype))
    assert fail_line("trajectory", "--patches", base, str(dtype)) == (
        f"Error: patch {dtype}: tensor {name!r}: the patch's values are float32, the base "
        "tensor is bfloat16")
    shape = tmp_path / "shape.safetensors"
    save_file({f"{name}.indices": torch.tensor([3], dtype=torch.int64),
               f"{name}.values": torch.zeros(1, dtype=torch.bfloat16)}, str(shape),
              metadata={"shapes": json.dumps({name: [16, 24]})})
    assert fail_line("trajectory", "--patches", base, str(shape)) == (
        f"Error: patch {shape}: tensor {name!r} has shape [16, 24] in the patch, [24, 16] in "
        "the base")
    twice = tmp_path / "twice.safetensors"
    save_file({f"{name}.indices": torch.tensor([7, 3, 7], dtype=torch.int64),
               f"{name}.values": torch.zeros(3, dtype=torch.bfloat16)}, str(twice))
    assert fail_line("import", str(twice), "--base", base) == (
        f"Error: patch {twice}: tensor {name!r}: index 7 is given twice")
    floats = tmp_path / "floats.safetensors"
    save_file({f"{name}.indices": torch.tensor([3.0]),
               f"{name}.values": torch.zeros(1, dtype=torch.bfloat16)}, str(floats))
    assert fail_line("import", str(floats), "--base", base) == (
        f"Error: patch {floats}: tensor {name!r}: indices are float32, not integers")
    # out of order: step 3's patch straight after step 1's
    assert fail_line("trajectory", "--patches", base, str(patches[0]), str(patches[2])) == (
        f"Error: patch {patches[2]} is out of order: it starts from step 2, the patch before "
        "it (patch-1.safetensors) leads to step 1")
    assert fail_line("trajectory", "--patches", base, str(patches[2]), str(patches[1])) == (
        f"Error: patch {patches[1]} is out of order: it leads to step 2, not after step 3 "
        "of the patch before it (patch-3.safetensors)")
    nv = tmp_path / "nvcomp.safetensors"
    save_file({f"{name}.idx": torch.zeros(8, dtype=torch.uint8),
               f"{name}.val": torch.zeros(1, dtype=torch.bfloat16)}, str(nv),
              metadata={"encoding": "nvcomp_cascaded"})
    assert fail_line("import", str(nv), "--base", base) == (
        f"Error: patch {nv}: index encoding 'nvcomp_cascaded' is not supported (maskhub "
        "reads raw, gap_delta; nvCOMP bitstreams need a GPU decoder: re-encode with "
        "encoding=raw)")
    stranger = tmp_path / "stranger.safetensors"
    save_file({"model.layers.9.mlp.up_proj.weight.indices": torch.tensor([1]),
               "model.layers.9.mlp.up_proj.weight.values": torch.zeros(1, dtype=torch.bfloat16)},
              str(stranger))
    assert fail_line("trajectory", "--patches", base, str(stranger)) == (
        f"Error: patch {stranger}: tensor 'model.layers.9.mlp.up_proj.weight' is not in the "
        f"base {base}")
    pickled = tmp_path / "step.pt"
    pickled.write_bytes(b"not opened")
    assert fail_line("trajectory", "--patches", base, str(pickled)) == (
        f"Error: patch {pickled} is not a .safetensors file (maskhub reads sparse patches "
        "from safetensors only, never pickles)")
    assert Registry().sql("select count(*) from masks")[1] == [(0,)]
    res = CliRunner().invoke(main, ["trajectory", "--help"])
    assert "--patches" in res.output
