"""``maskhub diff --rank --stats``: update rank (Table 2), sign flips and |Δ| per tensor,
stored in ``tensor_analysis`` and summarised by ``show``; driven through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from maskhub import Registry
from maskhub.cli import main

ROWS, COLS = 40, 24


def _low_rank(rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, rank, generator=g) @ torch.randn(rank, COLS, generator=g)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """fp32 checkpoints with updates of rank 3, full rank and 0, plus a 1-D tensor whose
    sign flips and |Δ| are known exactly."""
    g = torch.Generator().manual_seed(0)
    base = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(ROWS, COLS, generator=g),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(ROWS, COLS, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(ROWS, COLS, generator=g),
        "model.layers.0.input_layernorm.weight":
            torch.tensor([1.0, -1.0, 2.0, 0.0, 3.0, -0.5, 1.0, 4.0]),
    }
    target = {
        "model.layers.0.self_attn.q_proj.weight":
            base["model.layers.0.self_attn.q_proj.weight"] + _low_rank(3, 1),
        "model.layers.0.self_attn.k_proj.weight":
            base["model.layers.0.self_attn.k_proj.weight"] + _low_rank(COLS, 2),
        "model.layers.0.mlp.up_proj.weight": base["model.layers.0.mlp.up_proj.weight"].clone(),
        # flips at 0 (1 -> -1) and 5 (-0.5 -> 0.5); 0 -> 1 at 3 is not a strict flip;
        # 1 -> 1 + 2^-10 at 6 is below one bf16 step at 1.0 (2^-7).
        "model.layers.0.input_layernorm.weight":
            torch.tensor([-1.0, -1.0, 2.5, 1.0, 3.0, 0.5, 1.0 + 2.0 ** -10, 4.0]),
    }
    b, t = tmp_path / "base.safetensors", tmp_path / "target.safetensors"
    save_file(base, str(b))
    save_file(target, str(t))
    return b, t


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_rank_and_stats_are_stored_and_shown(pair: tuple[Path, Path]) -> None:
    base, target = pair
    _cli("diff", str(base), str(target), "--name", "r", "--rank", "--stats", "--device", "cpu")
    rows = json.loads(_cli("sql", "select * from tensor_analysis order by tensor", "--json"))
    by = {r["tensor"]: r for r in rows}
    assert len(rows) == 4

    q = by["model.layers.0.self_attn.q_proj.weight"]
    assert (q["rank"], q["max_rank"]) == (3, COLS)
    assert q["rank_fraction"] == pytest.approx(3 / COLS)
    assert q["rank_rtol"] == pytest.approx(ROWS * torch.finfo(torch.float32).eps)
    k = by["model.layers.0.self_attn.k_proj.weight"]
    assert (k["rank"], k["rank_fraction"]) == (COLS, 1.0)
    up = by["model.layers.0.mlp.up_proj.weight"]
    assert (up["rank"], up["sign_flips"], up["max_abs_delta"]) == (0, 0, 0.0)

    norm = by["model.layers.0.input_layernorm.weight"]
    assert norm["rank"] is None and norm["max_rank"] is None  # 1-D: no rank
    assert norm["sign_flips"] == 2
    step = 2.0 ** -10
    assert norm["mean_abs_delta"] == pytest.approx((2 + 0.5 + 1 + 1 + step) / 8, rel=1e-12)
    assert norm["max_abs_delta"] == 2.0
    # |Δ|/|θ0| over changed entries with θ0 != 0: 2/1, 0.5/2, 1/0.5, step/1
    assert norm["mean_rel_delta"] == pytest.approx((2 + 0.25 + 2 + step) / 4, rel=1e-12)
    assert norm["max_rel_delta"] == 2.0
    assert norm["n_sub_bf16_step"] == 1

    info = json.loads(_cli("show", "r", "--json"))["analysis"]
    assert info["n_rank_tensors"] == 3
    assert info["mean_rank_fraction"] == pytest.approx((3 / COLS + 1 + 0) / 3)
    assert info["min_rank_fraction"] == 0.0
    flips, max_delta = _reference(base, target)
    assert flips > 2  # the random 2-D updates flip signs too
    assert info["sign_flips"] == flips == sum(r["sign_flips"] for r in rows)
    assert info["max_abs_delta"] == pytest.approx(max_delta, rel=1e-6)

    text = _cli("show", "r")
    assert "mean update rank" in text and f"{100 * (3 / COLS + 1) / 3:.2f}%" in text
    assert "sign flips" in text


def _reference(base: Path, target: Path) -> tuple[int, float]:
    """Total strict sign flips and max |Δ| in float64."""
    from safetensors.torch import load_file

    a, b = load_file(str(base)), load_file(str(target))
    flips = sum(int((a[n].double() * b[n].double() < 0).sum()) for n in a)
    return flips, max(float((b[n].double() - a[n].double()).abs().max()) for n in a)


def test_without_flags_nothing_is_recorded_and_rm_cleans_up(pair: tuple[Path, Path]) -> None:
    base, target = pair
    _cli("diff", str(base), str(target), "--name", "plain")
    assert json.loads(_cli("show", "plain", "--json"))["analysis"] is None
    _cli("diff", str(base), str(target), "--name", "ranked", "--rank")
    info = json.loads(_cli("show", "ranked", "--json"))["analysis"]
    assert info["n_rank_tensors"] == 3 and info["sign_flips"] is None
    _cli("rm", "ranked")
    assert json.loads(_cli("sql", "select count(*) as n from tensor_analysis", "--json")) \
        == [{"n": 0}]


def test_rank_of_a_bf16_update(tmp_path: Path) -> None:
    """bf16 inputs are up-cast before subtracting: a rank-2 update survives bf16 storage
    of a base whose own values are exactly representable."""
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-8, 8, (32, 16), generator=g).to(torch.bfloat16)
    u = torch.randint(-2, 3, (32, 2), generator=g).float()
    v = torch.randint(-2, 3, (2, 16), generator=g).float()
    b = (a.float() + u @ v).to(torch.bfloat16)  # small integers: exact in bf16
    assert torch.equal(b.float() - a.float(), u @ v)
    save_file({"model.layers.0.mlp.down_proj.weight": a}, str(tmp_path / "a.safetensors"))
    save_file({"model.layers.0.mlp.down_proj.weight": b}, str(tmp_path / "b.safetensors"))
    _cli("diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
         "--name", "bf", "--rank")
    rows = json.loads(_cli("sql", "select rank, max_rank from tensor_analysis", "--json"))
    assert rows == [{"rank": int(torch.linalg.matrix_rank(u @ v)), "max_rank": 16}]


def test_sub_bf16_step_counts_the_step_in_the_direction_of_the_move(tmp_path: Path) -> None:
    """From an exact power of two the bf16 step toward zero is half the step away from it:
    1.0 -> 0.99609375 (1 - 2^-8) is one whole step down, never "below one bf16 step"."""
    down = [1.0, 2.0 ** -3, -4.0, 1.0]
    base = torch.tensor(down, dtype=torch.bfloat16)
    moved = torch.tensor([1 - 2.0 ** -8, 2.0 ** -3 * (1 - 2.0 ** -8), -4.0 * (1 - 2.0 ** -8),
                          1 + 2.0 ** -7], dtype=torch.bfloat16)
    assert moved.float().tolist() == [0.99609375, 0.12451171875, -3.984375, 1.0078125]
    save_file({"w": base}, str(tmp_path / "a.safetensors"))
    save_file({"w": moved}, str(tmp_path / "b.safetensors"))
    _cli("diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--name",
         "bf", "--stats")
    # fp32 targets: 1.0 down by 2^-10 (a quarter of the step below, 2^-8), 2^-3 up by 2^-12
    # and 1.0 up by 2^-9 are below one step in their direction; -4.0 toward zero by 2^-6 is
    # one whole step (the step away from zero there is 2^-5: the old count said 4).
    save_file({"w": base.float()}, str(tmp_path / "c.safetensors"))
    save_file({"w": torch.tensor([1 - 2.0 ** -10, 2.0 ** -3 + 2.0 ** -12, -4.0 + 2.0 ** -6,
                                  1 + 2.0 ** -9])}, str(tmp_path / "d.safetensors"))
    _cli("diff", str(tmp_path / "c.safetensors"), str(tmp_path / "d.safetensors"), "--name",
         "fp", "--stats")
    rows = {r["name"]: r["n_sub_bf16_step"] for r in json.loads(_cli(
        "sql", "select m.name, a.n_sub_bf16_step from tensor_analysis a join masks m "
               "on m.id = a.mask_id", "--json"))}
    assert rows == {"bf": 0, "fp": 3}


def test_show_keeps_weight_and_bias_apart_and_the_block_rank_mean(tmp_path: Path) -> None:
    """Qwen2's q_proj has a weight and a bias: two rows of the per-module table. The Table 2
    mean rank covers the transformer blocks; embed_tokens is reported on its own."""
    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(12, 4, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g),
            "model.layers.0.self_attn.q_proj.bias": torch.randn(4, generator=g)}
    target = {k: v.clone() for k, v in base.items()}
    target["model.embed_tokens.weight"][0] += 1.0  # one token seen: rank 1 of 4
    target["model.layers.0.self_attn.q_proj.weight"] += torch.eye(4)  # rank 4 of 4
    target["model.layers.0.self_attn.q_proj.bias"][:2] += 1.0
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(target, str(tmp_path / "b.safetensors"))
    _cli("diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--name",
         "q", "--rank")
    info = json.loads(_cli("show", "q", "--json"))
    rows = [(r["module"], r["param_kind"], r["numel"], r["n_updated"])
            for r in info["by_module"]]
    assert rows == [("embed_tokens", "weight", 48, 4), ("self_attn.q_proj", "weight", 16, 4),
                    ("self_attn.q_proj", "bias", 4, 2)]
    a = info["analysis"]
    assert (a["n_rank_tensors"], a["n_block_rank_tensors"]) == (2, 1)
    assert a["mean_rank_fraction"] == 1.0 and a["mean_rank_fraction_other"] == 0.25
    assert a["rank_other"] == [{"tensor": "model.embed_tokens.weight", "rank": 1,
                                "max_rank": 4, "rank_fraction": 0.25}]
    text = _cli("show", "q")
    assert "mean update rank, transformer blocks (1 matrices; Table 2)" in text
    assert "update rank of model.embed_tokens.weight (outside the blocks)" in text


def test_compare_counts_equal_entries_inside_and_outside_a_mask(tmp_path: Path) -> None:
    """θ_sub vs θ_full: 8 entries, the mask covers 0-3. B differs from A by 2e-5 at entry 0
    (inside), 5e-5 at entry 4 (outside) and 1 at entry 5 (outside)."""
    base = torch.zeros(8, dtype=torch.float64)
    full = base.clone()
    full[:4] = 1.0  # the mask: the full run's updates
    sub = full.clone()
    b = sub.clone()
    b[0] += 2e-5
    b[4] += 5e-5
    b[5] += 1.0
    for name, t in (("base", base), ("full", full), ("a", sub), ("b", b)):
        save_file({"w": t}, str(tmp_path / f"{name}.safetensors"))
    _cli("diff", str(tmp_path / "base.safetensors"), str(tmp_path / "full.safetensors"),
         "--name", "m")
    out = json.loads(_cli("compare", str(tmp_path / "a.safetensors"),
                          str(tmp_path / "b.safetensors"), "--mask", "m", "--tol", "1e-5",
                          "--tol", "1e-4", "--json"))
    t5, t4 = out["tolerances"]
    assert (t5["tol"], t5["n_params"], t5["n_equal"], t5["n_inside"], t5["n_equal_inside"],
            t5["n_outside"], t5["n_equal_outside"]) == (1e-5, 8, 5, 4, 3, 4, 2)
    assert (t5["frac_equal"], t5["frac_equal_inside"], t5["frac_equal_outside"]) == \
        (5 / 8, 3 / 4, 2 / 4)
    assert (t4["n_equal"], t4["n_equal_inside"], t4["n_equal_outside"]) == (7, 4, 3)
    text = _cli("compare", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert "62.50%" in text and "inside mask" not in text
    _, rows = Registry().sql("select count(*) from masks")
    assert rows == [(1,)]  # compare registered nothing
