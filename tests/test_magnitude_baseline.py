"""The magnitude-stratified random baseline, end to end: ``diff`` records the entries and
updated entries of every tensor per exponent of |θ0| (``tensor_strata``), and ``overlap``
compares two masks against random placement inside each (tensor, exponent) cell. Every
expected value below is computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factory import save

from maskhub import Registry
from maskhub.cli import main

SMALL, LARGE = 2.0 ** -10, 1.0  # bf16 exponent fields 117 and 127


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def moved(base: torch.Tensor, entries: list[int]) -> torch.Tensor:
    out = base.clone()
    out[entries] = out[entries] * 1.5  # far above tol at both magnitudes
    return out


@pytest.fixture
def two_masks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One bf16 matrix of 4 small and 4 large weights, and a norm of ones (the strata cache
    takes tensors of any size here; by default it skips those below 1 Mi entries).

    A updates entries {0, 1, 4} (two small, one large), B updates {0, 1, 2, 5} (three small,
    one large): |A ∩ B| = 2.
    """
    from maskhub.kernels.strata import StrataCache

    monkeypatch.setattr(StrataCache, "MIN_NUMEL", 0)
    w = torch.tensor([SMALL] * 4 + [LARGE] * 4, dtype=torch.bfloat16).reshape(2, 4)
    norm = torch.ones(4, dtype=torch.bfloat16)
    base = {"model.layers.0.mlp.up_proj.weight": w, "model.norm.weight": norm}
    save(base, tmp_path / "base.safetensors")
    for name, entries in (("a", [0, 1, 4]), ("b", [0, 1, 2, 5])):
        flat = moved(w.reshape(-1), entries).reshape(2, 4)
        save({"model.layers.0.mlp.up_proj.weight": flat, "model.norm.weight": norm},
             tmp_path / f"{name}.safetensors")
        run("diff", str(tmp_path / "base.safetensors"), str(tmp_path / f"{name}.safetensors"),
            "--name", name)


def test_diff_records_the_exponent_strata(two_masks: None) -> None:
    rows = json.loads(run("sql", "select m.name, s.tensor, s.stratum, s.numel, s.n_updated "
                                 "from tensor_strata s join masks m on m.id = s.mask_id "
                                 "order by 1, 2, 3", "--format", "json"))
    w, n = "model.layers.0.mlp.up_proj.weight", "model.norm.weight"
    assert [tuple(r.values()) for r in rows] == [
        ("a", w, 117, 4, 2), ("a", w, 127, 4, 1), ("a", n, 127, 4, 0),
        ("b", w, 117, 4, 3), ("b", w, 127, 4, 1), ("b", n, 127, 4, 0)]


def test_overlap_against_the_three_nulls(two_masks: None) -> None:
    # small cell: N=4, n1=2, n2=3 -> E = 6/4, Var = 2*3*2*1/(16*3) = 1/4
    # large cell: N=4, n1=1, n2=1 -> E = 1/4, Var = 1*1*3*3/(16*3) = 3/16
    # the norm: nobody updated it -> 0. Tensor-stratified: N=8, n1=3, n2=4 -> E = 3/2.
    e, var = 1.5 + 0.25, 0.25 + 3 / 16
    for _ in range(2):  # counted, then from the cache: the same figures
        r = json.loads(run("overlap", "a", "b", "--json"))
        assert (r["n_a"], r["n_b"], r["n_both"], r["n_params"]) == (3, 4, 2, 12)
        assert r["expected_random"] == pytest.approx(3 * 4 / 12, abs=1e-12)
        assert r["expected_stratified"] == pytest.approx(1.5, abs=1e-12)
        assert r["expected_magnitude"] == pytest.approx(e, abs=1e-12)
        assert r["var_magnitude"] == pytest.approx(var, abs=1e-12)
        assert r["o1_magnitude"] == pytest.approx(e / 3, abs=1e-12)
        assert r["o2_magnitude"] == pytest.approx(e / 4, abs=1e-12)
        assert r["lift_magnitude"] == pytest.approx(2 / e, abs=1e-12)
        assert r["z_magnitude"] == pytest.approx((2 - e) / math.sqrt(var), abs=1e-12)
        assert r["log10_p_magnitude"] == pytest.approx(
            math.log10(0.5 * math.erfc((2 - e) / math.sqrt(var) / math.sqrt(2))), abs=1e-12)
    assert r["cached"] is True
    text = run("overlap", "a", "b")
    assert "magnitude-stratified random" in text
    assert f"above random: {2 / e:.3g}x the magnitude-stratified expectation" in text
    cols, rows = Registry().sql("select lift_magnitude, o1_excess_magnitude, o2_magnitude "
                                "from overlap_summary where name_a = 'b'")
    assert rows[0] == pytest.approx((2 / e, 2 / 4 - e / 4, e / 3))  # the reverse orientation


