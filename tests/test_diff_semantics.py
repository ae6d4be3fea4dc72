"""Exact diff semantics: tolerance edges, ±0, NaN, inf, dtypes, sweep; through the API and CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factory import make_pair, save

from maskhub import Registry
from maskhub.cli import main

NAN, INF = float("nan"), float("inf")

# (base, target) pairs and whether each is updated at tol = 1e-5.
EDGE_CASES = [
    (0.0, -0.0, False),  # +0 and -0 are equal
    (NAN, NAN, False),  # NaN vs NaN: unchanged
    (NAN, 1.0, True),  # NaN vs number: updated
    (1.0, NAN, True),
    (INF, INF, False),  # equal infinities
    (INF, -INF, True),
    (INF, 1.0, True),
    (0.5, 0.5, False),
    (0.0, 0.5, True),
]


def _fp32_edges(tol: float) -> tuple[list[float], list[float], list[bool]]:
    """fp32 values whose exact difference lies just under, at, and just over ``tol``."""
    base, target, expect = [], [], []
    for a, b, u in EDGE_CASES:
        base.append(a)
        target.append(b)
        expect.append(u)
    for x in (0.0, 1e-3, -2e-4, 3.0e-6):
        x32 = float(np.float32(x))
        up = float(np.float32(x32 + tol))
        for y in (
            up,
            float(np.nextafter(np.float32(up), np.float32(np.inf))),
            float(np.nextafter(np.float32(up), np.float32(-np.inf))),
        ):
            base.append(x32)
            target.append(y)
            expect.append(abs(np.float64(y) - np.float64(x32)) > tol)
    return base, target, expect


def _write(tmp_path: Path, base: dict, target: dict, shards: int = 1) -> tuple[Path, Path]:
    return save(base, tmp_path / "b", shards), save(target, tmp_path / "t", shards)


def test_fp32_tolerance_edges_exact(tmp_path: Path) -> None:
    b, t, expect = _fp32_edges(1e-5)
    assert any(expect) and not all(expect)
    base = {"w": torch.tensor(b, dtype=torch.float32), "model.norm.weight": torch.ones(8)}
    target = {"w": torch.tensor(t, dtype=torch.float32), "model.norm.weight": torch.ones(8)}
    bp, tp = _write(tmp_path, base, target)
    mask = Registry().diff(bp, tp, name="edges")
    assert mask["w"].tolist() == expect
    assert not mask["model.norm.weight"].any()
    assert mask.n_updated == sum(expect)
    assert mask.n_params == len(expect) + 8
    norm = [s for s in mask.tensor_stats() if s.tensor == "model.norm.weight"][0]
    assert (norm.n_updated, norm.sparsity, norm.module, norm.layer) == (0, 1.0, "norm", None)


def test_bf16_values_up_cast_before_subtracting(tmp_path: Path) -> None:
    # 1.0 and the next bf16 value differ by 2^-7; 1e-5-scale values differ by less than 1e-5
    # in one bf16 step (2^-24 at 2^-17), which a bf16 subtraction would still get right, but
    # 1.0 + 2^-7 vs 1.0 at tol 0.005 must be updated and at tol 0.01 not.
    one = torch.tensor([1.0], dtype=torch.bfloat16)
    nxt = torch.tensor([1.0 + 2**-7], dtype=torch.bfloat16)
    small = torch.tensor([2**-17], dtype=torch.bfloat16)
    small_next = torch.tensor([2**-17 + 2**-24], dtype=torch.bfloat16)
    base = {"a": torch.cat([one, small, torch.tensor([0.0, NAN], dtype=torch.bfloat16)])}
    target = {"a": torch.cat([nxt, small_next, torch.tensor([-0.0, NAN], dtype=torch.bfloat16)])}
    bp, tp = _write(tmp_path, base, target)
    reg = Registry()
    assert reg.diff(bp, tp, tol=0.005, name="t1")["a"].tolist() == [True, False, False, False]
    assert reg.diff(bp, tp, tol=0.01, name="t2")["a"].tolist() == [False, False, False, False]
    assert reg.diff(bp, tp, tol=0, name="t3")["a"].tolist() == [True, True, False, False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shards", [1, 3])
def test_planted_updates_every_bit(tmp_path: Path, dtype: torch.dtype, shards: int) -> None:
    base, target, planted = make_pair(tmp_path, density=0.15, dtype=dtype, shards=shards)
    mask = Registry().diff(base, target, name="planted", algorithm="grpo", seed=3)
    assert sorted(mask.tensor_names()) == sorted(planted)
    total = 0
    for name, expect in planted.items():
        got = mask[name]
        assert got.shape == expect.shape and got.dtype == bool
        assert np.array_equal(got, expect), name
        total += int(expect.sum())
    assert mask.n_updated == total
    assert mask.n_params == sum(m.size for m in planted.values())
    assert mask.sparsity == pytest.approx(1 - total / mask.n_params, abs=0)
    assert mask.row["dtype"] == str(dtype).removeprefix("torch.")
    stats = {s.tensor: s for s in mask.tensor_stats()}
    q = stats["model.layers.1.self_attn.q_proj.weight"]
    assert (q.layer, q.module, q.shape) == (1, "self_attn.q_proj", (16, 16))
    assert q.n_updated == int(planted[q.tensor].sum())


def test_mixed_dtypes_recorded(tmp_path: Path) -> None:
    vals = torch.tensor([0.1, 0.2, 0.3, 0.4])
    base = {"w": vals.to(torch.bfloat16)}
    # The fp32 target holds the bf16 values exactly except entry 2.
    t = vals.to(torch.bfloat16).to(torch.float32)
    t[2] += 1e-3
    bp, tp = _write(tmp_path, base, {"w": t})
    mask = Registry().diff(bp, tp, name="mixed")
    assert mask["w"].tolist() == [False, False, True, False]
    assert mask.row["dtype"] == "bfloat16->float32"
    st = mask.tensor_stats()[0]
    assert (st.base_dtype, st.target_dtype) == ("bfloat16", "float32")


def test_sweep_counts_per_tolerance(tmp_path: Path) -> None:
    # Differences of exactly known size: 0, 1e-9, 5e-8, 5e-7, 5e-6, 5e-5 (in float64 terms,
    # fp32 values chosen so the exact difference straddles each tolerance clearly).
    deltas = [0.0, 1e-9, 5e-8, 5e-7, 5e-6, 5e-5]
    base = torch.zeros(len(deltas), dtype=torch.float32)
    target = torch.tensor(deltas, dtype=torch.float32)
    bp, tp = _write(
        tmp_path,
        {"model.layers.0.mlp.up_proj.weight": base},
        {"model.layers.0.mlp.up_proj.weight": target},
    )
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "diff",
            str(bp),
            str(tp),
            "--name",
            "sw",
            "--tol",
            "1e-6",
            "--sweep",
            "0,1e-8,1e-7,1e-6,1e-5",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["n_updated"] == 2
    res = runner.invoke(main, ["show", "sw", "--json"])
    info = json.loads(res.output)
    assert [(r["tol"], r["n_updated"]) for r in info["sweep"]] == [
        (0.0, 5),
        (1e-8, 4),
        (1e-7, 3),
        (1e-6, 2),
        (1e-5, 1),
    ]
    res = runner.invoke(
        main, ["sql", "select tol, n_updated from tensor_sweep order by tol", "--format", "csv"]
    )
    assert res.output.splitlines() == [
        "tol,n_updated",
        "0.0,5",
        "1e-08,4",
        "1e-07,3",
        "1e-06,2",
        "1e-05,1",
    ]


def test_tol_zero_means_changed(tmp_path: Path) -> None:
    base = {"w": torch.tensor([1.0, 2.0, 0.0], dtype=torch.float16)}
    target = {"w": torch.tensor([1.0, 2.0 + 2**-9, -0.0], dtype=torch.float16)}
    bp, tp = _write(tmp_path, base, target)
    assert Registry().diff(bp, tp, tol=0)["w"].tolist() == [False, True, False]


def test_invalid_tolerance_is_user_error(tmp_path: Path) -> None:
    base, target, _ = make_pair(tmp_path)
    res = CliRunner().invoke(main, ["diff", str(base), str(target), "--tol", "-1"])
    assert res.exit_code == 1
    assert "tolerance must be a finite number" in res.output
    assert math.isfinite(1.0)
