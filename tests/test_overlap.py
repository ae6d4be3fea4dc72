"""Overlap analytics: exact counts, both random baselines, significance, cache, all pairs, SQL."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from factory import llama_shapes, plant_updates, random_state, save
from zarr.codecs import ZstdCodec

from maskhub import IncompatibleMasksError, Mask, Registry
from maskhub.analytics.overlap_results import log10_normal_tail
from maskhub.cli import main
from maskhub.errors import MaskStoreError, UsageError
from maskhub.kernels.bitcount import popcount
from maskhub.schemas.metadata import MaskMetadata, TensorStats
from maskhub.schemas.names import parse_tensor_name
from maskhub.storage.store import MaskWriter

BASE = "org/base-model"


def register_bits(reg: Registry, name: str, bits: dict[str, np.ndarray], *,
                  base_model: str = BASE, tol: float = 1e-5, dirty_padding: bool = False,
                  claim: dict[str, int] | None = None, chunk_bytes: int | None = None,
                  **meta: object) -> Mask:
    """Register a mask whose bits are given exactly (``bits``: tensor -> bool array).

    ``dirty_padding`` sets the unused bits of each tensor's last byte, which readers must
    ignore; ``claim`` overrides the recorded per-tensor counts (to fake a damaged store);
    ``chunk_bytes`` writes the arrays with stock zarr in chunks of that many bytes.
    """
    mask_id = uuid.uuid4().hex
    tmp = reg.staging_path(mask_id)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    writer = MaskWriter(tmp)
    stats = []
    for tensor, b in bits.items():
        layer, module = parse_tensor_name(tensor)
        n = int(b.sum()) if claim is None or tensor not in claim else claim[tensor]
        st = TensorStats(tensor, tuple(b.shape), int(b.size), n, layer, module,
                         "bfloat16", "bfloat16")
        packed = np.packbits(b.ravel(), bitorder="little")
        if dirty_padding and b.size % 8:
            packed[-1] |= np.uint8((0xFF << (b.size % 8)) & 0xFF)
        if chunk_bytes is None:
            writer.add(st, packed)
        else:
            arr = writer.group.create_array(
                name=tensor, shape=packed.shape, dtype="uint8", chunks=(chunk_bytes,),
                compressors=[ZstdCodec(level=1)], fill_value=0,
                attributes={**st.to_dict(), "bitorder": "little"})
            arr[:] = packed
            writer.names.append(tensor)
        stats.append(st)
    md = MaskMetadata(id=mask_id, name=name, base_model=base_model, target_model=f"org/{name}",
                      n_params=sum(s.numel for s in stats),
                      n_updated=sum(s.n_updated for s in stats), tol=tol,
                      created_at="2025-05-01T00:00:00", **meta)
    writer.finish(md)
    return reg.register_store(tmp, md, stats)


def run(*args: str) -> dict | list | str:
    """Run the CLI; return parsed JSON when --json was given, else the output."""
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.output) if "--json" in args else res.output


def fail(*args: str) -> str:
    """Run the CLI expecting a one-line user error; return the message."""
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


def pair_with_counts(numel: int, n_a: int, n_b: int, n_both: int, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Two flat masks of ``numel`` entries with exactly these counts."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(numel)
    a = np.zeros(numel, bool)
    b = np.zeros(numel, bool)
    a[order[:n_a]] = True
    b[order[n_a - n_both:n_a - n_both + n_b]] = True
    assert (a.sum(), b.sum(), (a & b).sum()) == (n_a, n_b, n_both)
    return a, b


# -- the paper's Table 4 ------------------------------------------------------------------

# (sparsity 1, sparsity 2, random o1, random o2, observed o1, observed o2) in percent.
TABLE4 = [
    (63.3, 63.3, 36.7, 36.7, 60.5, 60.5),  # seed 42 vs 123 (paper: 60.5 / 60.6)
    (63.3, 85.4, 14.6, 36.7, 26.7, 67.1),  # Tulu data vs PRIME data
    (87.1, 77.0, 23.0, 12.9, 59.1, 33.2),  # DPO vs PRIME (seed + data + algorithm)
]


@pytest.mark.parametrize("s1, s2, r1, r2, o1, o2", TABLE4)
def test_table4_uniform_baseline_from_sparsities(s1, s2, r1, r2, o1, o2):
    reg = Registry()
    numel = 10_000  # 0.01% resolution: the sparsities are met exactly
    n_a, n_b = round(numel * (100 - s1) / 100), round(numel * (100 - s2) / 100)
    n_both = round(o1 / 100 * n_a)
    a, b = pair_with_counts(numel, n_a, n_b, n_both)
    register_bits(reg, "run1", {"model.layers.0.mlp.up_proj.weight": a.reshape(100, 100)})
    register_bits(reg, "run2", {"model.layers.0.mlp.up_proj.weight": b.reshape(100, 100)})
    out = run("overlap", "run1", "run2", "--json")
    assert out["n_a"] == n_a and out["n_b"] == n_b and out["n_both"] == n_both
    # Appendix E: the random o1 is the density of the other mask, and vice versa.
    assert out["o1_random"] == n_b / numel and out["o2_random"] == n_a / numel
    assert round(100 * out["o1_random"], 1) == r1
    assert round(100 * out["o2_random"], 1) == r2
    assert out["o1"] == n_both / n_a and out["o2"] == n_both / n_b
    assert round(100 * out["o1"], 1) == o1
    assert abs(100 * out["o2"] - o2) < 0.15  # the paper rounds its sparsities too
    assert out["jaccard"] == n_both / (n_a + n_b - n_both)
    assert out["expected_random"] == pytest.approx(n_a * n_b / numel)
    # One tensor: the stratified baseline is the uniform one.
    assert out["o1_stratified"] == pytest.approx(out["o1_random"], rel=1e-12)
    text = run("overlap", "run1", "run2")
    assert f"{r1:.2f}%" in text and f"{r2:.2f}%" in text


# -- stratified baseline and significance -------------------------------------------------


def _norm_case(reg: Registry) -> tuple[dict, dict]:
    """A norm tensor never updated plus a projection half-updated by both masks."""
    a, b = pair_with_counts(1000, 500, 500, 400, seed=3)
    norm = np.zeros(1000, bool)
    bits_a = {"model.layers.0.input_layernorm.weight": norm,
              "model.layers.0.self_attn.q_proj.weight": a.reshape(40, 25)}
    bits_b = {"model.layers.0.input_layernorm.weight": norm,
              "model.layers.0.self_attn.q_proj.weight": b.reshape(40, 25)}
    register_bits(reg, "a", bits_a)
    register_bits(reg, "b", bits_b)
    return bits_a, bits_b


def test_stratified_baseline_differs_from_uniform():
    reg = Registry()
    _norm_case(reg)
    r = reg.overlap("a", "b")
    assert (r.n_params, r.n_a, r.n_b, r.n_both) == (2000, 500, 500, 400)
    # Uniform: a random 500 of 2000 parameters, so E|∩| = 500 * 500 / 2000 = 125.
    assert r.expected_random == 125.0
    assert r.o1_random == r.o2_random == 0.25
    # Stratified: the norm is never updated, so both masks live in the same 1000 entries.
    assert r.expected_stratified == 250.0
    assert r.o1_stratified == r.o2_stratified == 0.5
    var = 500 * 500 * 500 * 500 / (1000**2 * 999)
    assert r.var_stratified == pytest.approx(var, rel=1e-12)
    assert r.z_score == pytest.approx(150 / math.sqrt(var), rel=1e-12)
    assert r.p_value == pytest.approx(0.5 * math.erfc(r.z_score / math.sqrt(2)), rel=1e-9)
    assert r.lift_random == 3.2 and r.lift_stratified == 1.6
    text = run("overlap", "a", "b", "--per", "module")
    assert "25.00%" in text and "50.00%" in text and "z = " in text
    assert "input_layernorm" in text and "self_attn.q_proj" in text


def test_stratified_null_matches_simulation():
    """Mean and variance of |I1 ∩ I2| under random placement inside each tensor."""
    reg = Registry()
    bits_a, bits_b = _norm_case(reg)
    bits_a["model.layers.0.mlp.up_proj.weight"] = np.arange(300) % 3 == 0
    bits_b["model.layers.0.mlp.up_proj.weight"] = np.arange(300) % 5 == 0
    register_bits(reg, "a3", bits_a)
    register_bits(reg, "b3", bits_b)
    r = reg.overlap("a3", "b3")
    rng = np.random.default_rng(7)
    draws = np.zeros(4000)
    for name in bits_a:
        na, nb, numel = int(bits_a[name].sum()), int(bits_b[name].sum()), bits_a[name].size
        if na and nb:
            for k in range(draws.size):
                draws[k] += np.isin(rng.choice(numel, nb, replace=False), np.arange(na)).sum()
    assert draws.mean() == pytest.approx(r.expected_stratified, abs=4 * math.sqrt(
        r.var_stratified / draws.size))
    assert draws.var() == pytest.approx(r.var_stratified, rel=0.1)


def test_log10_tail_is_finite_and_continuous():
    for z in (1.0, 5.0, 20.0, 29.0):
        assert log10_normal_tail(z) == pytest.approx(
            math.log10(0.5 * math.erfc(z / math.sqrt(2))), rel=1e-12)
    assert log10_normal_tail(30.0) == pytest.approx(
        math.log10(0.5 * math.erfc(30 / math.sqrt(2))), rel=1e-9)
    assert log10_normal_tail(1e4) == pytest.approx(-21_714_724.1, rel=1e-6)


# -- exact counts -------------------------------------------------------------------------


def test_overlap_of_diffed_checkpoints_is_exact(tmp_path: Path):
    """End to end: two fine-tunes of one base, diffed by the CLI, overlap = planted bits."""
    shapes = llama_shapes()
    base = random_state(shapes)
    t1, m1 = plant_updates(base, 0.2, seed=11)
    t2, m2 = plant_updates(base, 0.3, seed=12)
    save(base, tmp_path / "base")
    save(t1, tmp_path / "t1")
    save(t2, tmp_path / "t2", shards=2)
    for name in ("t1", "t2"):
        run("diff", str(tmp_path / "base"), str(tmp_path / name), "--name", name,
            "--base-model", "org/sft", "--json")
    out = run("overlap", "t1", "t2", "--json")
    both = {k: int((m1[k] & m2[k]).sum()) for k in shapes}
    assert out["n_both"] == sum(both.values())
    assert out["n_a"] == sum(int(m.sum()) for m in m1.values())
    assert {t["tensor"]: t["n_both"] for t in out["tensors"]} == both
    assert [t["tensor"] for t in out["tensors"]] == Registry().get("t1").tensor_names()
    strat = sum(m1[k].sum() * m2[k].sum() / m1[k].size for k in shapes)
    assert out["expected_stratified"] == pytest.approx(strat, rel=1e-12)
    # Norms are never updated by plant_updates: the stratified baseline is the higher one.
    assert out["o1_stratified"] > out["o1_random"]


def test_padding_bits_are_ignored():
    reg = Registry()
    rng = np.random.default_rng(5)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (7, 7), "model.norm.weight": (13,),
              "lm_head.weight": (3, 5)}
    a = {k: rng.random(s) < 0.5 for k, s in shapes.items()}
    b = {k: rng.random(s) < 0.5 for k, s in shapes.items()}
    register_bits(reg, "a", a, dirty_padding=True)
    register_bits(reg, "b", b, dirty_padding=True)
    r = reg.overlap("a", "b")
    assert r.n_both == sum(int((a[k] & b[k]).sum()) for k in shapes)
    assert r.n_a == sum(int(x.sum()) for x in a.values())


def test_multi_chunk_stores_missing_chunks_and_mixed_chunkings():
    """Chunk-sized reads (edge chunk, all-zero chunks zarr never wrote) and, for masks chunked
    differently, the zarr-slicing fallback give the same exact counts."""
    from maskhub.analytics.overlap_counting import PackedSource

    reg = Registry()
    rng = np.random.default_rng(8)
    t = "model.layers.0.mlp.down_proj.weight"
    bits = {name: rng.random(1001) < 0.4 for name in "abc"}
    for name in "ab":
        bits[name][300:700] = False  # whole chunks of zeros: never written by zarr
    # 126 bytes: 7 chunks of 16 and an edge chunk; c is chunked by 24
    a = register_bits(reg, "a", {t: bits["a"].reshape(7, 143)}, dirty_padding=True,
                      chunk_bytes=16)
    register_bits(reg, "b", {t: bits["b"].reshape(7, 143)}, dirty_padding=True, chunk_bytes=16)
    register_bits(reg, "c", {t: bits["c"].reshape(7, 143)}, chunk_bytes=24)
    chunk_files = {p.name for p in (a.path / t / "c").iterdir()}
    assert len(chunk_files) < 8 and "7" in chunk_files  # zero chunks absent, edge present
    src = PackedSource(a, TensorStats(t, (7, 143), 1001, int(bits["a"].sum())))
    assert src.chunk == 16 and src._dir is not None  # the direct-read path applies
    m = reg.overlap_all(["a", "b", "c"])
    for (i, j), r in m.results.items():
        x, y = "abc"[i], "abc"[j]
        assert r.n_both == int((bits[x] & bits[y]).sum())
        assert (r.n_a, r.n_b) == (int(bits[x].sum()), int(bits[y].sum()))


def test_popcount_exact_on_any_length():
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 1000, 4099):
        buf = rng.integers(0, 256, n, dtype=np.uint8)
        assert popcount(buf) == int(np.unpackbits(buf).sum())


def test_damaged_store_is_reported():
    reg = Registry()
    bits = {"model.layers.0.mlp.up_proj.weight": np.arange(64) % 2 == 0}
    register_bits(reg, "ok", bits)
    register_bits(reg, "bad", bits, claim={"model.layers.0.mlp.up_proj.weight": 31})
    with pytest.raises(MaskStoreError, match="32 set bits but the index records 31"):
        reg.overlap("ok", "bad")
    assert reg.sql('SELECT count(*) FROM "overlaps"')[1] == [(0,)]


# -- cache --------------------------------------------------------------------------------


def test_results_are_cached_reused_and_removed_with_the_mask():
    reg = Registry()
    _norm_case(reg)
    first = run("overlap", "a", "b", "--json")
    assert first["cached"] is False
    again = run("overlap", "a", "b", "--json")
    assert again["cached"] is True
    assert {k: again[k] for k in first if k not in ("cached", "computed_at")} == \
        {k: first[k] for k in first if k not in ("cached", "computed_at")}
    flipped = run("overlap", "b", "a", "--json")
    assert flipped["cached"] is True and flipped["name_a"] == "b"
    assert (flipped["n_a"], flipped["o1"], flipped["o2_random"]) == \
        (first["n_b"], first["o2"], first["o1_random"])
    assert [t["n_a"] for t in flipped["tensors"]] == [t["n_b"] for t in first["tensors"]]
    assert reg.sql('SELECT count(*) FROM "overlaps"')[1] == [(1,)]
    assert reg.sql("SELECT count(*) FROM tensor_overlaps")[1] == [(2,)]
    assert run("overlap", "a", "b", "--refresh", "--json")["cached"] is False
    assert reg.sql('SELECT count(*) FROM "overlaps"')[1] == [(1,)]
    run("rm", "b")
    assert reg.sql('SELECT count(*) FROM "overlaps"')[1] == [(0,)]
    assert reg.sql("SELECT count(*) FROM tensor_overlaps")[1] == [(0,)]


# -- all pairs ----------------------------------------------------------------------------


def _four_masks(reg: Registry) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(9)
    shapes = {"model.embed_tokens.weight": (30, 7), "model.layers.0.input_layernorm.weight": (7,),
              "model.layers.0.self_attn.q_proj.weight": (7, 7),
              "model.layers.1.mlp.up_proj.weight": (13, 7), "lm_head.weight": (30, 7)}
    core = {k: rng.random(s) < 0.3 for k, s in shapes.items()}
    out = {}
    for i, name in enumerate(["s1", "s2", "s3", "s4"]):
        bits = {k: (core[k] | (rng.random(s) < 0.1 * (i + 1))) & ("norm" not in k)
                for k, s in shapes.items()}
        register_bits(reg, name, bits, seed=i)
        out[name] = bits
    return out


def test_all_pairs_equals_pairwise_and_reads_each_mask_once():
    reg = Registry()
    bits = _four_masks(reg)
    names = list(bits)
    seen: list[tuple[int, int]] = []
    matrix = reg.overlap_all(progress=lambda d, t, bd, bt, n: seen.append((bd, bt)))
    packed_bytes = sum((b.size + 7) // 8 for b in bits["s1"].values())
    assert seen[-1] == (4 * packed_bytes, 4 * packed_bytes)  # 4 masks, each read once
    assert [m.name for m in matrix.masks] == names and len(matrix.results) == 6
    for i, x in enumerate(names):
        for j, y in enumerate(names):
            if i == j:
                continue
            want = sum(int((bits[x][k] & bits[y][k]).sum()) for k in bits[x])
            got = matrix.pair(i, j)
            assert got.n_both == want
            single = reg.overlap(x, y, refresh=True)
            for field in ("n_params", "n_a", "n_b", "n_both", "o1", "o2", "o1_random",
                          "o2_random", "o1_stratified", "o2_stratified", "jaccard",
                          "z_score", "p_value"):
                assert getattr(got, field) == pytest.approx(getattr(single, field),
                                                            rel=1e-12), field
            assert matrix.matrix("o1")[i][j] == pytest.approx(want / got.n_a, rel=1e-15)
    out = run("overlap", "--all", "--json")
    assert sum(p["cached"] for p in out["pairs"]) == 6
    assert out["matrix"][0][0] == 1.0
    assert out["matrix"][1][2] == pytest.approx(matrix.matrix("o1")[1][2])
    text = run("overlap", "--all", "s1", "s3", "s4", "--metric", "jaccard")
    assert "Jaccard" in text and "s3" in text


def test_all_pairs_by_base_model_and_errors():
    reg = Registry()
    _four_masks(reg)
    other = {"model.layers.0.self_attn.q_proj.weight": np.ones((7, 7), bool)}
    register_bits(reg, "x1", other, base_model="org/other")
    register_bits(reg, "x2", other, base_model="org/other")
    msg = fail("overlap", "--all")
    assert "2 base models" in msg and "--base-model" in msg
    out = run("overlap", "--all", "--base-model", "org/other", "--json")
    assert [m["name"] for m in out["masks"]] == ["x1", "x2"]
    assert out["matrix"][0][1] == 1.0
    assert "no registered mask has base model" in fail("overlap", "--all", "--base-model", "z")
    assert "at least two" in fail("overlap", "--all", "x1")
    assert "two masks" in fail("overlap", "x1")


# -- incompatible masks -------------------------------------------------------------------


def test_incompatible_masks_name_the_first_mismatch():
    reg = Registry()
    q = "model.layers.0.self_attn.q_proj.weight"
    k = "model.layers.0.self_attn.k_proj.weight"
    register_bits(reg, "ref", {q: np.ones((4, 4), bool), k: np.ones((4, 4), bool)})
    register_bits(reg, "other-base", {q: np.ones((4, 4), bool), k: np.ones((4, 4), bool)},
                  base_model="org/else")
    register_bits(reg, "missing", {q: np.ones((4, 4), bool)})
    register_bits(reg, "shape", {q: np.ones((4, 4), bool), k: np.ones((2, 8), bool)})
    assert "different base models: 'org/base-model' vs 'org/else'" in fail(
        "overlap", "ref", "other-base")
    assert f"tensor {k!r} is in ref but not in missing" in fail("overlap", "ref", "missing")
    assert f"tensor {k!r} is in ref but not in missing" in fail(
        "overlap", "--all", "ref", "missing")
    assert f"tensor {k!r} has shape [4, 4] in ref but [2, 8] in shape" in fail(
        "overlap", "ref", "shape")
    with pytest.raises(IncompatibleMasksError):
        reg.overlap("missing", "ref")
    with pytest.raises(UsageError):
        reg.overlap_all(["ref"])
    assert reg.sql('SELECT count(*) FROM "overlaps"')[1] == [(0,)]


# -- SQL views and example queries (docs/overlap.md) --------------------------------------

TOP_PAIRS = """
SELECT name_a, name_b, round(100 * o1, 1) AS o1_pct, round(100 * o1_stratified, 1) AS o1_strat,
       round(lift_stratified, 3) AS lift, z_score
