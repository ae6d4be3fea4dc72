"""The precision null of a diff: entries whose smallest recordable step at |θ0| exceeds the
run's movement budget could not have changed. Hand-built tensors at known exponents; every
expected count is worked out in the comments."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from clitools import fail_line, run_json
from factory import save

from maskhub.cli import main
from maskhub.kernels import fastkernel
from maskhub.kernels.precision import delta_max_fn, min_change, null_counts
from maskhub.schemas.metadata import BITORDER

W, NORM = "model.layers.0.mlp.up_proj.weight", "model.norm.weight"


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_smallest_step_per_exponent() -> None:
    # bf16, 7 mantissa bits: |θ0| in [2^e, 2^(e+1)) records at least 2^(e-8) (the step down
    # from an exact power of two); 1.0 is exponent field 127.
    assert min_change(127, "bfloat16", "bfloat16") == 2.0 ** -8
    assert min_change(117, "bfloat16", "bfloat16") == 2.0 ** -18
    # the smallest normal binade steps down into the subnormals: a whole step 2^-133
    assert min_change(1, "bfloat16", "bfloat16") == 2.0 ** -133
    assert min_change(2, "bfloat16", "bfloat16") == 2.0 ** -133
    assert min_change(0, "bfloat16", "bfloat16") == 2.0 ** -133  # zero and subnormals
    assert min_change(255, "bfloat16", "bfloat16") == 0.0  # inf/NaN: always movable
    assert min_change(15, "float16", "float16") == 2.0 ** -11  # 1.0 in fp16
    assert min_change(0, "float16", "float16") == 2.0 ** -24
    assert min_change(127, "float32", "float32") == 2.0 ** -24
    assert min_change(127, "bfloat16", "float32") == 2.0 ** -24  # an fp32 target records more
    assert min_change(15, "float16", "float32") == 2.0 ** -24
    assert min_change(127, "float32", "bfloat16") is None  # rounding: any change can show
    assert min_change(0, "int8", "int8") is None
    # strict: a budget equal to the step leaves the binade movable
    assert null_counts([(127, 4, 0), (117, 6, 2)], "bfloat16", "bfloat16", 2.0 ** -8) == (0, 0)
    assert null_counts([(127, 4, 0), (117, 6, 2)], "bfloat16", "bfloat16", 2.0 ** -9) == (4, 0)
    assert null_counts([(127, 4, 0), (117, 6, 2)], "bfloat16", "bfloat16", 0.0) == (10, 2)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str]:
    """W (bf16): 4 entries at 2^-10 (field 117, step 2^-18), 4 at 1.0 (127, step 2^-8),
    2 at 0.125 (124, step 2^-11), 2 zeros (step 2^-133). Entries 0 and 1 move by 2^-16 (two
    ulps at 2^-10: updated at tol 1e-5); zero entry 10 moves by 2^-20 (below tol). NORM: 4
    ones, unchanged. Largest |Δ| among the updated entries: 2^-16."""
    w = torch.tensor([2.0 ** -10] * 4 + [1.0] * 4 + [0.125] * 2 + [0.0] * 2,
                     dtype=torch.bfloat16)
    t = w.clone()
    t[0] += 2.0 ** -16
    t[1] += 2.0 ** -16
    t[10] = 2.0 ** -20
    norm = torch.ones(4, dtype=torch.bfloat16)
    save({W: w, NORM: norm}, tmp_path / "base.safetensors")
    save({W: t, NORM: norm}, tmp_path / "t.safetensors")
    return str(tmp_path / "base.safetensors"), str(tmp_path / "t.safetensors")


def _masks() -> list[dict]:
    return json.loads(run("sql", "select name, max_abs_update, null_budget, null_budget_source, "
                                 "n_null, n_null_updated, null_share, sparsity_movable "
                                 "from masks order by name", "--format", "json"))


def _tensors(name: str) -> list[tuple]:
    rows = json.loads(run("sql", "select t.tensor, t.max_abs_update, t.n_null, "
                                 "t.n_null_updated, t.sparsity_movable from tensors t "
                                 f"join masks m on m.id = t.mask_id where m.name = '{name}' "
                                 "order by 1", "--format", "json"))
    return [tuple(r.values()) for r in rows]


def test_observed_budget(pair: tuple[str, str]) -> None:
    out = run("diff", *pair, "--name", "obs")
    # null at 2^-16: binades 2^0 (step 2^-8: 4 in W + 4 in NORM) and 2^-3 (2^-11: 2) = 10 of
    # 16; movable 6 (4 at 2^-10, 2 zeros), 2 of them updated: sparsity 4/6.
    assert "precision null at budget 1.53e-05 (observed): 10 parameters (62.50%) could not " \
           "have changed, sparsity among the rest 66.67%" in out
    assert _masks() == [{"name": "obs", "max_abs_update": 2.0 ** -16,
                         "null_budget": 2.0 ** -16, "null_budget_source": "observed",
                         "n_null": 10, "n_null_updated": 0, "null_share": 10 / 16,
                         "sparsity_movable": 1 - 2 / 6}]
    assert _tensors("obs") == [(W, 2.0 ** -16, 6, 0, 1 - 2 / 6), (NORM, 0.0, 4, 0, None)]
    info = run_json("show", "obs", "--json")
    assert info["mask"]["n_null"] == 10
    assert [(r["stratum"], r["exponent"], r["numel"], r["n_updated"], r["rate"], r["null"])
            for r in info["by_exponent"]] == [
        (0, None, 2, 0, 0.0, False), (117, -10, 4, 2, 0.5, False), (124, -3, 2, 0, 0.0, True),
        (127, 0, 8, 0, 0.0, True)]
    shown = run("show", "obs")
    assert "could not have changed   │ 10 (62.50%)" in shown
    assert "update rate per exponent of |θ0|" in shown


def test_given_budgets(pair: tuple[str, str]) -> None:
    out = run_json("diff", *pair, "--name", "wide", "--budget", "1e-3", "--json")
    assert {k: out[k] for k in ("null_budget", "null_budget_source", "n_null", "null_share",
                                "sparsity_movable")} == {
        "null_budget": 1e-3, "null_budget_source": "given", "n_null": 8, "null_share": 0.5,
        "sparsity_movable": 0.75}
    run("diff", *pair, "--name", "narrow", "--budget", "1e-6")
    narrow, wide = _masks()
    # 1e-3: only the 2^0 binade (step 3.9e-3) is null: 8; movable 8, 2 updated.
    assert wide == {"name": "wide", "max_abs_update": 2.0 ** -16, "null_budget": 1e-3,
                    "null_budget_source": "given", "n_null": 8, "n_null_updated": 0,
                    "null_share": 0.5, "sparsity_movable": 0.75}
    # 1e-6: 2^0, 2^-3 and 2^-10 (step 3.8e-6) are null: 14, the 2 updated entries among them;
    # movable: the 2 zeros, none updated.
    assert narrow == {"name": "narrow", "max_abs_update": 2.0 ** -16, "null_budget": 1e-6,
                      "null_budget_source": "given", "n_null": 14, "n_null_updated": 2,
                      "null_share": 14 / 16, "sparsity_movable": 1.0}
    assert _tensors("narrow") == [(W, 2.0 ** -16, 10, 2, 1.0), (NORM, 0.0, 4, 0, None)]


def test_fp32_masters_have_their_own_steps(tmp_path: Path) -> None:
    # fp32 1.0 moved by 2^-20 (updated at tol 1e-7): fp32 steps at 1.0 are 2^-24, so nothing
    # is null; an fp32 entry at 2^10 (step 2^-14) is.
    base = torch.tensor([1.0, 1.0, 1024.0, 1024.0], dtype=torch.float32)
    target = base.clone()
    target[0] += 2.0 ** -20
    save({W: base}, tmp_path / "b.safetensors")
    save({W: target}, tmp_path / "t.safetensors")
    run("diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"),
        "--name", "fp32", "--tol", "1e-7")
    assert _masks()[0] == {"name": "fp32", "max_abs_update": 2.0 ** -20,
                           "null_budget": 2.0 ** -20, "null_budget_source": "observed",
                           "n_null": 2, "n_null_updated": 0, "null_share": 0.5,
                           "sparsity_movable": 0.5}


def test_no_null_for_a_rounded_target(tmp_path: Path) -> None:
    base = torch.tensor([1.0, 2.0], dtype=torch.float32)
    save({W: base}, tmp_path / "b.safetensors")
    save({W: (base + 0.5).to(torch.bfloat16)}, tmp_path / "t.safetensors")
    run("diff", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--name", "x")
    assert _masks()[0]["n_null"] is None
    assert _tensors("x") == [(W, 0.5, None, None, None)]


def test_budget_must_be_a_number(pair: tuple[str, str]) -> None:
    assert fail_line("diff", *pair, "--budget", "-1") == \
        "Error: budget must be a finite number >= 0, not -1.0"


@pytest.mark.parametrize("dtypes", [("bfloat16", "bfloat16"), ("float16", "float16"),
                                    ("float32", "float32"), ("bfloat16", "float32")])
def test_largest_delta_kernels_agree(dtypes: tuple[str, str]) -> None:
    rng = np.random.default_rng(0)
    n = 1000 + 13
    tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    a = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(tdt[dtypes[0]])
    b = (a.float() + torch.from_numpy(rng.standard_normal(n).astype(np.float32))
         * 1e-3).to(tdt[dtypes[1]])
    a[5] = float("nan")
    b[7] = float("nan")
    sel = rng.random(n) < 0.3
    sel[[5, 7]] = True
    packed = np.packbits(sel, bitorder=BITORDER)
    d = (b.double() - a.double()).abs().numpy()[sel]
    expected = float(np.nanmax(d))
    raw = [t.view(torch.uint8).numpy() if t.dtype != torch.float32
           else t.numpy().view(np.uint8) for t in (a, b)]
    backends = ["numpy"] + (["numba"] if fastkernel.HAVE_NUMBA else [])
    for backend in backends:
        fn = delta_max_fn(*dtypes, backend)
        assert fn is not None
        assert fn(raw[0], raw[1], packed, n) == expected, backend
        assert fn(raw[0], raw[1], np.zeros_like(packed), n) == 0.0
    assert delta_max_fn("int8", "int8", "numpy") is None
    assert math.isfinite(expected)


def test_show_beside_the_fp32_control(tmp_path: Path) -> None:
    """A run's bf16 checkpoint and its fp32 masters: every master entry moved by 1e-4; the
    bf16 cast keeps the moves at 2^-10 (steps of 2^-17) and loses those at 1.0 (half a step
    there is 2^-9)."""
    theta0 = torch.tensor([2.0 ** -10] * 4 + [1.0] * 4, dtype=torch.bfloat16)
    master = theta0.float() + 1e-4
    save({W: theta0}, tmp_path / "b16.safetensors")
    save({W: master.to(torch.bfloat16)}, tmp_path / "t16.safetensors")
    save({W: theta0.float()}, tmp_path / "b32.safetensors")
    save({W: master}, tmp_path / "t32.safetensors")
    run("diff", str(tmp_path / "b16.safetensors"), str(tmp_path / "t16.safetensors"),
        "--name", "dpo")
    run("diff", str(tmp_path / "b32.safetensors"), str(tmp_path / "t32.safetensors"),
        "--name", "dpo-fp32")
    moved16 = float((master.to(torch.bfloat16).double() - theta0.double()).abs().max())
    info = run_json("show", "dpo", "--control", "dpo-fp32", "--json")["control"]
    figures = {r["figure"]: (r["mask"], r["control"]) for r in info["figures"]}
    assert info["same_base"] is False
    assert figures["n_updated"] == (4, 8)
    assert figures["sparsity"] == (0.5, 0.0)
    assert figures["max_abs_update"][0] == moved16 == 13 * 2.0 ** -17
    assert figures["n_null"] == (4, 0)  # bf16: the four ones; fp32 steps at 1.0 are 2^-24
    assert figures["sparsity_movable"] == (0.0, 0.0)
    assert info["by_module"] == [{"module": "mlp.up_proj", "param_kind": "weight", "numel": 8,
                                  "sparsity": 0.5, "control_sparsity": 0.0}]
    out = run("show", "dpo", "--control", "dpo-fp32")
    assert out.splitlines()[0] == "note: dpo and dpo-fp32 were diffed from different base " \
                                  "files (as a bf16 checkpoint and its fp32 masters are)"
    save({NORM: theta0}, tmp_path / "other.safetensors")
    run("diff", str(tmp_path / "other.safetensors"), str(tmp_path / "other.safetensors"),
        "--name", "other")
    assert fail_line("show", "dpo", "--control", "other") == \
        "Error: dpo and other cover different tensors (first: 'model.layers.0.mlp.up_proj." \
        "weight'): not a control of one another"


def test_plot_of_the_update_rate_per_exponent(pair: tuple[str, str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run("diff", *pair, "--name", "obs")
    out = run_json("plot", "obs", "--kind", "exponents", "-o", str(tmp_path / "e.png"), "--json")
    assert out["kind"] == "exponents" and out["path"] == str(tmp_path / "e.png")
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fail_line("plot", "obs", "obs", "--kind", "exponents") == \
        "Error: an exponents plot shows exactly one mask"


@pytest.mark.parametrize("dtypes", [("bfloat16", "bfloat16"), ("float16", "float16"),
                                    ("float32", "float32"), ("bfloat16", "float32"),
                                    ("bfloat16", "int8")])
@pytest.mark.parametrize("entries", [True, False])
def test_chunk_stats_in_one_walk_agree(dtypes: tuple[str, str], entries: bool) -> None:
    """The pipeline's per-chunk strata and largest |Δ| (one walk with numba) are those of
    the separate strata and |Δ| functions, on every backend."""
    from maskhub.kernels.chunkstats import chunk_stats_fn
    from maskhub.kernels.strata import BINS, strata_fn

    rng = np.random.default_rng(1)
    n = 64 * 8 * 3 + 13  # whole 64-bit words, then a tail of bytes and bits
    tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    a = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 0.02).to(tdt[dtypes[0]])
    a[5], a[9] = float("nan"), float("inf")
    raw_a = a.view(torch.uint8).numpy() if a.dtype != torch.float32 else \
        a.numpy().view(np.uint8)
    if dtypes[1] == "int8":
        raw_b = rng.integers(-128, 127, n, dtype=np.int8).view(np.uint8)
    else:
        b = (a.float() + torch.from_numpy(rng.standard_normal(n).astype(np.float32))
             * 1e-3).to(tdt[dtypes[1]])
        b[7] = float("nan")
        raw_b = b.view(torch.uint8).numpy() if b.dtype != torch.float32 else \
            b.numpy().view(np.uint8)
    sel = rng.random(n) < 0.3
    sel[[5, 7, 9, n - 1]] = True
    packed = np.packbits(sel, bitorder=BITORDER)
    expected = np.zeros((2, BINS), np.int64)
    strata_fn(dtypes[0], "numpy", entries)(raw_a, packed, n, expected)
    dfn = delta_max_fn(*dtypes, "numpy")
    expected_d = None if dfn is None else dfn(raw_a, raw_b, packed, n)
    assert (expected_d is None) == (dtypes[1] == "int8")
    backends = ["numpy"] + (["numba"] if fastkernel.HAVE_NUMBA else [])
    for backend in backends:
        out = np.zeros((2, BINS), np.int64)
        d = chunk_stats_fn(*dtypes, backend, entries)(raw_a, raw_b, packed, n, out)
        assert d == expected_d, backend
        assert (out == expected).all(), backend
        assert int(out[1].sum()) == int(sel.sum())
