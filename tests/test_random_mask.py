"""``combine random --like MASK``: a seeded random-placement control with the mask's exact
count per tensor, or per tensor and exponent of |θ0|, registered with its lineage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from clitools import fail_line, run_json
from factory import save

from maskhub import Registry
from maskhub.analytics import random_mask
from maskhub.analytics.random_mask import split_count
from maskhub.cli import main
from maskhub.schemas.metadata import BITORDER

BIG, SMALL_T = "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"
NORM = "model.norm.weight"
BLOCK = 4096  # placement blocks made small (the tests run in-process): BIG spans two
N_BIG = BLOCK + BLOCK // 4 + 5  # and ends on a partial byte


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _exponents(t: torch.Tensor) -> np.ndarray:
    return ((t.view(torch.int16).numpy().view(np.uint16) >> 7) & 0xFF).astype(np.int64)


@pytest.fixture
def like(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """BIG: entries cycling over four magnitudes 2^-12, 2^-8, 2^-4, 1 (exponent fields 115,
    119, 123, 127); the target moves every 3rd entry by 50% (updated at every magnitude).
    SMALL_T: 16 entries, the first 5 moved. NORM: ones, unchanged."""
    mags = torch.tensor([2.0 ** -12, 2.0 ** -8, 2.0 ** -4, 1.0])
    big = mags[torch.arange(N_BIG) % 4].to(torch.bfloat16)
    small = torch.full((4, 4), 2.0 ** -6, dtype=torch.bfloat16)
    norm = torch.ones(8, dtype=torch.bfloat16)
    base = {BIG: big, SMALL_T: small, NORM: norm}
    tb = big.clone()
    tb[::3] = tb[::3] * 1.5
    ts = small.clone().reshape(-1)
    ts[:5] = ts[:5] * 1.5
    monkeypatch.setattr(random_mask, "BLOCK", BLOCK)
    save(base, tmp_path / "base.safetensors")
    save({BIG: torch.ones(N_BIG, dtype=torch.bfloat16), SMALL_T: small, NORM: norm},
         tmp_path / "other.safetensors")
    save({BIG: tb, SMALL_T: ts.reshape(4, 4), NORM: norm}, tmp_path / "t.safetensors")
    run("diff", str(tmp_path / "base.safetensors"), str(tmp_path / "t.safetensors"),
        "--name", "dpo")
    return base


def _bits(name: str, tensor: str, numel: int) -> np.ndarray:
    packed = Registry().get(name).packed(tensor)
    return np.unpackbits(packed, count=numel, bitorder=BITORDER).astype(bool)


def test_per_tensor_counts_seed_and_lineage(like: dict[str, torch.Tensor]) -> None:
    out = run_json("combine", "random", "--like", "dpo", "--seed", "7", "--name", "r7",
                   "--json")
    k_big = len(range(0, N_BIG, 3))
    assert (out["operation"], out["seed"], out["per"], out["n_updated"]) == \
        ("random", 7, "tensor", k_big + 5)
    run("combine", "random", "--like", "dpo", "--seed", "7", "--name", "r7b")
    run("combine", "random", "--like", "dpo", "--seed", "8", "--name", "r8")
    for name in ("r7", "r8"):
        assert _bits(name, BIG, N_BIG).sum() == k_big
        assert _bits(name, SMALL_T, 16).sum() == 5
        assert _bits(name, NORM, 8).sum() == 0
    assert np.array_equal(_bits("r7", BIG, N_BIG), _bits("r7b", BIG, N_BIG))
    assert not np.array_equal(_bits("r7", BIG, N_BIG), _bits("r8", BIG, N_BIG))
    # not the mask itself, and spread over both blocks: |first block| ~ Binomial-like,
    # mean k·BLOCK/N (±5 sd of a hypergeometric)
    r7, dpo = _bits("r7", BIG, N_BIG), _bits("dpo", BIG, N_BIG)
    assert not np.array_equal(r7, dpo)
    mean = k_big * BLOCK / N_BIG
    sd = np.sqrt(k_big * BLOCK / N_BIG * (1 - BLOCK / N_BIG))
    assert abs(r7[:BLOCK].sum() - mean) < 5 * sd
    dpo_id = Registry().get("dpo").id
    rows = json.loads(run("sql", "select m.name, l.position, l.parent_id, l.operation, "
                                 "m.parents from mask_lineage l join masks m on "
                                 "m.id = l.mask_id where m.name = 'r7'", "--format", "json"))
    assert rows == [{"name": "r7", "position": 0, "parent_id": dpo_id, "operation": "random",
                     "parents": [dpo_id]}]


def test_per_magnitude_counts(like: dict[str, torch.Tensor], tmp_path: Path) -> None:
    run("combine", "random", "--like", "dpo", "--per", "magnitude", "--seed", "1",
        "--name", "rm")
    run("combine", "random", "--like", "dpo", "--per", "magnitude", "--seed", "1",
        "--base", str(tmp_path / "base.safetensors"), "--name", "rm2")
    exp = _exponents(like[BIG])
    rm, dpo = _bits("rm", BIG, N_BIG), _bits("dpo", BIG, N_BIG)
    for e in (115, 119, 123, 127):
        assert rm[exp == e].sum() == dpo[exp == e].sum() > 0
    assert not np.array_equal(rm, dpo)
    assert np.array_equal(rm, _bits("rm2", BIG, N_BIG))
    assert _bits("rm", SMALL_T, 16).sum() == 5
    strata = json.loads(run("sql", "select m.name, s.tensor, s.stratum, s.numel, s.n_updated "
                                   "from tensor_strata s join masks m on m.id = s.mask_id "
                                   "where s.tensor = 'model.layers.0.mlp.up_proj.weight' "
                                   "order by 1, 3", "--format", "json"))
    assert [tuple(r.values())[2:] for r in strata if r["name"] == "rm"] == \
        [tuple(r.values())[2:] for r in strata if r["name"] == "dpo"]


def test_errors(like: dict[str, torch.Tensor], tmp_path: Path) -> None:
    assert fail_line("combine", "random", "--like", "dpo", "--per", "magnitude",
                     "--base", str(tmp_path / "other.safetensors")) == \
        f"Error: {tmp_path / 'other.safetensors'} is not the base of dpo: tensor " \
        "'model.layers.0.mlp.up_proj.weight' has other magnitudes than the mask's strata record"
    assert fail_line("combine", "random", "dpo") == \
        "Error: combine random takes no MASKS: name the mask with --like"
    assert fail_line("combine", "random") == "Error: combine random needs --like MASK"
    assert fail_line("combine", "union", "dpo", "dpo", "--seed", "1") == \
        "Error: --seed, --per and --base apply to combine random only"
    assert fail_line("combine", "random", "--like", "dpo", "--seed", "-1") == \
        "Error: --seed must be an integer >= 0, not -1"


def test_split_count_is_exact() -> None:
    rng = np.random.default_rng(0)
    for sizes, k in (([5, 0, 7, 3], 9), ([10], 4), ([3, 3], 6), ([2, 2, 2], 0)):
        parts = split_count(rng, sizes, k)
        assert sum(parts) == k
        assert all(0 <= p <= s for p, s in zip(parts, sizes, strict=True))
