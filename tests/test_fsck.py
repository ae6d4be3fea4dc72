"""`maskhub fsck`: each finding driven from a registry corrupted on purpose, read-only by
default (nothing changes), fixed by ``--repair``; exit codes, one line per problem, --json;
remote (S3) orphan prefixes and a remote diff killed mid-write."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner, Result
from factory import llama_shapes, plant_updates, random_state, save

from maskhub import Registry
from maskhub.cli import main
from maskhub.core.crashpoints import ENV
from maskhub.schemas.ddl import (
    M001_CORE,
    M002_OVERLAPS,
    M004_ANALYSIS,
    MIGRATIONS,
    MIGRATIONS_TABLE,
)


def fsck(*args: str) -> Result:
    return CliRunner().invoke(main, ["fsck", *args])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def raw_sql(home: Path, sql: str) -> None:
    con = duckdb.connect(str(home / "registry.duckdb"))
    try:
        con.execute(sql)
    finally:
        con.close()


@pytest.fixture
def home(maskhub_home: Path, tmp_path: Path) -> Path:
    """Two registered masks, ``a`` and ``b``, and their union ``u``."""
    base = random_state(llama_shapes(), seed=7)
    target, _ = plant_updates(base, 0.2, 8)
    b, t = save(base, tmp_path / "base"), save(target, tmp_path / "target")
    reg = Registry()
    reg.diff(b, t, name="a", device="cpu")
    reg.diff(b, t, name="b", device="cpu", tol=0.5)
    reg.combine("union", ["a", "b"], name="u")
    return maskhub_home


def check(expected: list[str]) -> None:
    """fsck finds exactly the ``expected`` lines (kind: message), changes nothing, exits 1;
    ``--repair`` fixes them and exits 0 with the summary; then fsck is clean."""
    home = Path(os.environ["MASKHUB_HOME"])
    before = sorted(str(p.relative_to(home)) for p in home.rglob("*") if "registry" not in
                    p.name)
    res = fsck()
    assert res.exit_code == 1, res.output
    assert res.stdout.splitlines() == expected
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")
                  if "registry" not in p.name) == before  # read-only
    doc = json.loads(fsck("--json").stdout)
    assert doc["clean"] is False and [f"{p['kind']}: {p['message']}" for p in
                                      doc["problems"]] == expected
    fixed = fsck("--repair")
    assert fixed.exit_code == 0, fixed.output
    lines = fixed.stdout.splitlines()
    assert lines[:-1] == [f"repaired {e}" for e in expected]
    assert lines[-1].startswith("clean after repair: ")
    again = fsck()
    assert again.exit_code == 0 and again.stdout.startswith("clean: "), again.output


def test_clean_registry(home: Path) -> None:
    res = fsck()
    assert res.exit_code == 0
    assert res.stdout == "clean: 3 mask(s), 3 store(s), 63 array(s) checked\n"
    assert json.loads(fsck("--json").stdout)["problems"] == []


def test_stale_staging_and_interrupted_registration(home: Path) -> None:
    store = Registry().get("a").path  # (opening recovers: before the damage is done)
    pid = dead_pid()
    (home / "tmp").mkdir(exist_ok=True)
    (home / "tmp" / f"abc.{pid}.partial").mkdir()
    orphan = "f" * 32
    shutil.copytree(store, home / "masks" / f"{orphan}.zarr")
    (home / "tmp" / f"{orphan}.{pid}.intent").write_text(json.dumps({"op": "add"}))
    check([f"stale-staging: tmp/abc.{pid}.partial was left by process {pid}, which died "
           "while writing it",
           f"interrupted: the registration of mask {orphan[:12]} by process {pid} was "
           f"interrupted (tmp/{orphan}.{pid}.intent)"])
    assert not (home / "masks" / f"{orphan}.zarr").exists()


def test_missing_and_incomplete_stores(home: Path) -> None:
    reg = Registry()
    a, b = reg.get("a"), reg.get("b")
    shutil.rmtree(a.path)
    shutil.rmtree(b.path / "lm_head.weight")
    check([f"missing-store: mask a ({a.id[:12]}): its store masks/{a.id}.zarr is missing "
           "(repair: unregister it)",
           f"incomplete-store: mask b ({b.id[:12]}): its store masks/{b.id}.zarr lacks the "
           "array 'lm_head.weight' (repair: unregister it, delete the store)"])
    assert [r["name"] for r in Registry().ls()] == ["u"]
    assert not b.path.exists()


def test_orphan_store_and_tombstones(home: Path) -> None:
    reg = Registry()
    a, u = reg.get("a"), reg.get("u")
    orphan, leftover = "0" * 32, "1" * 32
    shutil.copytree(a.path, home / "masks" / f"{orphan}.zarr")
    (home / "masks" / f"{leftover}.zarr.removing").mkdir()
    os.replace(u.path, home / "masks" / f"{u.id}.zarr.removing")
    # fsck reports in path order within a kind, and u's id is random.
    tombstones = sorted([
        (leftover, f"tombstone: masks/{leftover}.zarr.removing is a store left half-deleted "
                   "(repair: delete it)"),
        (u.id, f"tombstone: masks/{u.id}.zarr.removing is the store of registered mask 'u', "
               "left half-removed (repair: put it back)")])
    check([f"orphan-store: masks/{orphan}.zarr has no row in masks (a write killed before "
           "its commit; repair: delete it)"] + [line for _, line in tombstones])
    Registry().get("u").store.validate()
    assert sorted(p.name for p in (home / "masks").iterdir()) == sorted(
        f"{m.id}.zarr" for m in (a, reg.get("b"), u))


def test_dangling_rows_overlap_cache_and_lineage(home: Path) -> None:
    reg = Registry()
    reg.overlap("a", "b")
    ghost = "9" * 32
    raw_sql(home, f"""UPDATE "overlaps" SET mask_b = '{ghost}';
                      UPDATE tensor_overlaps SET mask_b = '{ghost}';
                      INSERT INTO tensor_sweep VALUES ('{ghost}', 'x', 0.1, 3);
                      INSERT INTO trajectory_points VALUES ('{ghost}', 0, 0, 'c', NULL, 0, 0, 0, 0);
                      UPDATE mask_lineage SET mask_id = '{ghost}' WHERE position = 1;""")
    n_tensors = len(reg.get("a").tensor_names())
    check([f"dangling-rows: 1 row(s) of mask_lineage name a mask that is not registered "
           f"(e.g. {ghost}; repair: delete them)",
           f"overlap-cache: 1 row(s) of overlaps name a mask that is not registered (e.g. "
           f"{reg.get('a').id}; repair: delete them)",
           f"overlap-cache: {n_tensors} row(s) of tensor_overlaps name a mask that is not "
           f"registered (e.g. {reg.get('a').id}; repair: delete them)",
           f"dangling-rows: 1 row(s) of tensor_sweep name a mask that is not registered (e.g. "
           f"{ghost}; repair: delete them)",
           "dangling-rows: 1 row(s) of trajectory_points name a trajectory that does not "
           "exist (repair: delete them)"])
    assert reg.sql('SELECT count(*) FROM "overlaps"')[1] == [(0,)]


def test_lineage_of_a_removed_parent_is_by_design(home: Path) -> None:
    Registry().rm("a")
    res = fsck()
    assert res.exit_code == 0
    assert res.stdout == ("clean: 2 mask(s), 2 store(s), 42 array(s) checked (1 lineage "
                          "row(s) name a removed parent)\n")
    assert json.loads(fsck("--json").stdout)["counts"]["lineage_removed_parents"] == 1


def test_pending_migrations(maskhub_home: Path) -> None:
    con = duckdb.connect(str(maskhub_home / "registry.duckdb"))  # an index of an old maskhub
    con.execute(MIGRATIONS_TABLE)
    for m in (M001_CORE, M002_OVERLAPS, M004_ANALYSIS):
        con.execute(m.sql)
        con.execute("INSERT INTO schema_migrations (number, name) VALUES (?, ?)",
                    [m.number, m.name])
    con.close()
    later = ", ".join(str(m.number) for m in MIGRATIONS if m.number > 4)  # 5, 6, 7, 8, ...
    check([f"migrations: schema migration(s) {later} not applied"])
    assert Registry().index.pending_migrations() == []


def test_fsck_needs_write_access_only_to_repair(home: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    os.chmod(home, 0o555)
    try:
        if os.access(home, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        assert fsck().exit_code == 0
        res = fsck("--repair")
        assert res.exit_code == 1 and res.stderr.startswith("Error: ") and \
            len(res.stderr.splitlines()) == 1
    finally:
        os.chmod(home, 0o755)


# -- remote stores ------------------------------------------------------------------------


def test_orphan_prefix_on_s3_and_remote_diff_killed_mid_write(tmp_path: Path, s3_bucket: str,
                                                              maskhub_home: Path) -> None:
    import s3fs

    base = random_state(llama_shapes(), seed=9)
    target, _ = plant_updates(base, 0.2, 10)
    b, t = save(base, tmp_path / "base"), save(target, tmp_path / "target")
    store = f"{s3_bucket}/team"
    reg = Registry(store=store)
    mask = reg.diff(b, t, name="s3", device="cpu")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    orphan = f"{store}/masks/{'e' * 32}.zarr"
    fs.pipe({f"{orphan.removeprefix('s3://')}/zarr.json": b"{}"})
    res = fsck("--store", store)
    assert res.exit_code == 1
    assert res.stdout == (f"orphan-store: {orphan} has no row in masks (a write killed "
                          "before its commit; repair: delete it)\n")
    assert fsck().exit_code == 0  # without --store, the bucket is not listed
    assert fsck("--store", store, "--repair").exit_code == 0
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{store}/masks".removeprefix("s3://"))
                  ) == [f"{mask.id}.zarr"]

    # a remote diff killed after writing its store, before its commit: the next open
    # deletes the prefix its intent record names
    env = {**os.environ, ENV: "register:intent-written", "MASKHUB_STORE": store}
    proc = subprocess.run([sys.executable, "-c", "from maskhub.entry import run; run()",
                           "diff", str(b), str(t), "--name", "killed", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    fs.invalidate_cache()
    assert len(fs.ls(f"{store}/masks".removeprefix("s3://"))) == 2
    assert [f.kind for f in Registry(recover=False).fsck().findings] == ["interrupted"]
    Registry()  # the next open recovers
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{store}/masks".removeprefix("s3://"))
                  ) == [f"{mask.id}.zarr"]
    assert fsck("--store", store).exit_code == 0
