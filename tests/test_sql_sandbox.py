"""User SQL (``maskhub sql``, ``ls --where``) runs in a sandbox: the registry's tables and
views, nothing else on the machine (no file, no network, no extension, no setting), stopped
after ``--timeout`` seconds; every attempt is one ``Error:`` line (issue 21, item 1)."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
from clitools import cli, ok

from maskhub import Registry

REACH = ("(maskhub sql reads the registry only: no other file, no network, no extension, "
         "no setting)")
NOT_READ_ONLY = ("Error: SQL error: only read-only queries can run here (SELECT, SHOW, "
                 "DESCRIBE, SUMMARIZE, PRAGMA, EXPLAIN), not ")


def refused(path: str) -> str:
    """The line for a file or URL the sandbox refuses."""
    return (f'Error: SQL error: Permission Error: Cannot access file "{path}" - file system '
            f"operations are disabled by configuration {REACH}")


def error_line(*args: str) -> str:
    """The one line a failing command prints (exit 1, no traceback, nothing on stdout)."""
    res = cli(*args)
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.stdout == "" and "Traceback" not in res.stderr, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture
def reg() -> Registry:
    """A registry holding one mask, ``m``."""
    reg = Registry()
    reg.add({"model.layers.0.mlp.up_proj.weight": np.eye(4, dtype=bool)}, name="m",
            base_model="org/sft", algorithm="dpo")
    return reg


@pytest.fixture
def import_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A directory ``PRAGMA import_database`` would run: its schema.sql writes a file."""
    d = tmp_path / "imp"
    d.mkdir()
    target = tmp_path / "pwned.csv"
    (d / "schema.sql").write_text(f"COPY (SELECT 42) TO '{target}';\nINSTALL httpfs;\n")
    (d / "load.sql").write_text("")
    return d, target


def test_files_network_and_extensions_are_refused(reg: Registry,
                                                  import_dir: tuple[Path, Path]) -> None:
    d, target = import_dir
    assert error_line("sql", f"PRAGMA import_database('{d}')") == refused(f"{d}/schema.sql")
    assert not target.exists()
    for query, path in [("select * from read_text('/etc/passwd')", "/etc/passwd"),
                        ("select * from read_blob('/etc/passwd')", "/etc/passwd"),
                        ("select * from glob('/etc/*')", "/etc/*"),
                        ("select * from read_csv('/etc/passwd')", "/etc/passwd"),
                        ("select * from read_json_auto('http://127.0.0.1:9/x.json')",
                         "http://127.0.0.1:9/x.json"),
                        (f"select * from read_parquet('{reg.home}/masks/*')",
                         f"{reg.home}/masks/*")]:
        assert error_line("sql", query) == refused(path), query
    # Through ls --where, the same.
    assert error_line("ls", "--where", "(select count(*) from read_text('/etc/passwd')) > 0"
                      ) == refused("/etc/passwd")
    assert error_line("ls", "--where", "name in (select name from glob('/*'))") == refused("/*")
    # The statement filter's own lines still come first for what is not a query.
    assert error_line("sql", "set enable_external_access = true") == NOT_READ_ONLY + "SET"
    assert error_line("sql", "pragma threads = 1") == NOT_READ_ONLY + "SET"
    assert error_line("sql", "reset lock_configuration") == NOT_READ_ONLY + "SET"
    assert error_line("sql", "load httpfs") == NOT_READ_ONLY + "LOAD"
    assert error_line("sql", "detach registry") == NOT_READ_ONLY + "DETACH"
    assert ok("sql", "select current_setting('enable_external_access') as e, "
              "current_setting('lock_configuration') as l", "--format", "csv") == (
        "e,l\nFalse,True\n")


def test_settings_are_the_defence_not_the_filter(reg: Registry, tmp_path: Path,
                                                 import_dir: tuple[Path, Path]) -> None:
    """Past the statement filter, on the sandbox connection itself, each way out fails."""
    d, target = import_dir
    attempts = {
        "SET enable_external_access = true": "configuration has been locked",
        "RESET enable_external_access": "configuration has been locked",
        "SET lock_configuration = false": "configuration has been locked",
        "SET autoinstall_known_extensions = true": "configuration has been locked",
        "SET temp_directory = '/tmp'": "configuration has been locked",
        "SET threads = 1": "configuration has been locked",
        f"COPY (SELECT 1) TO '{target}'": "disabled by configuration",
        f"EXPORT DATABASE '{tmp_path / 'export'}'": "disabled by configuration",
        f"ATTACH '{tmp_path / 'other.duckdb'}' AS other": "disabled by configuration",
        f"PRAGMA import_database('{d}')": "disabled by configuration",
        "INSTALL httpfs": "disabled by configuration",
        "LOAD httpfs": "disabled through configuration",
        "CREATE TABLE x AS SELECT 1": "read-only",
        "INSERT INTO masks (id) VALUES ('x')": "read-only",
    }
    for sql, why in attempts.items():
        with reg.index.sandbox() as con:
            with pytest.raises(duckdb.Error, match=why):
                con.execute(sql)
    assert not target.exists() and not (tmp_path / "other.duckdb").exists()
    assert not (tmp_path / "export").exists()


def test_the_registry_tables_and_views_stay_queryable(reg: Registry) -> None:
    con = duckdb.connect(str(reg.index.path), read_only=True)
    try:
        direct = con.execute("show tables").fetchall()
        counts = {n: con.execute(f'select count(*) from "{n}"').fetchone()[0]
                  for (n,) in direct}
    finally:
        con.close()
    assert reg.sql("show tables") == (["name"], direct)
    assert {"masks", "tensors", "overlaps", "mask_tensors", "tensor_sweep"} <= {
        n for (n,) in direct}
    for name, n in counts.items():
        assert reg.sql(f'select count(*) from "{name}"')[1] == [(n,)], name
    assert ok("sql", "select mask_name, numel, tensor_n_updated from mask_tensors",
              "--format", "csv") == "mask_name,numel,tensor_n_updated\nm,16,4\n"
    assert ok("sql", "select current_database() as db", "--format", "csv") == "db\nregistry\n"
    assert [r["name"] for r in reg.ls()] == ["m"]


def test_timeout_stops_a_long_query_in_one_line(reg: Registry) -> None:
    endless = "select count(*) from range(10000000000000)"
    start = time.monotonic()
    assert error_line("sql", endless, "--timeout", "0.5") == (
        "Error: SQL error: the query ran longer than --timeout 0.5 s and was stopped (raise "
        "--timeout, or 0 for no limit)")
    assert error_line("ls", "--where", f"({endless}) > 0", "--timeout", "0.5") == (
        "Error: SQL error: the query ran longer than --timeout 0.5 s and was stopped (raise "
        "--timeout, or 0 for no limit)")
    assert time.monotonic() - start < 20
    assert error_line("sql", "select 1", "--timeout", "-1") == (
        "Error: Invalid value for '--timeout': -1.0 is not in the range x>=0. "
        "(see 'maskhub sql --help')")
    # The lock is released: a write goes through, and a short query is not stopped.
    reg.rm("m")
    assert ok("sql", "select count(*) as n from masks", "--timeout", "5",
              "--format", "csv") == "n\n0\n"
