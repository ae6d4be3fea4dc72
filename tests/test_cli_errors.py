"""User errors that used to end in a traceback or a misleading line: a read-only registry,
a bad home, SQL given to `ls --where` and `sql`, click usage errors, device specs, empty
mask references and `verify`'s wording. Each is one `Error: ...` line and exit code 1."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest
import torch
from clitools import cli, ok
from factory import llama_shapes, make_pair, random_state, save

from maskhub import Registry
from maskhub.errors import HomeError, ReadOnlyRegistryError, UsageError
from maskhub.kernels.device import resolve_device
from maskhub.schemas.ddl import MIGRATIONS

NOBODY = 65534


def error_line(*args: str) -> str:
    """The one line a failing command prints on stderr (checked: exit 1, nothing else)."""
    res = cli(*args)
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    assert res.stdout == "", res.stdout
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


# -- a read-only home ----------------------------------------------------------------------


def _set_writable(root: Path, writable: bool) -> None:
    """``chmod -R a-w`` (or ``u+w`` back) on ``root``."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod(mode | stat.S_IWUSR if writable
                   else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@contextmanager
def unprivileged() -> Iterator[None]:
    """Run the block where file modes apply: as root (whom ``chmod`` does not stop) with the
    effective uid of ``nobody``, otherwise as is."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.seteuid(NOBODY)
    except PermissionError:
        pytest.skip("root without CAP_SETUID: a chmod-ed directory stays writable to this "
                    "process and the test cannot mount a read-only file system")
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def open_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A home any user can traverse (``nobody`` cannot enter pytest's 0700 temp dirs)."""
    home = Path(tempfile.mkdtemp(prefix="maskhub-ro-"))
    home.chmod(0o755)
    monkeypatch.setenv("MASKHUB_HOME", str(home))
    try:
        yield home
    finally:
        _set_writable(home, True)
        shutil.rmtree(home)


@pytest.fixture
def ro_home(open_home: Path, tmp_path: Path) -> Path:
    """A registry holding masks ``a`` and ``b``."""
    base, target, _ = make_pair(tmp_path)
    ok("diff", str(base), str(target), "--name", "a")
    ok("diff", str(base), str(target), "--name", "b", "--tol", "0")
    return open_home


READS = (("ls",), ("ls", "--json"), ("ls", "--where", "name = 'b'"), ("show", "a"),
         ("show", "b", "--json"), ("sql", "select name, n_updated from masks order by name"))


def test_reading_commands_work_on_a_read_only_registry(ro_home: Path) -> None:
    expected = {args: ok(*args) for args in READS}  # while writable (and every import done)
    stale = ro_home / "tmp" / "deadbeef.999999999.partial"  # left by a dead process
    stale.mkdir(parents=True)
    (stale / "zarr.json").write_text("{}")
    _set_writable(ro_home, False)
    with unprivileged():
        for args in READS:
            assert ok(*args) == expected[args], args
        # the stale staging directory is left alone: this process may not remove it
        assert (stale / "zarr.json").is_file()
        res = cli("overlap", "a", "b")  # computed, but not cached in the index
        assert res.exit_code == 0 and res.stderr == "", res.output
        assert ok("sql", 'select count(*) as n from "overlaps"', "--format", "csv") == "n\n0\n"


def test_writing_commands_fail_in_one_line_on_a_read_only_registry(ro_home: Path) -> None:
    ok("ls")
    _set_writable(ro_home, False)
    line = (f"Error: the registry at {ro_home} is read-only (permission denied); it can be "
            "read (ls, show, sql...) but not written")
    with unprivileged():
        assert error_line("rm", "a") == line
        assert error_line("combine", "union", "a", "b", "--name", "u") == line
        assert error_line("demo") == line
        with pytest.raises(ReadOnlyRegistryError, match="is read-only"):
            Registry().rm("b")
        assert sorted(r["name"] for r in Registry().ls()) == ["a", "b"]


