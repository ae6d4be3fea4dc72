"""Errors from the environment, translated in one place (``maskhub.errors.environment_failure``):
a disk that is really full (a small tmpfs filled to the last byte, or a file-size limit set on
the process) met by a store write, by DuckDB (the index's creation, the WAL of a commit) and by
the Hugging Face cache of a pull is one ``Error:`` line naming the path and the cause; nothing
is registered, and once space is freed the next command works and ``fsck`` is clean."""

from __future__ import annotations

import os
import pickle
import re
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from clitools import fail_line, run_json
from factory import make_pair
from hub_fixture import point_client_at

from maskhub.cli import main
from maskhub.errors import DiskFullError, EnvironmentFailure, environment_failure

pytest_plugins = ["hub_fixture"]
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>'.*:DeprecationWarning")

FULL = "no space left on device writing {}: free space there or set {} to a disk with room"
RUN = "import sys; sys.argv[0] = 'maskhub'; from maskhub.entry import run; run()"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of its own (needs the right to mount: root in a container)."""
    path = tmp_path / "disk"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); "
                    "test_a_file_size_limit_is_one_line_too covers the same paths")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to its last byte; returns the filler file (delete it to free space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


def clean_fsck() -> None:
    result = CliRunner().invoke(main, ["fsck"])
    assert result.exit_code == 0 and result.stdout.startswith("clean: "), result.output


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    base, target, _ = make_pair(tmp_path_factory.mktemp("pair"))
    return str(base), str(target)


def test_a_store_write_on_a_full_disk(disk: Path, pair: tuple[str, str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    home = disk / "home"
    monkeypatch.setenv("MASKHUB_HOME", str(home))
    run_json("diff", *pair, "--name", "a", "--device", "cpu")
    filler = fill(disk)
    line = fail_line("diff", *pair, "--name", "b", "--device", "cpu", "--tol", "0.5")
    staging = re.escape(f"{home}/tmp/") + r"[0-9a-f]{32}\." + str(os.getpid()) + r"\.partial"
    assert re.fullmatch("Error: " + re.escape(FULL).replace(r"\{\}", "{}").format(
        staging, "MASKHUB_HOME"), line), line
    assert list((home / "tmp").iterdir()) == []  # nothing staged is left
    filler.unlink()
    assert [m["name"] for m in run_json("ls")] == ["a"]  # nothing registered
    clean_fsck()
    run_json("diff", *pair, "--name", "b", "--device", "cpu", "--tol", "0.5")  # space: works


def test_duckdb_on_a_full_disk_at_a_commit_and_at_creation(
        disk: Path, pair: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    home, fresh = disk / "home", disk / "fresh"
    monkeypatch.setenv("MASKHUB_HOME", str(home))
    run_json("diff", *pair, "--name", "a", "--device", "cpu")
    run_json("diff", *pair, "--name", "b", "--device", "cpu", "--tol", "0.02")
    filler = fill(disk)
    # overlap writes only its cache rows: the commit's WAL meets the full disk
    assert fail_line("overlap", "a", "b") == "Error: " + FULL.format(
        home / "registry.duckdb", "MASKHUB_HOME")
    # A new home whose directory exists (a reading command creates no directory): ls
    # creates the index there, and DuckDB cannot create its file.
    monkeypatch.setenv("MASKHUB_HOME", str(fresh))
    fresh.mkdir()
    assert fail_line("ls") == "Error: " + FULL.format(fresh / "registry.duckdb", "MASKHUB_HOME")
    assert not (fresh / "registry.duckdb").exists()  # no empty file that DuckDB cannot open
    filler.unlink()
    assert run_json("ls") == []
    clean_fsck()
    monkeypatch.setenv("MASKHUB_HOME", str(home))
    clean_fsck()
    assert run_json("overlap", "a", "b")["n_a"] == run_json("show", "a")["mask"]["n_updated"] == 526


def test_a_pull_into_a_full_or_read_only_hugging_face_cache(
        disk: Path, hub_server: object, tmp_path: Path, pair: tuple[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    run_json("diff", *pair, "--name", "m", "--device", "cpu")
    run_json("push", "m", "alice/m")
    point_client_at(hub_server, monkeypatch, disk / "hf_home")  # the cache on the small disk
    monkeypatch.setenv("MASKHUB_HOME", str(tmp_path / "elsewhere"))
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    try:
        line = fail_line("pull", "alice/m")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    assert line == (f"Error: read-only file system writing {disk}/hf_home/hub: make it "
                    "writable or set HF_HUB_CACHE to a directory you can write")
    filler = fill(disk)
    assert fail_line("pull", "alice/m") == "Error: " + FULL.format(
        disk / "hf_home" / "hub", "HF_HUB_CACHE")  # not "network error"
    assert run_json("ls") == []
    filler.unlink()
    assert run_json("pull", "alice/m")["status"] == "registered"
    clean_fsck()


def maskhub_limited(home: Path, limit: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``maskhub ARGS`` in a process whose files cannot grow past ``limit`` bytes
    (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write past it fails with EFBIG)."""
    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True,
                          env={**os.environ, "MASKHUB_HOME": str(home)},
                          preexec_fn=limit_files, timeout=120)


