"""Scale-out on Ray (local mode, 2 CPUs): ``diff --ray`` and ``overlap --all --ray`` give
exactly the bits, stats and counts of the single-process run, survive a failed task, and
register nothing when the tasks cannot finish."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from clitools import fail_line, run_json
from factory import llama_shapes, make_pair, plant_updates, random_state, save
from test_patch import make_pair as special_pair
from test_patch import tensor_bits

from maskhub import Registry
from maskhub.analytics import ray_overlap as rayoverlap
from maskhub.checkpoints.sources import open_checkpoint
from maskhub.diff.ray import FAIL_ONCE_ENV, plan_groups, ray_diff
from maskhub.errors import CheckpointMismatchError
from maskhub.storage.store import MaskWriter

pytest.importorskip("ray")

SWEEP = "0,1e-8,1e-3,0.1"


run = run_json
fail = fail_line


def assert_same_mask(reg: Registry, a: str, b: str) -> None:
    """Every packed array, every per-tensor row, the sweep and the totals are identical."""
    ma, mb = reg.get(a), reg.get(b)
    assert ma.tensor_names() == mb.tensor_names()
    for name in ma.tensor_names():
        pa, pb = ma.packed(name), mb.packed(name)
        assert pa.dtype == pb.dtype and np.array_equal(pa, pb), name
    assert ma.tensor_stats() == mb.tensor_stats()
    for col in ("n_params", "n_updated", "sparsity", "dtype", "tol", "n_tensors"):
        assert ma.row[col] == mb.row[col], col
    assert ma.metadata.sweep == mb.metadata.sweep
    q = ("select tensor, tol, n_updated from tensor_sweep where mask_id = '{}' "
         "order by tensor, tol")
    sweep_a = reg.sql(q.format(ma.id))[1]
    assert sweep_a and sweep_a == reg.sql(q.format(mb.id))[1]
    q = ("select tensor, layer, module, shape, numel, n_updated, sparsity, base_dtype, "
         "target_dtype from tensors where mask_id = '{}' order by tensor")
    assert reg.sql(q.format(ma.id))[1] == reg.sql(q.format(mb.id))[1]
    mb.store.validate()


def test_plan_groups_is_contiguous_balanced_and_complete() -> None:
    assert plan_groups([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
    assert plan_groups([100, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]
    assert plan_groups([1, 1, 1], 8) == [(0, 1), (1, 2), (2, 3)]
    assert plan_groups([5], 4) == [(0, 1)]
    assert plan_groups([0, 0, 7, 0], 3) == [(0, 2), (2, 3), (3, 4)]
    for sizes in ([3, 1, 4, 1, 5, 9, 2, 6], [1] * 21, [0] * 5):
        for n in (1, 2, 3, 4, 30):
            groups = plan_groups(sizes, n)
            assert groups[0][0] == 0 and groups[-1][1] == len(sizes)
            assert all(a < b for a, b in groups)
            assert all(groups[k][1] == groups[k + 1][0] for k in range(len(groups) - 1))
            assert len(groups) == min(n, len(sizes))


def test_ray_diff_is_bit_identical_and_survives_a_failed_task(
        tmp_path: Path, ray_local: object, monkeypatch: pytest.MonkeyPatch) -> None:
    base, target, planted = make_pair(tmp_path, density=0.2, shards=3)
    local = run("diff", str(base), str(target), "--name", "local", "--sweep", SWEEP,
                "--algorithm", "grpo", "--seed", "7")
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ONCE_ENV, str(marker))
    remote = run("diff", str(base), str(target), "--name", "on-ray", "--sweep", SWEEP,
                 "--algorithm", "grpo", "--seed", "7", "--ray")
    assert marker.exists()  # one task failed after writing its arrays, and was retried
    assert remote["n_updated"] == local["n_updated"] == sum(int(m.sum()) for m in
                                                            planted.values())
    reg = Registry()
    assert_same_mask(reg, "local", "on-ray")
    mask = reg.get("on-ray")
    for name, bits in planted.items():
        assert np.array_equal(mask[name], bits), name
    assert mask.row["store_url"] is None  # a local store, moved into HOME/masks
    assert Path(mask.path).is_dir() and not list((reg.home / "tmp").iterdir())


def test_ray_patch_equals_the_local_patch_and_rebuilds_the_target(
        tmp_path: Path, ray_local: object) -> None:
    # NaN payloads, +-0, inf, subnormals and a bf16 base with an fp32 target, in two shards
    base, target = special_pair(tmp_path)
    local = run("diff", str(base), str(target), "--patch", "--name", "local", "--sweep", SWEEP)
    remote = run("diff", str(base), str(target), "--patch", "--name", "on-ray", "--ray",
                 "--sweep", SWEEP)
    assert remote["n_updated"] == local["n_updated"] and remote["tol"] == 0.0
    reg = Registry()
    assert_same_mask(reg, "local", "on-ray")
    assert reg.get("on-ray").row["has_values"] is True
    out = tmp_path / "out"
    applied = run("apply", "on-ray", str(base), str(out))
    assert applied["n_values"] == local["n_updated"] and applied["exact"] is True
    assert tensor_bits(out) == tensor_bits(target / "model.safetensors")


def test_ray_diff_failure_registers_nothing(
        tmp_path: Path, ray_local: object, monkeypatch: pytest.MonkeyPatch) -> None:
    base, target, _ = make_pair(tmp_path, shards=2)
    monkeypatch.setenv(FAIL_ONCE_ENV, str(tmp_path / "no-such-dir" / "marker"))  # every try
    reg = Registry()
    with pytest.raises(RuntimeError, match="injected failure on every attempt"):
        reg.diff(base, target, name="doomed", ray="auto")
    assert reg.ls() == []
    assert not list((reg.home / "tmp").iterdir())
    assert not (reg.home / "masks").exists() or not list((reg.home / "masks").iterdir())


def test_worker_error_is_the_maskhub_error(tmp_path: Path, ray_local: object) -> None:
    """A task's own error (here: the worker sees other tensors than the driver) reaches the
    caller as that error, not retried."""
    base, target, _ = make_pair(tmp_path)
    b, t = open_checkpoint(base), open_checkpoint(target)
    name = "model.layers.1.mlp.up_proj.weight"
    b.tensors[name] = dataclasses.replace(b.tensors[name], dtype="float16")
    writer = MaskWriter(tmp_path / "store.zarr")
    with pytest.raises(CheckpointMismatchError, match="Ray worker's view") as info:
        ray_diff("auto", b, t, list(b.tensors), writer, tol=1e-5, sweep=())
    assert info.value.tensor == name


def test_ray_cli_errors(tmp_path: Path, ray_local: object) -> None:
    base, target, _ = make_pair(tmp_path)
    line = fail("diff", str(base), str(target), "--ray", "--device", "cuda")
    assert "the Ray cluster has no GPU" in line
    line = fail("diff", str(base), str(target), "--ray", "--device", "tpu")
    assert "unknown device 'tpu'" in line
    assert Registry().ls() == []
    run("diff", str(base), str(target), "--name", "a")
    run("diff", str(base), str(target), "--name", "b")
    assert "--ray applies to --all" in fail("overlap", "a", "b", "--ray")


def _masks_for_overlap(root: Path) -> list[str]:
    shapes = llama_shapes(hidden=24, inter=40)  # odd-sized tensors: padding bits matter
    shapes["model.layers.0.mlp.odd.weight"] = (13, 7)
    base = random_state(shapes, seed=3)
    base_dir = save(base, root / "base")
    out = []
    for k, density in enumerate((0.05, 0.2, 0.35)):
        target, _ = plant_updates(base, density, seed=10 + k, skip_norms=k != 2)
        out.append(str(save(target, root / f"t{k}")))
    run("diff", str(base_dir), out[0], "--name", "m0")
    run("diff", str(base_dir), out[1], "--name", "m1")
    run("diff", str(base_dir), out[2], "--name", "m2", "--tol", "0")
    return ["m0", "m1", "m2"]


def test_ray_overlap_all_matches_the_local_pass(
        tmp_path: Path, ray_local: object, monkeypatch: pytest.MonkeyPatch) -> None:
    names = _masks_for_overlap(tmp_path)
    local = run("overlap", "--all", *names)
    # tiny ranges: many per tensor, not aligned to chunks, the last one partial
    monkeypatch.setattr(rayoverlap, "range_bytes", lambda n_masks: 24)
    remote = run("overlap", "--all", *names, "--ray", "--refresh")
    assert remote["matrix"] == local["matrix"]
    keys = ("mask_a", "mask_b", "n_params", "n_tensors", "n_a", "n_b", "n_both",
            "expected_stratified", "var_stratified", "o1", "o2", "jaccard", "z_score")
    assert len(local["pairs"]) == 3
    assert [{k: p[k] for k in keys} for p in remote["pairs"]] == \
        [{k: p[k] for k in keys} for p in local["pairs"]]
    reg = Registry()
    pairs = [(0, 1), (0, 2), (1, 2)]
    expect = {}
    for i, j in pairs:
        a, b = reg.get(names[i]), reg.get(names[j])
        expect[(a.id, b.id)] = sum(int((a[t] & b[t]).sum()) for t in a.tensor_names())
    got = {(p["mask_a"], p["mask_b"]): p["n_both"] for p in remote["pairs"]}
    assert got == expect
    rows = reg.sql("select mask_a, mask_b, tensor, n_a, n_b, n_both from tensor_overlaps "
                   "order by all")[1]
    assert len(rows) == 3 * len(reg.get("m0").tensor_names())


def test_ray_keeps_its_own_log_lines_off_the_terminal(tmp_path: Path) -> None:
    """issue 26: ``maskhub diff --ray`` in a fresh process, which starts its own local Ray:
    Ray's log lines (``... INFO worker.py:... -- Started a local Ray instance``, warnings)
    and the workers' forwarded output (``(task pid=...)``) reach neither stdout nor stderr;
    the command prints its own result only. (A new Ray costs ~5-15 s: one run.)"""
    import json
    import os
    import re
    import subprocess
    import sys

    base, target, _ = make_pair(tmp_path, density=0.2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["MASKHUB_HOME"] = str(tmp_path / "home")
    run_cli = "import sys; sys.argv[0] = 'maskhub'; from maskhub.entry import run; run()"
    proc = subprocess.run([sys.executable, "-c", run_cli, "diff", str(base), str(target),
                           "--name", "quiet", "--ray", "--json"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["name"] == "quiet"
    ray_lines = [line for line in proc.stderr.splitlines()
                 if re.search(r"\b(INFO|WARNING|DEBUG)\b .*\.py:\d+ --|\bpid=\d+\)", line)]
    assert ray_lines == []
    assert proc.stderr.strip() == ""
