"""Each command imports only what it uses: torch, zarr and numba stay out of the light
commands, and a CPU diff never imports torch. Checked in a fresh interpreter through the
console script's entry point, without timing anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from factory import llama_shapes, plant_updates, random_state, save

from maskhub import Registry

HEAVY = ("torch", "zarr", "numba", "pyarrow", "huggingface_hub", "matplotlib")

pytest_plugins = ["hub_fixture"]

# Runs one command as `maskhub ARGS` would, then reports which heavy packages got imported.
PROBE = """
import json, sys
watch = set(json.loads(sys.argv[2]))
sys.argv = ["maskhub", *json.loads(sys.argv[1])]
from maskhub.entry import run
code = 0
try:
    run()
except SystemExit as exc:
    code = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & watch)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def imported(*args: str, watch: tuple[str, ...] = HEAVY) -> list[str]:
    """The heavy top-level packages (those of ``watch``) that ``maskhub ARGS`` imported; the
    command must succeed."""
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args), json.dumps(watch)],
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None), proc.stderr
    return report["heavy"]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A bf16 checkpoint pair with planted updates."""
    state = random_state(llama_shapes())
    target, _ = plant_updates(state, 0.2)
    save(state, tmp_path / "base.safetensors")
    save(target, tmp_path / "target.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "target.safetensors"


def test_light_commands_import_neither_torch_nor_zarr_nor_numba(pair: tuple[Path, Path]
                                                                ) -> None:
    reg = Registry()
    reg.diff(*pair, name="first", device="cpu")
    reg.diff(*pair, name="second", device="cpu", tol=0.5)
    assert imported("--help") == []
    assert imported("ls") == []
    assert imported("sql", "select name, sparsity from masks") == []
    assert imported("show", "first") == []
    assert imported("diff", "--help") == []
    assert "torch" not in imported("overlap", "first", "second")  # counted: zarr is needed
    assert imported("overlap", "first", "second") == []  # now answered from the cache


def test_a_cpu_diff_never_imports_torch(pair: tuple[Path, Path]) -> None:
    # A small local diff needs none of them: the store is written without zarr, and below
    # NUMBA_MIN_BYTES of input the numpy kernel beats importing numba (same bits).
    assert imported("diff", str(pair[0]), str(pair[1]), "--name", "cpu", "--device", "cpu") \
        == []
    heavy = imported("diff", str(pair[0]), str(pair[1]), "--name", "auto")  # no GPU here
    assert "torch" not in heavy
    assert [r["name"] for r in Registry().ls()] == ["auto", "cpu"]
    assert Registry().get("cpu")["model.norm.weight"].shape == (16,)  # a valid Zarr store
    # A local store is read without zarr too (its zarr.json documents, then the chunk files)
    assert imported("verify", "cpu", str(pair[0]), str(pair[1]), "--tol", "1e-5") == []
    # A trajectory of checkpoints reads them mapped, as the diff does: no torch (~1 s)
    assert "torch" not in imported("trajectory", str(pair[0]), str(pair[1]), str(pair[0]),
                                   "--name", "traj")


def test_large_diffs_use_numba_small_ones_numpy() -> None:
    from maskhub.kernels import fastkernel
    from maskhub.kernels.kernel import NUMBA_MIN_BYTES, backend_for

    assert backend_for(NUMBA_MIN_BYTES - 1) == "numpy"
    assert backend_for(NUMBA_MIN_BYTES) == ("numba" if fastkernel.HAVE_NUMBA else "numpy")


def test_rank_imports_torch_only_because_it_needs_it(pair: tuple[Path, Path]) -> None:
    assert "torch" in imported("diff", str(pair[0]), str(pair[1]), "--name", "r", "--rank")


def count_connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the DuckDB connections opened from now on, as they open."""
    from maskhub.storage.engine import duckdb

    opened: list[str] = []
    real_connect = duckdb.connect

    def counting_connect(*args: object, **kwargs: object) -> duckdb.DuckDBPyConnection:
        opened.append(str(args[0]) if args else "")
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(duckdb, "connect", counting_connect)  # the module maskhub calls
    return opened


def test_duckdb_connections_per_command(pair: tuple[Path, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection costs ~10 ms of a light command: one per command (the migration check
    shares it); a small local diff holds one from its name check to its registration; a
    larger one (here: the threshold lowered to 0) opens two, so that the registry stays
    unlocked while it works (the name is checked before the work starts)."""
    from click.testing import CliRunner

    import maskhub.diff.run as diff_run
    from maskhub.cli import main

    opened = count_connections(monkeypatch)

    def connections(*args: str) -> int:
        opened.clear()
        result = CliRunner().invoke(main, list(args))
        assert result.exit_code == 0, result.output
        return len(opened)

    assert connections("diff", str(pair[0]), str(pair[1]), "--name", "a") == 1  # created too
    assert connections("diff", str(pair[0]), str(pair[1]), "--name", "b") == 1
    assert connections("diff", str(pair[0]), str(pair[1]), "--name", "c", "--force") == 1
    monkeypatch.setattr(diff_run, "ONE_CONNECTION_BYTES", 0)
    assert connections("diff", str(pair[0]), str(pair[1]), "--name", "b2") == 2
    assert connections("diff", str(pair[0]), str(pair[1]), "--force") == 2
    assert connections("ls") == 1
    assert connections("sql", "select 1") == 1
    assert connections("show", "a") == 1
    assert connections("overlap", "a", "b") == 2  # counted, then the cache written
    assert connections("overlap", "a", "b") == 1


def test_push_and_pull_import_no_pyarrow_nor_numpy_and_open_two_connections(
        pair: tuple[Path, Path], hub_server: object, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 25: push and pull write and read ``tensors.parquet`` through DuckDB, so that
    neither imports pyarrow (nor zarr, torch or numba); they validate the store (JSON
    nesting, chunk decoding, bit counts, gap codes) without numpy, whose import was a tenth
    of a second of each; each opens two DuckDB connections
    (push: the mask, its rows and the Parquet, then the recording write; pull: the
    already-pulled lookups, then the Parquet, the name and the registration)."""
    from click.testing import CliRunner

    from maskhub.cli import main

    home = str(Registry().home)
    Registry().diff(*pair, name="m", device="cpu")
    watch = (*HEAVY, "numpy")
    assert imported("push", "m", "alice/m", watch=watch) == ["huggingface_hub"]
    monkeypatch.setenv("MASKHUB_HOME", str(tmp_path / "puller"))
    assert imported("pull", "alice/m", watch=watch) == ["huggingface_hub"]
    assert [r["name"] for r in Registry(tmp_path / "puller").ls()] == ["m"]

    opened = count_connections(monkeypatch)
    result = CliRunner().invoke(main, ["push", "m", "alice/m2", "--home", home])
    assert result.exit_code == 0, result.output
    assert len(opened) == 2
    other = tmp_path / "second"
    Registry(other).index.migrate()  # a user's registry exists already
    opened.clear()
    result = CliRunner().invoke(main, ["pull", "alice/m2", "--home", str(other)])
    assert result.exit_code == 0, result.output
    assert len(opened) == 2
    assert [r["name"] for r in Registry(other).ls()] == ["m"]