def test_overlap_all_matrix_and_plot_use_the_magnitude_baseline(two_masks: None,
                                                                 tmp_path: Path) -> None:
    m = json.loads(run("overlap", "--all", "--metric", "lift_magnitude", "--json"))
    assert m["matrix"][0][1] == pytest.approx(2 / 1.75, abs=1e-12)
    assert "magnitude-stratified random baseline of o1" in run("overlap", "--all")
    pytest.importorskip("matplotlib")
    out = tmp_path / "o.png"
    run("plot", "a", "b", "-o", str(out), "--baseline", "magnitude")
    assert out.stat().st_size > 0


def test_fp16_fp32_and_integer_strata(tmp_path: Path) -> None:
    base = {"h": torch.tensor([1.0, 1.0, 2.0 ** -3, 0.0], dtype=torch.float16),
            "f": torch.tensor([1.0, 4.0], dtype=torch.float32),
            "i": torch.tensor([1, 2, 3], dtype=torch.int8)}
    target = {"h": torch.tensor([1.5, 1.0, 2.0 ** -2, 0.0], dtype=torch.float16),
              "f": torch.tensor([1.0, 5.0], dtype=torch.float32),
              "i": torch.tensor([1, 5, 3], dtype=torch.int8)}
    save(base, tmp_path / "base.safetensors")
    save(target, tmp_path / "target.safetensors")
    Registry().diff(tmp_path / "base.safetensors", tmp_path / "target.safetensors", name="m")
    _, rows = Registry().sql("select tensor, stratum, numel, n_updated from tensor_strata "
                             "order by 1, 2")
    # fp16 exponent field (5 bits): 1.0 -> 15, 2^-3 -> 12, 0 -> 0; fp32: 1.0 -> 127, 4 -> 129
    assert rows == [("f", 127, 1, 0), ("f", 129, 1, 1), ("h", 0, 1, 0), ("h", 12, 1, 1),
                    ("h", 15, 2, 1), ("i", -1, 3, 1)]


def test_masks_without_strata_fall_back_to_the_stratified_figure(two_masks: None) -> None:
    reg = Registry()
    with reg.index.connect() as con:
        con.execute("DELETE FROM tensor_strata WHERE mask_id = ?", [reg.get("b").id])
    r = json.loads(run("overlap", "a", "b", "--refresh", "--json"))
    assert r["expected_magnitude"] is None and r["lift_magnitude"] is None
    assert "no magnitude strata recorded" in run("overlap", "a", "b")


def test_strata_cache_gives_the_same_counts_and_survives_damage(two_masks: None,
                                                                tmp_path: Path,
                                                                maskhub_home: Path) -> None:
    """The base's histogram of entries is cached per tensor after the first diff (a and b
    above share their base): later diffs read it, and a damaged entry is recomputed."""
    cache = sorted((maskhub_home / "cache" / "strata").glob("*.npy"))
    assert len(cache) == 2  # one per base tensor
    rows = "select tensor, stratum, numel, n_updated from tensor_strata where mask_id = '{}' " \
           "order by 1, 2"
    reg = Registry()
    want = reg.sql(rows.format(reg.get("a").id))[1]
    for damage in (b"not an npy file", None):
        if damage is not None:
            for f in cache:
                f.write_bytes(damage)
        run("diff", str(tmp_path / "base.safetensors"), str(tmp_path / "a.safetensors"),
            "--name", f"again-{damage is None}")
        assert reg.sql(rows.format(reg.get(f"again-{damage is None}").id))[1] == want


def test_small_tensors_are_counted_not_cached(tmp_path: Path, maskhub_home: Path) -> None:
    """Below StrataCache.MIN_NUMEL entries a tensor's histogram is counted at every diff (a
    .npy round trip costs more); the strata are the same either way."""
    from maskhub.kernels.strata import StrataCache

    w = torch.tensor([SMALL] * 4 + [LARGE] * 4, dtype=torch.bfloat16)
    save({"w": w}, tmp_path / "base.safetensors")
    save({"w": moved(w, [0, 4])}, tmp_path / "t.safetensors")
    assert w.numel() < StrataCache.MIN_NUMEL
    run("diff", str(tmp_path / "base.safetensors"), str(tmp_path / "t.safetensors"),
        "--name", "s")
    assert not list((maskhub_home / "cache" / "strata").glob("*.npy"))
    rows = Registry().sql("select stratum, numel, n_updated from tensor_strata order by 1")[1]
    assert sum(r[1] for r in rows) == 8 and sum(r[2] for r in rows) == 2
