"""issue 26: a pushed dataset repo's ``tensors.parquet`` and ``maskhub.json`` answer the
DuckDB queries of docs/hub.md ("Reading a mask repo from DuckDB or polars"), with the
installed duckdb and, when one is on PATH, the ``duckdb`` CLI; the ``strata`` column holds
the registry's ``tensor_strata`` rows. The registry's COMMENTs (migration 20) are read by
the CLI too. Files come from the local Hub server through the real huggingface_hub client
(offline: the ``hf://datasets/...`` URL itself needs huggingface.co)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from factory import make_pair
from huggingface_hub import hf_hub_download

from maskhub import Registry

pytest_plugins = ["hub_fixture"]

REPO = "alice/tiny-mask"
MODULES = "SELECT module, 1 - sum(n_updated) / sum(numel) AS sparsity FROM '{f}' " \
          "GROUP BY module ORDER BY module"
STRATA = "SELECT s.stratum, s.numel, s.n_updated FROM (SELECT unnest(strata) AS s FROM " \
         "'{f}' WHERE tensor = 'model.layers.0.mlp.down_proj.weight') ORDER BY 1"
META = "SELECT mask.name, mask.tol, mask.n_updated FROM read_json('{f}')"


def duckdb_cli() -> str | None:
    """The duckdb CLI on PATH or beside this Python (the ``duckdb-cli`` wheel)."""
    return shutil.which("duckdb") or shutil.which("duckdb", path=str(Path(sys.executable).parent))


def cli_rows(exe: str, query: str, database: str = ":memory:") -> list[list]:
    args = [exe, "-json", "-c", query] if database == ":memory:" else \
        [exe, "-readonly", "-json", database, "-c", query]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True).stdout
    return [list(r.values()) for r in json.loads(out or "[]")]


def test_documented_duckdb_queries_on_a_pushed_dataset_repo(hub_server, tmp_path: Path,
                                                            ) -> None:
    base, target, _ = make_pair(tmp_path, density=0.15, seed=4)
    reg = Registry()
    mask = reg.diff(base, target, name="tiny", device="cpu")
    reg.push("tiny", REPO, repo_type="dataset")
    files = {n: hf_hub_download(REPO, n, repo_type="dataset", cache_dir=tmp_path / "hf")
             for n in ("tensors.parquet", "maskhub.json")}
    parquet, manifest = files["tensors.parquet"], files["maskhub.json"]

    modules = duckdb.sql(MODULES.format(f=parquet)).fetchall()
    want = reg.sql("SELECT module, 1 - sum(tensor_n_updated) / sum(numel) FROM mask_tensors "
                   "GROUP BY module ORDER BY module")[1]
    assert modules == [tuple(r) for r in want] and len(modules) == 12
    strata = duckdb.sql(STRATA.format(f=parquet)).fetchall()
    assert strata == [tuple(r) for r in reg.sql(
        "SELECT stratum, numel, n_updated FROM tensor_strata WHERE tensor = "
        "'model.layers.0.mlp.down_proj.weight' ORDER BY 1")[1]]
    assert len(strata) > 1
    # every tensor's cells add up to its counts
    assert duckdb.sql(f"SELECT count(*) FROM '{parquet}' WHERE numel > 0 AND (list_sum("
                      "[c.numel FOR c IN strata]) <> numel OR list_sum([c.n_updated FOR c IN "
                      "strata]) <> n_updated)").fetchall() == [(0,)]
    meta = duckdb.sql(META.format(f=manifest)).fetchall()
    assert meta == [("tiny", mask.row["tol"], mask.n_updated)]

    exe = duckdb_cli()
    if exe is None:
        pytest.skip("no duckdb CLI on PATH (pip install duckdb-cli): the Python duckdb ran "
                    "the queries")
    assert [tuple(r) for r in cli_rows(exe, MODULES.format(f=parquet))] == modules
    assert [tuple(r) for r in cli_rows(exe, STRATA.format(f=parquet))] == strata
    assert [tuple(r) for r in cli_rows(exe, META.format(f=manifest))] == meta
    # the registry itself, with its COMMENTs, from the CLI (read-only, no maskhub involved)
    index = str(Path(os.environ["MASKHUB_HOME"]) / "registry.duckdb")
    got = cli_rows(exe, "SELECT column_name, comment FROM duckdb_columns() WHERE table_name = "
                        "'masks' AND column_name IN ('tol', 'sparsity') ORDER BY 1", index)
    assert got == [["sparsity", "1 - n_updated / n_params, a fraction in [0, 1]"],
                   ["tol", "tolerance: an entry is updated iff |theta1 - theta0| > tol"]]
    names = cli_rows(exe, "SELECT name, n_updated FROM masks", index)
    assert names == [["tiny", mask.n_updated]]


def test_tensors_parquet_round_trip_through_duckdb(tmp_path: Path) -> None:
    """issue 25: DuckDB writes and reads tensors.parquet (no pyarrow in push or pull); the
    columns keep their documented Parquet types for any reader, NaN and infinities pass
    through, a missing analysis stays null, and the same rows give the same bytes."""
    import math

    import pyarrow.parquet as pq

    from maskhub.hub.card import read_tensors_parquet, tensors_rows, write_tensors_parquet
    from maskhub.schemas.analysis import TensorAnalysis
    from maskhub.schemas.metadata import TensorStats

    stats = [TensorStats("model.layers.0.mlp.up_proj.weight", (4, 2), 8, 3, layer=0,
                         module="mlp.up_proj", base_dtype="bfloat16", target_dtype="bfloat16"),
             TensorStats("model.norm.weight", (2,), 2, 0, module="norm")]
    analysis = [TensorAnalysis("model.layers.0.mlp.up_proj.weight", rank=2, max_rank=2,
                               rank_rtol=1e-3, sign_flips=1, mean_abs_delta=0.5,
                               max_abs_delta=math.inf, mean_rel_delta=math.nan,
                               max_rel_delta=None, n_sub_bf16_step=0)]
    rows = tensors_rows(stats, [("model.norm.weight", 1e-5, 0),
                                ("model.layers.0.mlp.up_proj.weight", 0.0, 5)],
                        analysis, [("model.layers.0.mlp.up_proj.weight", 120, 8, 3),
                                   ("model.norm.weight", 127, 2, 0)])
    con = duckdb.connect()
    write_tensors_parquet(con, tmp_path / "a.parquet", rows)
    write_tensors_parquet(con, tmp_path / "b.parquet", rows)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    schema = pq.read_schema(tmp_path / "a.parquet")
    assert [(f.name, str(f.type)) for f in schema] == [
        ("tensor", "string"), ("layer", "int32"), ("module", "string"),
        ("shape", "list<element: int64>"), ("numel", "int64"), ("n_updated", "int64"),
        ("sparsity", "double"), ("base_dtype", "string"), ("target_dtype", "string"),
        ("sweep", "list<element: struct<tol: double, n_updated: int64>>"),
        ("analysis", "struct<rank: int64, max_rank: int64, rank_rtol: double, sign_flips: "
                     "int64, mean_abs_delta: double, max_abs_delta: double, mean_rel_delta: "
                     "double, max_rel_delta: double, n_sub_bf16_step: int64>"),
        ("strata", "list<element: struct<stratum: int32, numel: int64, n_updated: int64>>")]
    back = read_tensors_parquet(con, tmp_path / "a.parquet")
    assert [r["tensor"] for r in back] == ["model.layers.0.mlp.up_proj.weight",
                                           "model.norm.weight"]
    up, norm = back
    assert (up["layer"], up["module"], up["shape"], up["numel"], up["n_updated"]) == \
        (0, "mlp.up_proj", [4, 2], 8, 3)
    assert up["sparsity"] == 1 - 3 / 8 and norm["sparsity"] == 1.0
    assert (norm["layer"], norm["shape"], norm["analysis"], norm["base_dtype"]) == \
        (None, [2], None, "")
    assert up["sweep"] == [{"tol": 0.0, "n_updated": 5}]
    assert norm["sweep"] == [{"tol": 1e-5, "n_updated": 0}]
    assert up["strata"] == [{"stratum": 120, "numel": 8, "n_updated": 3}]
    assert norm["strata"] == [{"stratum": 127, "numel": 2, "n_updated": 0}]
    a = up["analysis"]
    assert {k: v for k, v in a.items() if k not in ("max_abs_delta", "mean_rel_delta")} == {
        "rank": 2, "max_rank": 2, "rank_rtol": 1e-3, "sign_flips": 1, "mean_abs_delta": 0.5,
        "max_rel_delta": None, "n_sub_bf16_step": 0}
    assert a["max_abs_delta"] == math.inf and math.isnan(a["mean_rel_delta"])
    # pyarrow reads the same values
    assert pq.read_table(tmp_path / "a.parquet").column("shape").to_pylist() == [[4, 2], [2]]
