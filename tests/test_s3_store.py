"""Mask stores on object storage: an S3 store (moto's S3 server on 127.0.0.1, driven by the
real s3fs client) holds the same bits as a local one, is readable by every command, is
committed by its index row only, and is written by Ray workers too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from clitools import fail_line, run_json
from factory import llama_shapes, make_pair, plant_updates, random_state, save

from maskhub import Registry
from maskhub.diff.ray import FAIL_ONCE_ENV

pytest.importorskip("s3fs")
pytest.importorskip("moto")


run = run_json
fail = fail_line


def keys(url: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = url.removeprefix("s3://")
    return sorted(k[len(root) + 1:] for k in fs.find(root))


def assert_same_bits(reg: Registry, a: str, b: str) -> None:
    ma, mb = reg.get(a), reg.get(b)
    assert ma.tensor_names() == mb.tensor_names()
    for name in ma.tensor_names():
        assert np.array_equal(ma.packed(name), mb.packed(name)), name
    assert ma.tensor_stats() == mb.tensor_stats()
    for col in ("n_params", "n_updated", "sparsity", "dtype", "n_tensors"):
        assert ma.row[col] == mb.row[col], col
    q = "select tensor, tol, n_updated from tensor_sweep where mask_id = '{}' order by all"
    assert reg.sql(q.format(ma.id))[1] == reg.sql(q.format(mb.id))[1]


def test_s3_store_same_bits_readable_everywhere_and_removed(tmp_path: Path,
                                                            s3_bucket: str) -> None:
    base, target, planted = make_pair(tmp_path, density=0.15, shards=2)
    store = f"{s3_bucket}/team/maskhub"
    run("diff", str(base), str(target), "--name", "local", "--sweep", "0,1e-3")
    out = run("diff", str(base), str(target), "--name", "s3", "--sweep", "0,1e-3",
              "--store", store)
    url = f"{store}/masks/{out['id']}.zarr"
    reg = Registry()
    mask = reg.get("s3")
    assert mask.path == url and mask.row["store_url"] == url
    assert not (reg.home / "masks" / f"{mask.id}.zarr").exists()
    assert_same_bits(reg, "local", "s3")
    for name, bits in planted.items():
        assert np.array_equal(mask[name], bits), name
    mask.store.validate()
    stored = keys(url)
    assert "zarr.json" in stored and "lm_head.weight/zarr.json" in stored
    # a reader with only zarr (and fsspec) rebuilds the mask from S3
    group = zarr.open_group(store=zarr.storage.FsspecStore.from_url(url, read_only=True),
                            mode="r")
    assert group.attrs["id"] == mask.id and group.attrs["tensors"] == mask.tensor_names()
    # every reading command works on the remote store, with the same results as local
    rows = {r["name"]: r for r in run("ls")}
    assert rows["s3"]["store_url"] == url and rows["local"]["store_url"] is None
    assert run("show", "s3")["mask"]["n_updated"] == out["n_updated"]
    pair = run("overlap", "local", "s3")
    assert pair["n_both"] == pair["n_a"] == pair["n_b"] == out["n_updated"]
    # removing the mask deletes its prefix
    run("rm", "s3")
    assert keys(f"{s3_bucket}/team") == []
    assert [m["name"] for m in run("ls")] == ["local"]


def test_failed_diff_leaves_nothing_on_s3(tmp_path: Path, s3_bucket: str) -> None:
    base, target, _ = make_pair(tmp_path)
    run("diff", str(base), str(target), "--name", "taken", "--store", s3_bucket)
    assert len(keys(s3_bucket)) > 1
    before = keys(s3_bucket)
    # the second diff writes its whole store, then loses the race for the name: nothing stays
    reg = Registry(store=s3_bucket)
    original = reg.check_new_name
    reg.check_new_name = lambda name: None  # type: ignore[method-assign]
    with pytest.raises(Exception, match="already exists"):
        reg.diff(base, target, name="taken")
    reg.check_new_name = original  # type: ignore[method-assign]
    assert keys(s3_bucket) == before
    assert [m["name"] for m in reg.ls()] == ["taken"]


def test_store_url_errors_are_one_line(tmp_path: Path, s3_bucket: str) -> None:
    base, target, _ = make_pair(tmp_path)
    line = fail("diff", str(base), str(target), "--store", str(tmp_path / "dir"))
    assert "must be a URL such as s3://" in line
    line = fail("diff", str(base), str(target), "--store", "s3://no-such-bucket-here/x")
    assert "does not exist" in line
    line = fail("diff", str(base), str(target), "--store", "nosuchproto://bucket/x")
    assert "nosuchproto" in line
    assert run("ls") == []


def test_maskhub_home_as_s3_url_keeps_the_index_local(
        tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base, target, _ = make_pair(tmp_path)
    monkeypatch.setenv("MASKHUB_HOME", f"{s3_bucket}/home")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = run("diff", str(base), str(target), "--name", "x")
    reg = Registry()
    assert reg.home == tmp_path / "cache" / "maskhub"
    assert (reg.home / "registry.duckdb").is_file()
    assert reg.get("x").path == f"{s3_bucket}/home/masks/{out['id']}.zarr"
    assert keys(f"{s3_bucket}/home/masks/{out['id']}.zarr")


def test_ray_workers_write_one_s3_store(tmp_path: Path, s3_bucket: str, ray_local: object,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    base, target, _ = make_pair(tmp_path, density=0.3, shards=3)
    run("diff", str(base), str(target), "--name", "local", "--sweep", "0,1e-2")
    monkeypatch.setenv(FAIL_ONCE_ENV, str(tmp_path / "failed-once"))
    run("diff", str(base), str(target), "--name", "ray-s3", "--sweep", "0,1e-2",
        "--store", s3_bucket, "--ray")
    assert (tmp_path / "failed-once").exists()
    reg = Registry()
    assert_same_bits(reg, "local", "ray-s3")
    reg.get("ray-s3").store.validate()
    # tasks that never succeed: nothing registered, nothing left in the bucket
    before = keys(s3_bucket)
    monkeypatch.setenv(FAIL_ONCE_ENV, str(tmp_path / "missing-dir" / "m"))
    with pytest.raises(RuntimeError, match="every attempt"):
        reg.diff(base, target, name="doomed", ray="auto")
    assert keys(s3_bucket) == before
    assert sorted(m["name"] for m in reg.ls()) == ["local", "ray-s3"]
    # overlap --all --ray reads the S3 store from the workers
    run("diff", str(base), str(target), "--name", "local-2", "--tol", "0.1")
    local = run("overlap", "--all", "local", "ray-s3", "local-2")
    remote = run("overlap", "--all", "local", "ray-s3", "local-2", "--ray", "--refresh")
    assert remote["matrix"] == local["matrix"]
    assert [p["n_both"] for p in remote["pairs"]] == [p["n_both"] for p in local["pairs"]]


def test_combine_and_trajectory_write_to_the_s3_store(tmp_path: Path, s3_bucket: str) -> None:
    """`--store` on combine and trajectory: the new masks live on S3, with the same bits as
    the same commands writing locally."""
    store = f"{s3_bucket}/derived"
    base, t1, _ = make_pair(tmp_path / "a", density=0.2, seed=0)
    # a second target of the same base: other updates planted on the same base state
    state = random_state(llama_shapes(), seed=0)
    other, _ = plant_updates(state, 0.3, seed=7)
    t2 = save(other, tmp_path / "b" / "target")
    run("diff", str(base), str(t1), "--name", "m1")
    run("diff", str(base), str(t2), "--name", "m2")
    for op, extra in (("union", []), ("consensus", ["--min-count", "1"])):
        run("combine", op, "m1", "m2", "--name", f"{op}-local", *extra)
        out = run("combine", op, "m1", "m2", "--name", f"{op}-s3", *extra, "--store", store)
        assert out["n_updated"] > 0
    reg = Registry()
    for op in ("union", "consensus"):
        assert reg.get(f"{op}-s3").path == f"{store}/masks/{reg.get(f'{op}-s3').id}.zarr"
        assert_same_bits(reg, f"{op}-local", f"{op}-s3")
    run("trajectory", str(base), str(t1), str(t2), "--name", "traj-local")
    run("trajectory", str(base), str(t1), str(t2), "--name", "traj-s3", "--store", store)
    for suffix in ("-final", "-ever"):
        mask = reg.get("traj-s3" + suffix)
        assert str(mask.path).startswith(f"{store}/masks/")
        assert_same_bits(reg, "traj-local" + suffix, "traj-s3" + suffix)
    assert len({k.split("/")[1] for k in keys(store)}) == 4  # four stores under masks/
