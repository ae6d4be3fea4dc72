"""The oldest duckdb that pyproject.toml allows opens a registry written by the installed
(newest) one: the index is created in DuckDB storage format v1.0.0, not 2.x's default."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest
from factory import make_pair

from maskhub import Registry
from maskhub.storage.index import STORAGE_VERSION

ROOT = Path(__file__).resolve().parents[1]

# Run with only the old duckdb importable (python -S: no site-packages): every table and view
# of the index, with its row count.
READER = textwrap.dedent("""
    import json, sys, duckdb
    con = duckdb.connect(sys.argv[1], read_only=True)
    names = con.execute("select table_name from information_schema.tables "
                        "order by table_name").fetchall()
    counts = {n: con.execute(f'select count(*) from "{n}"').fetchone()[0] for (n,) in names}
    masks = con.execute("select name, n_params, n_updated, tags, list_sort(parents) "
                        "from masks order by name").fetchall()
    comments = con.execute("select table_name, column_name, comment from duckdb_columns() "
                           "where comment is not null order by 1, 2").fetchall()
    tables = con.execute("select table_name, comment from duckdb_tables() "
                         "where comment is not null order by 1").fetchall()
    print(json.dumps({"version": duckdb.__version__, "counts": counts, "masks": masks,
                      "comments": comments, "table_comments": tables}))
""")


def duckdb_floor() -> str:
    """The lowest duckdb version pyproject.toml allows (``duckdb>=X``)."""
    specs = re.findall(r'^\s*"(duckdb\b[^"]*)"', (ROOT / "pyproject.toml").read_text(),
                       re.MULTILINE)
    assert len(specs) == 1, specs
    match = re.fullmatch(r"duckdb>=([0-9.]+)", specs[0].replace(" ", ""))
    assert match, f"unexpected duckdb requirement {specs[0]!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def old_duckdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the oldest allowed duckdb wheel, installed from the package
    index (skipped when no index can be reached)."""
    target = tmp_path_factory.mktemp("old-duckdb")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                           "--only-binary", ":all:", "--target", str(target),
                           f"duckdb=={duckdb_floor()}"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        pytest.skip(f"cannot install duckdb=={duckdb_floor()}: "
                    f"{lines[-1] if lines else proc.returncode}")
    return target


def test_the_oldest_allowed_duckdb_reads_a_registry_written_by_the_newest(
        old_duckdb: Path, tmp_path: Path) -> None:
    base, target, _ = make_pair(tmp_path, density=0.25)
    reg = Registry()
    a = reg.diff(base, target, name="a", device="cpu", sweep=(0, 1e-5), tags=("x", "y"))
    b = reg.diff(base, target, name="b", device="cpu", tol=0.3)
    reg.combine("union", ["a", "b"], name="ab")
    reg.overlap("a", "b")
    con = duckdb.connect(str(reg.index.path), read_only=True)
    try:
        tags = dict(con.execute("select database_name, tags['storage_version'] "
                                "from duckdb_databases() where not internal").fetchall())
    finally:
        con.close()
    assert tags == {"registry": f"{STORAGE_VERSION}+"}

    proc = subprocess.run([sys.executable, "-S", "-c", READER, str(reg.index.path)],
                          capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(old_duckdb), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["version"].startswith(duckdb_floor()) and not duckdb.__version__.startswith(
        duckdb_floor())
    n_tensors = len(a.tensor_names())
    assert n_tensors == 21 and b.n_updated == 0 < a.n_updated
    assert got["masks"] == [
        ["a", a.n_params, a.n_updated, ["x", "y"], []],
        ["ab", a.n_params, a.n_updated, [], sorted([a.id, b.id])],
        ["b", b.n_params, 0, [], []]]
    counts = got["counts"]
    assert {k: counts[k] for k in ("masks", "tensors", "tensor_sweep", "mask_lineage",
                                   "overlaps", "mask_tensors")} == {
        "masks": 3, "tensors": 3 * n_tensors, "tensor_sweep": 2 * n_tensors,
        "mask_lineage": 2, "overlaps": 1, "mask_tensors": 3 * n_tensors}
    # Every table and view the newest duckdb sees, the oldest reads with the same rows.
    assert counts == {t: reg.sql(f'select count(*) from "{t}"')[1][0][0] for t in counts}
    assert set(counts) == {r[0] for r in reg.sql(
        "select table_name from information_schema.tables")[1]}
    # issue 26: the COMMENTs of migration 20 are read by the oldest duckdb as written
    assert got["comments"] == [list(r) for r in reg.sql(
        "select table_name, column_name, comment from duckdb_columns() "
        "where comment is not null order by 1, 2")[1]]
    assert len(got["comments"]) == 137 and len(got["table_comments"]) == 11
    assert ["masks", "tol", "tolerance: an entry is updated iff |theta1 - theta0| > tol"] \
        in got["comments"]


def test_the_registry_engine_imports_from_the_oldest_allowed_duckdb(old_duckdb: Path) -> None:
    """maskhub imports DuckDB's engine module (``_duckdb``) where the installed DuckDB has
    one, and the ``duckdb`` package on the oldest one allowed, which has not."""
    code = ("import maskhub.storage.engine as e; con = e.duckdb.connect(); "
            "print(e.duckdb.__name__, con.execute('select 6 * 7').fetchone()[0], "
            "issubclass(e.duckdb.CatalogException, e.duckdb.Error))")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": f"{old_duckdb}:{ROOT / 'src'}",
                                           "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    old = proc.stdout.split()
    assert old[1:] == ["42", "True"]
    from maskhub.storage.engine import duckdb as engine

    assert engine.connect().execute("select 6 * 7").fetchone()[0] == 42
    assert engine.connect is duckdb.connect and engine.Error is duckdb.Error
    # the installed DuckDB is the newest: its engine module, without the package's wrappers
    assert engine.__name__ == "_duckdb" and old[0] in ("duckdb", "_duckdb")
