"""A notebook holding the registry open (its own ``duckdb.connect(..., read_only=True)``, in
another process) makes writes wait with one line, then proceed or fail in one line; the
supported way in, ``Registry().connect()``, is a snapshot that never blocks a writer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner
from factory import make_pair
from test_overlap import register_bits

from maskhub import Registry
from maskhub.cli import main
from maskhub.errors import RegistryBusyError

Q = "model.layers.0.self_attn.q_proj.weight"
A = {Q: np.array([[1, 1, 1, 0, 0], [1, 0, 0, 1, 0]], bool)}
B = {Q: np.array([[1, 0, 1, 0, 1], [1, 1, 0, 1, 0]], bool)}

# The notebook: a plain read-only DuckDB connection, held for argv[2] seconds.
HOLDER = textwrap.dedent("""
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1], read_only=True)
    print("open", flush=True)
    time.sleep(float(sys.argv[2]))
    con.close()
""")
# The process name DuckDB reports: the interpreter's executable, links resolved.
PROCESS = os.path.basename(os.path.realpath(sys.executable))


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    register_bits(r, "a", A)
    register_bits(r, "b", B)
    return r


def hold(reg: Registry, seconds: float) -> subprocess.Popen[str]:
    """Start a second process holding ``registry.duckdb`` open read-only."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(reg.index.path), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "open\n"
    return proc


def invoke(*args: str) -> tuple[int, list[str]]:
    res = CliRunner().invoke(main, list(args))
    assert "Traceback" not in res.output
    return res.exit_code, res.stderr.strip().splitlines()


@pytest.mark.parametrize("command", [("combine", "intersect", "a", "b", "--name", "ab"),
                                     ("overlap", "a", "b", "--refresh"),
                                     ("diff", "{base}", "{target}", "--name", "d")])
def test_a_write_waits_then_fails_in_one_line(reg: Registry, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path, command: tuple[str, ...]) -> None:
    monkeypatch.setenv("MASKHUB_LOCK_WAIT", "0.5")
    if command[0] == "diff":
        base, target, _ = make_pair(tmp_path)
        command = tuple(c.format(base=base, target=target) for c in command)
    proc = hold(reg, 30)
    try:
        start = time.monotonic()
        code, err = invoke(*command)
        waited = time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()
    assert code == 1
    assert err == [
        f"waiting for process {proc.pid} ({PROCESS}), which holds registry.duckdb open (up "
        "to 0.5 s; set MASKHUB_LOCK_WAIT to change)...",
        f"Error: {reg.index.path} is held open by process {proc.pid} ({PROCESS}) (a notebook "
        "or script's own duckdb.connect?); close that connection and retry, or query a "
        "snapshot that never blocks writers: maskhub.Registry().connect()"]
    assert 0.5 <= waited < 10
    assert [r["name"] for r in Registry().ls()] == ["a", "b"]  # nothing half-registered
    assert Registry().sql("select count(*) from \"overlaps\"")[1] == [(0,)]
    assert Registry().fsck().findings == []


def test_a_write_waits_for_the_notebook_to_close_then_proceeds(
        reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASKHUB_LOCK_WAIT", "60")
    proc = hold(reg, 1.0)
    try:
        code, err = invoke("combine", "intersect", "a", "b", "--name", "ab")
    finally:
        proc.wait()
    assert code == 0
    assert err == [f"waiting for process {proc.pid} ({PROCESS}), which holds registry.duckdb "
                   "open (up to 60 s; set MASKHUB_LOCK_WAIT to change)..."]
    ab = Registry().get("ab")
    assert ab.n_updated == 4 and ab["model.layers.0.self_attn.q_proj.weight"].tolist() == [
        [True, False, True, False, False], [True, False, False, True, False]]


# A notebook on the supported way in: a snapshot, open across a write by another process.
SNAPSHOT = textwrap.dedent("""
    import sys, maskhub
    con = maskhub.Registry(sys.argv[1]).connect()
    q = "select string_agg(name, ',' order by name) from masks"
    print(con.sql(q).fetchall()[0][0], flush=True)  # the README's call: duckdb's Python API
    sys.stdin.readline()  # the writer has finished
    print(con.execute(q).fetchone()[0], flush=True)
    print(maskhub.Registry(sys.argv[1]).connect().execute(q).fetchone()[0], flush=True)
""")


def test_a_snapshot_connection_never_blocks_a_writer(reg: Registry) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SNAPSHOT, str(reg.home)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "a,b\n"
        code, err = invoke("combine", "union", "a", "b", "--name", "a-or-b")
        assert (code, err) == (0, [])  # no wait at all
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "a,b\n"  # the snapshot as taken
        assert proc.stdout.readline() == "a,a-or-b,b\n"  # a new one sees the new mask
    finally:
        proc.kill()
        proc.wait()
    assert not list(Path(reg.home / "tmp").glob("*.intent"))


def test_the_same_process_holding_the_index_open_is_one_error(reg: Registry) -> None:
    con = duckdb.connect(str(reg.index.path), read_only=True)  # a notebook's own connection
    try:
        with pytest.raises(RegistryBusyError) as info:
            reg.combine("union", ["a", "b"], name="ab")
        assert str(info.value) == (
            f"this process holds {reg.index.path} open through its own duckdb.connect() "
            "(read-only?), so maskhub cannot write it; close that connection, or query a "
            "snapshot that never blocks writers: maskhub.Registry().connect()")
        assert [r["name"] for r in reg.ls()] == ["a", "b"]  # reading works alongside it
    finally:
        con.close()
    assert reg.combine("union", ["a", "b"], name="ab").n_updated == 7