def test_a_file_size_limit_is_one_line_too(tmp_path: Path, pair: tuple[str, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The same boundaries without the right to mount: a file-size limit (EFBIG)."""
    home = tmp_path / "home"
    monkeypatch.setenv("MASKHUB_HOME", str(home))
    run_json("diff", *pair, "--name", "a", "--device", "cpu")
    run_json("diff", *pair, "--name", "b", "--device", "cpu", "--tol", "0.02")
    advice = "raise the limit (ulimit -f) or set MASKHUB_HOME elsewhere"
    done = maskhub_limited(home, 1024, "overlap", "a", "b")
    assert (done.returncode, done.stderr) == (1, f"Error: file too large for a file-size limit "
                                                 f"writing {home}/registry.duckdb: {advice}\n")
    done = maskhub_limited(home, 1024, "diff", *pair, "--name", "c", "--tol", "0.5")
    assert done.returncode == 1 and re.fullmatch(
        "Error: file too large for a file-size limit writing " + re.escape(f"{home}/tmp/")
        + r"[0-9a-f]{32}\.\d+\.partial: " + re.escape(advice) + "\n", done.stderr), done.stderr
    assert sorted(m["name"] for m in run_json("ls")) == ["a", "b"]
    assert list((home / "tmp").iterdir()) == []
    clean_fsck()
    assert run_json("overlap", "a", "b")["n_a"] == run_json("show", "a")["mask"]["n_updated"] == 526


def test_the_translation_itself() -> None:
    """The mapping of ``errors.py``: errno and library text to one class and message; other
    errors untouched."""
    full = environment_failure(OSError(28, "No space left on device", "/x/y"))
    assert isinstance(full, DiskFullError) and isinstance(full, OSError)
    assert str(full) == FULL.format("/x/y", "MASKHUB_HOME") and full.code == 28
    back = pickle.loads(pickle.dumps(full))  # crosses processes (Ray tasks) intact
    assert (type(back), str(back), back.path, back.code) == (DiskFullError, str(full), "/x/y", 28)
    duck = RuntimeError('Failed to commit: Could not write file "/h/registry.duckdb.wal": '
                        "Read-only file system")
    ro = environment_failure(duck, doing="committing to", setting="X")
    assert isinstance(ro, PermissionError) and isinstance(ro, EnvironmentFailure)
    assert str(ro) == ("read-only file system committing to /h/registry.duckdb.wal: make it "
                       "writable or set X to a directory you can write")
    try:
        try:
            raise OSError(24, "Too many open files")
        except OSError as exc:
            raise ValueError("while reading") from exc
    except ValueError as wrapped:
        assert str(environment_failure(wrapped, "/d", "reading")) == (
            "too many open files reading /d: raise the limit (ulimit -n) and retry")
    denied = environment_failure(PermissionError(13, "Permission denied", "/h/tmp"))
    assert isinstance(denied, PermissionError) and str(denied) == (
        "permission denied writing /h/tmp: fix its permissions or set MASKHUB_HOME to a "
        "directory you can write")
    assert environment_failure(FileNotFoundError(2, "No such file or directory")) is None
    assert environment_failure(ValueError("bad value")) is None