def test_read_only_registry_needing_a_migration(ro_home: Path) -> None:
    last = max(m.number for m in MIGRATIONS)
    con = duckdb.connect(str(ro_home / "registry.duckdb"))
    con.execute("DELETE FROM schema_migrations WHERE number = ?", [last])
    con.close()
    _set_writable(ro_home, False)
    with unprivileged():
        assert error_line("ls") == (
            f"Error: the registry at {ro_home} is read-only (permission denied); its index "
            "needs 1 schema migration(s) from this maskhub version; open it once with write "
            "access")


def test_empty_read_only_home(open_home: Path) -> None:
    _set_writable(open_home, False)
    with unprivileged():
        assert error_line("ls") == (
            f"Error: the registry at {open_home} is read-only (permission denied); it holds "
            "no index (registry.duckdb) yet; open it once with write access")


# -- a home that cannot be a directory ---------------------------------------------------


def test_home_below_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("MASKHUB_HOME", str(afile / "sub"))
    expected = (f"Error: cannot use {afile / 'sub'} as the maskhub home: {afile} is a file, "
                "not a directory")
    assert error_line("ls") == expected
    assert error_line("sql", "select 1") == expected
    with pytest.raises(HomeError):
        Registry(afile)


def test_home_that_cannot_be_created(open_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _set_writable(open_home, False)
    monkeypatch.setenv("MASKHUB_HOME", str(open_home / "sub"))
    with unprivileged():
        assert error_line("rm", "x") == (
            f"Error: cannot use {open_home / 'sub'} as the maskhub home: permission denied")
        # a reading command creates no home: it says there is none (issue 26)
        assert error_line("ls") == (
            f"Error: no registry at {open_home / 'sub'}: no such directory (`maskhub diff` "
            "or `maskhub demo` creates one)")


# -- SQL from the user ---------------------------------------------------------------------


@pytest.fixture
def one_mask(tmp_path: Path) -> None:
    base, target, _ = make_pair(tmp_path)
    ok("diff", str(base), str(target), "--name", "m")


NOT_READ_ONLY = ("Error: SQL error: only read-only queries can run here (SELECT, SHOW, "
                 "DESCRIBE, SUMMARIZE, PRAGMA, EXPLAIN), not ")


def test_ls_where_errors(one_mask: None) -> None:
    assert error_line("ls", "--where", "bogus = 1") == (
        'Error: SQL error: Binder Error: Referenced column "bogus" not found in FROM clause!')
    assert error_line("ls", "--where", "true; drop table tensors; select 1") == (
        "Error: SQL error: one statement at a time, not 3 (separated by ';')")
    assert error_line("ls", "--where", "name = ") == (
        'Error: SQL error: Parser Error: syntax error at or near "ORDER"')
    assert ok("sql", "select count(*) as n from tensors", "--format", "csv") == "n\n21\n"
    assert ok("ls", "--where", "name = 'm' -- a comment", "--json").count('"name": "m"') == 1
    with pytest.raises(UsageError, match="^SQL error: Binder Error"):
        Registry().ls(where="bogus = 1")


def test_sql_empty_multiple_and_writing_statements(one_mask: None, tmp_path: Path) -> None:
    out = tmp_path / "x.csv"
    assert error_line("sql", "") == "Error: SQL error: the query is empty"
    assert error_line("sql", " ; -- nothing") == "Error: SQL error: the query is empty"
    assert error_line("sql", "select 1; select 2") == (
        "Error: SQL error: one statement at a time, not 2 (separated by ';')")
    assert error_line("sql", f"copy masks to '{out}'") == NOT_READ_ONLY + "COPY"
    assert error_line("sql", f"explain analyze copy masks to '{out}'") == (
        NOT_READ_ONLY + "EXPLAIN COPY")
    assert error_line("sql", f"explain (analyze) copy masks to '{out}'") == (
        NOT_READ_ONLY + "EXPLAIN COPY")
    assert not out.exists()
    assert error_line("sql", f"export database '{tmp_path / 'd'}'") == NOT_READ_ONLY + "EXPORT"
    assert error_line("sql", f"attach '{tmp_path / 'y.db'}'") == NOT_READ_ONLY + "ATTACH"
    assert error_line("sql", "set threads = 1") == NOT_READ_ONLY + "SET"
    assert error_line("sql", "install httpfs") == NOT_READ_ONLY + "LOAD"
    assert error_line("sql", "call pragma_version()") == NOT_READ_ONLY + "CALL"
    assert error_line("sql", "delete from masks") == NOT_READ_ONLY + "DELETE"
    assert error_line("sql", "select 'a'::int") == (
        "Error: SQL error: Conversion Error: Could not convert string 'a' to INT32")
    assert ok("sql", "select name from masks", "--format", "csv") == "name\nm\n"


@pytest.mark.parametrize(("query", "head"), [
    ("show tables", "name\n"),
    ("describe masks", "column_name,column_type,null,key,default,extra\nid,VARCHAR,NO,PRI,,\n"),
    ("summarize tensors", "column_name,column_type,min,max,approx_unique,avg,std,q25,q50,q75,"
                          "count,null_percentage\nmask_id,VARCHAR,"),
    ("pragma table_info('masks')",
     "cid,name,type,notnull,dflt_value,pk\n0,id,VARCHAR,True,,True\n"),
    ("with t as (select name from masks) select * from t", "name\nm\n"),
    ("from masks select name", "name\nm\n"),
    ("explain select name from masks", "explain_key,explain_value\nphysical_plan,"),
    ("explain analyze select 1 as x", "explain_key,explain_value\nanalyzed_plan,"),
])
def test_sql_read_only_statement_kinds(one_mask: None, query: str, head: str) -> None:
    assert ok("sql", query, "--format", "csv").startswith(head)


# -- click usage errors ------------------------------------------------------------------


@pytest.mark.parametrize(("args", "line"), [
    (("diff", "a", "b", "--tol", "abc"),
     "Error: Invalid value for '--tol': 'abc' is not a valid float. (see 'maskhub diff --help')"),
    (("sql", "q", "--format", "yaml"),
     "Error: Invalid value for '--format': 'yaml' is not one of 'table', 'csv', 'json'. "
     "(see 'maskhub sql --help')"),
    (("combine", "xor", "a", "b"),
     "Error: Invalid value for '{intersect|union|difference|consensus|random}': 'xor' is not "
     "one of 'intersect', 'union', 'difference', 'consensus', 'random'. (see 'maskhub "
     "combine --help')"),
    (("diff",), "Error: Missing argument 'BASE'. (see 'maskhub diff --help')"),
    (("ls", "--wher", "x"),
     "Error: No such option '--wher'. (Did you mean one of: '--help', '--home', '--where'?) "
     "(see 'maskhub ls --help')"),
    (("nosuch",), "Error: No such command 'nosuch'. (see 'maskhub --help')"),
])
def test_usage_errors_are_one_line_exit_1(args: tuple[str, ...], line: str) -> None:
    assert error_line(*args) == line


def test_home_option_naming_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert error_line("ls", "--home", str(afile)) == (
        f"Error: Invalid value for '--home' (env var: 'MASKHUB_HOME'): Directory '{afile}' is "
        "a file. (see 'maskhub ls --help')")


def test_no_arguments_prints_the_help() -> None:
    res = cli()
    assert res.exit_code == 0 and res.stderr == ""
    assert res.stdout == ok("--help")
    assert res.stdout.startswith("Usage: main [OPTIONS] COMMAND [ARGS]...\n")


# -- misleading messages ---------------------------------------------------------------


@pytest.mark.parametrize("spec", ["cuda:abc", "cuda:", "cuda:-1", "cuda:01", "cudax", "gpu"])
def test_invalid_device_spec(spec: str, tmp_path: Path) -> None:
    base, target, _ = make_pair(tmp_path)
    assert error_line("diff", str(base), str(target), "--device", spec) == (
        f"Error: invalid device {spec!r}: use auto, cpu, cuda or cuda:N (N a GPU number such "
        "as 0)")


def test_auto_reads_checkpoints_on_the_cpu_when_a_gpu_is_there(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """On a GPU node, the default device of the streaming commands is the CPU (faster there:
    BENCHMARKS.md, "Diff on a GPU"). Here torch is a CPU build told that CUDA is available:
    any CUDA call would fail, so each command succeeding shows that none was made."""
    from maskhub.kernels import device

    monkeypatch.setattr(device, "gpu_may_exist", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda" and device.resolve_stream_device("auto") == "cpu"
    assert device.resolve_stream_device("cuda") == "cuda"
    base, target, _ = make_pair(tmp_path)
    ok("diff", str(base), str(target), "--name", "auto-on-gpu-node")
    ok("trajectory", str(base), str(target), "--name", "traj-on-gpu-node")
    ok("compare", str(base), str(target))
    ok("verify", "auto-on-gpu-node", str(base), str(target), "--tol", "mask")


def test_valid_device_spec_without_or_beyond_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="^--device cuda:0 was asked for but no CUDA GPU is "
                                         "available$"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cuda") == "cuda"
    with pytest.raises(UsageError, match=r"^--device cuda:2: there is no such GPU \(this "
                                         r"machine has 2, cuda:0 to cuda:1\)$"):
        resolve_device("cuda:2")


def test_empty_mask_reference(one_mask: None) -> None:
    line = ("Error: a MASK must be a mask name or a prefix of its id, not an empty string "
            "(see `maskhub ls`)")
    assert error_line("show", "") == line
    assert error_line("rm", " ") == line
    assert ok("sql", "select count(*) as n from masks", "--format", "csv") == "n\n1\n"


@pytest.fixture
def verify_run(tmp_path: Path) -> dict[str, Path]:
    base = random_state(llama_shapes(), torch.bfloat16, seed=0)
    base_dir = save(base, tmp_path / "base")
    Registry().diff(base_dir, save(base, tmp_path / "target"), name="rl", tol=0)
    no_head = save({k: v for k, v in base.items() if k != "lm_head.weight"},
                   tmp_path / "no-head")
    extra = save({**base, "extra.weight": torch.zeros(3)}, tmp_path / "extra")
    reshaped = save({**base, "lm_head.weight": base["lm_head.weight"].reshape(16, 32)},
                    tmp_path / "reshaped")
    return {"base": base_dir, "no-head": no_head, "extra": extra, "reshaped": reshaped}


def test_verify_names_the_trained_checkpoint(verify_run: dict[str, Path]) -> None:
    base = str(verify_run["base"])
    assert error_line("verify", "rl", base, str(verify_run["no-head"])) == (
        "Error: tensor 'lm_head.weight' exists only in the base checkpoint; use "
        "--allow-missing to skip such tensors")
    assert error_line("verify", "rl", base, str(verify_run["extra"])) == (
        "Error: tensor 'extra.weight' exists only in the trained checkpoint; use "
        "--allow-missing to skip such tensors")
    assert error_line("verify", "rl", base, str(verify_run["reshaped"])) == (
        "Error: tensor 'lm_head.weight' has shape [32, 16] in the base checkpoint and "
        "[16, 32] in the trained checkpoint")


def test_diff_keeps_base_and_target(verify_run: dict[str, Path]) -> None:
    base = str(verify_run["base"])
    assert error_line("diff", base, str(verify_run["extra"])) == (
        "Error: tensor 'extra.weight' exists only in the target checkpoint; use "
        "--allow-missing to skip such tensors")
    assert error_line("diff", base, str(verify_run["reshaped"])) == (
        "Error: tensor 'lm_head.weight' has shape [32, 16] in the base checkpoint and "
        "[16, 32] in the target checkpoint")


def test_demo_dir_that_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    line = error_line("demo", "--dir", str(blocker / "demo"))
    assert line.startswith(f"Error: cannot write the demo checkpoints to {blocker / 'demo'}")
    assert ok("ls", "--json").strip() == "[]"  # nothing registered