FROM overlap_summary
WHERE name_a < name_b
ORDER BY lift_stratified DESC
LIMIT 10
"""
PER_MODULE = """
SELECT module, n_tensors, n_a, n_b, n_both, o1, o2, o1_stratified, o2_stratified
FROM module_overlaps
WHERE name_a = 'b' AND name_b = 'a'
ORDER BY module
"""
BY_SPARSITY = """
SELECT name, algorithm, seed, round(100 * sparsity, 2) AS sparsity_pct
FROM masks
WHERE base_model = 'org/base-model'
ORDER BY sparsity DESC, name
"""


def test_documented_sql_queries_run():
    reg = Registry()
    _norm_case(reg)
    register_bits(reg, "c", {"model.layers.0.input_layernorm.weight": np.zeros(1000, bool),
                             "model.layers.0.self_attn.q_proj.weight":
                                 np.arange(1000).reshape(40, 25) < 100})
    reg.overlap_all()
    cols, rows = reg.sql(TOP_PAIRS)
    assert cols[:2] == ["name_a", "name_b"] and len(rows) == 3
    assert rows[0][:2] == ("a", "b") and rows[0][4] == 1.6
    by_pair = {r[:2]: r for r in rows}
    assert set(by_pair) == {("a", "b"), ("a", "c"), ("b", "c")}
    # per-module overlap, asked in the orientation opposite to the stored one
    out = run("sql", PER_MODULE, "--json")
    assert [r["module"] for r in out] == ["input_layernorm", "self_attn.q_proj"]
    q = out[1]
    assert (q["n_a"], q["n_b"], q["n_both"], q["o1"], q["o1_stratified"]) == \
        (500, 500, 400, 0.8, 0.5)
    assert out[0]["n_both"] == 0 and out[0]["o1"] is None
    cols, rows = reg.sql(BY_SPARSITY)
    assert [r[0] for r in rows] == ["c", "a", "b"]
    assert rows[0][3] == 95.0 and rows[1][3] == 75.0
    cols, rows = reg.sql("SELECT layer, o1, o1_random FROM layer_overlaps "
                         "WHERE name_a = 'a' AND name_b = 'b'")
    assert rows == [(0, 0.8, 0.25)]


def test_commands_have_help_with_examples():
    for cmd in ("overlap", "combine", "plot"):
        text = run(cmd, "--help")
        assert "Example:" in text and "maskhub " + cmd in text
