"""Mask algebra: intersect, union, difference, consensus, with lineage, through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from test_overlap import fail, register_bits, run

from maskhub import Registry
from maskhub.analytics.combine import combine_blocks

Q = "model.layers.0.self_attn.q_proj.weight"
N = "model.layers.0.input_layernorm.weight"
H = "lm_head.weight"

# Three masks over tensors whose sizes are not multiples of 8 (padding in the last byte).
A = {Q: np.array([[1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [0, 0, 0, 0, 1]], bool),
     N: np.zeros(7, bool),
     H: np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1], bool)}
B = {Q: np.array([[1, 1, 0, 1, 0], [0, 1, 0, 1, 0], [0, 0, 0, 1, 1]], bool),
     N: np.zeros(7, bool),
     H: np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0], bool)}
C = {Q: np.array([[1, 0, 0, 0, 1], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]], bool),
     N: np.array([0, 0, 0, 1, 0, 0, 0], bool),
     H: np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], bool)}

EXPECTED = {
    "intersect": {Q: [[1, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]],
                  N: [0] * 7, H: [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]},
    "union": {Q: [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [0, 0, 0, 1, 1]],
              N: [0, 0, 0, 1, 0, 0, 0], H: [1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1]},
    "difference": {Q: [[0, 0, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
                   N: [0] * 7, H: [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]},
    "consensus": {Q: [[1, 1, 0, 0, 0], [0, 1, 0, 1, 0], [0, 0, 0, 0, 1]],  # >= 2 of 3
                  N: [0] * 7, H: [1, 1, 1, 0, 1, 0, 0, 0, 1, 0, 0]},
}


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    register_bits(r, "a", A, tol=1e-6, algorithm="dpo", seed=1, dirty_padding=True)
    register_bits(r, "b", B, tol=1e-5, algorithm="dpo", seed=2, dirty_padding=True)
    register_bits(r, "c", C, tol=1e-6, algorithm="dpo", seed=3)
    return r


@pytest.mark.parametrize("operation", list(EXPECTED))
def test_every_operation_gives_the_exact_bits(reg: Registry, operation: str):
    extra = ["--min-count", "2"] if operation == "consensus" else []
    out = run("combine", operation, "a", "b", "c", "--name", "new", *extra, "--json")
    mask = reg.get("new")
    for tensor, want in EXPECTED[operation].items():
        np.testing.assert_array_equal(mask[tensor], np.array(want, bool))
    n = sum(int(np.array(w).sum()) for w in EXPECTED[operation].values())
    assert out["n_updated"] == mask.n_updated == n
    assert out["n_params"] == 15 + 7 + 11
    mask.store.validate()  # padding bits are zero and every count matches
    # lineage
    ids = [reg.get(x).id for x in "abc"]
    assert out["operation"] == mask.row["operation"] == operation
    assert out["parents"] == list(mask.row["parents"]) == ids
    assert mask.metadata.parents == tuple(ids) and mask.metadata.operation == operation
    assert out["base_model"] == "org/base-model" and out["tol"] == 1e-5  # max of the parents
    assert mask.row["algorithm"] == "dpo" and mask.row["seed"] is None
    cols, rows = reg.sql(f"SELECT position, parent_id, operation, min_count FROM mask_lineage "
                         f"WHERE mask_id = '{mask.id}' ORDER BY position")
    k = 2 if operation == "consensus" else None
    assert rows == [(i, pid, operation, k) for i, pid in enumerate(ids)]
    # per-tensor rows in the index agree with the bits
    cols, rows = reg.sql(f"SELECT tensor, n_updated FROM tensors WHERE mask_id = '{mask.id}'")
    assert dict(rows) == {t: int(np.array(w).sum()) for t, w in EXPECTED[operation].items()}


def test_consensus_thresholds(reg: Registry):
    run("combine", "consensus", "a", "b", "c", "--min-count", "1", "--name", "k1")
    run("combine", "consensus", "a", "b", "c", "--min-count", "3", "--name", "k3")
    run("combine", "consensus", "a", "b", "c", "--name", "majority")
    run("combine", "union", "a", "b", "c", "--name", "u")
    run("combine", "intersect", "a", "b", "c", "--name", "i")
    for t in (Q, N, H):
        np.testing.assert_array_equal(reg.get("k1")[t], reg.get("u")[t])
        np.testing.assert_array_equal(reg.get("k3")[t], reg.get("i")[t])
        np.testing.assert_array_equal(reg.get("majority")[t],
                                      np.array(EXPECTED["consensus"][t], bool))
    assert reg.get("majority").metadata.extra["min_count"] == 2


def test_difference_is_ordered_and_default_name(reg: Registry):
    out = run("combine", "difference", "b", "a", "--json")
    assert out["name"] == "difference-b-a"
    mask = reg.get("difference-b-a")
    np.testing.assert_array_equal(mask[Q], B[Q] & ~A[Q])
    np.testing.assert_array_equal(mask[H], B[H] & ~A[H])
    run("combine", "difference", "b", "a")
    assert reg.get("difference-b-a-2").n_updated == mask.n_updated


def test_combined_masks_overlap_like_any_mask(reg: Registry):
    run("combine", "intersect", "a", "b", "--name", "ab")
    out = run("overlap", "ab", "a", "--json")
    assert out["o1"] == 1.0  # an intersection lies inside each parent
    n_ab = sum(int((A[t] & B[t]).sum()) for t in A)
    assert out["n_both"] == n_ab


def test_bit_sliced_consensus_matches_brute_force():
    rng = np.random.default_rng(1)
    for n in range(1, 10):
        blocks = [rng.integers(0, 256, 37, dtype=np.uint8) for _ in range(n)]
        counts = sum(np.unpackbits(b).astype(int) for b in blocks)
        for k in range(1, n + 1):
            got = np.unpackbits(combine_blocks("consensus", blocks, k))
            np.testing.assert_array_equal(got, (counts >= k).astype(np.uint8))


def test_bad_combinations_register_nothing(reg: Registry):
    register_bits(reg, "other", {Q: A[Q], N: A[N], H: A[H]}, base_model="org/else")
    register_bits(reg, "short", {Q: A[Q], N: A[N]})
    assert "different base models" in fail("combine", "union", "a", "other")
    assert f"tensor {H!r} is in a but not in short" in fail("combine", "union", "a", "short")
    assert "between 1 and 3" in fail("combine", "consensus", "a", "b", "c", "--min-count", "4")
    assert "between 1 and 2" in fail("combine", "consensus", "a", "b", "--min-count", "0")
    assert "consensus only" in fail("combine", "union", "a", "b", "--min-count", "1")
    assert "at least two" in fail("combine", "union", "a")
    assert "listed twice" in fail("combine", "union", "a", "a")
    assert "already exists" in fail("combine", "union", "a", "b", "--name", "c")
    assert "no mask named 'zz'" in fail("combine", "union", "a", "zz")
    assert [r["name"] for r in reg.ls()] == ["a", "b", "c", "other", "short"]
    assert reg.sql("SELECT count(*) FROM mask_lineage")[1] == [(0,)]
    tmp = reg.home / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir())


def test_rm_of_a_combined_mask_drops_its_lineage(reg: Registry):
    run("combine", "union", "a", "b", "--name", "u")
    assert reg.sql("SELECT count(*) FROM mask_lineage")[1] == [(2,)]
    run("rm", "u")
    assert reg.sql("SELECT count(*) FROM mask_lineage")[1] == [(0,)]


def test_rm_of_a_parent_warns_and_keeps_the_children(reg: Registry):
    run("combine", "union", "a", "b", "--name", "u")
    run("combine", "intersect", "a", "c", "--name", "i")
    a_id = reg.get("a").id
    assert reg.derived_from("a") == ["i", "u"]
    out = run("rm", "a")
    assert f"removed a (id {a_id[:12]})" in out
    assert f"2 mask(s) made from it stay registered, their lineage naming id {a_id[:12]}: i, u" \
        in " ".join(out.split())
    assert sorted(r["name"] for r in reg.ls()) == ["b", "c", "i", "u"]
    assert run("rm", "b", "--json") == {"removed": reg.sql(
        "SELECT parent_id FROM mask_lineage WHERE mask_id = (SELECT id FROM masks WHERE "
        "name = 'u') AND position = 1")[1][0][0], "name": "b", "derived": ["u"]}


def test_names_follow_one_rule_everywhere(reg: Registry):
    for bad in ("a b", "x'; drop table masks;--", "../up", "-dash", ".hidden", ""):
        assert "invalid mask name" in fail("combine", "union", "a", "b", "--name", bad)
    run("combine", "union", "a", "b", "--name", "ok.name_1-x")
    assert reg.get("ok.name_1-x").n_updated > 0
