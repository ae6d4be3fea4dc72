"""Recovery at open is bounded: a killed import's staging directory, however many files it
holds, is settled by one rename into ``tmp/trash`` at the next open, whose files are then
deleted a bounded amount per open (``maskhub fsck --repair``: all at once)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from test_import import hand_written_store

from maskhub.core.crashpoints import ENV
from maskhub.storage.trash import OPEN_FILES

RUN = "import sys; sys.argv[0] = 'maskhub'; from maskhub.entry import run; run()"
PADDING = 20_000  # chunk files of a large store (the import left ~93,000)


def maskhub(home: Path, *args: str, kill_at: str | None = None
            ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MASKHUB_HOME": str(home)}
    env.pop(ENV, None)
    if kill_at is not None:
        env[ENV] = kill_at
    return subprocess.run([sys.executable, "-c", RUN, *args], env=env, capture_output=True,
                          text=True, timeout=120)


def files_under(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def test_a_killed_import_with_20000_staged_files_costs_an_open_a_bounded_amount(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = hand_written_store(tmp_path / "big-run.zarr")
    killed = maskhub(home, "import", str(store), kill_at="register:staged")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (staging,) = (home / "tmp").glob("*.partial")  # left by the killed import
    for d in range(20):  # pad it to a large store's number of chunk files
        chunks = staging / "pad" / "c" / str(d)
        chunks.mkdir(parents=True)
        for i in range(PADDING // 20):
            (chunks / str(i)).touch()
    total = files_under(staging)
    assert total > PADDING

    listed = maskhub(home, "ls", "--json")  # the next open recovers
    assert listed.returncode == 0 and listed.stdout.strip() == "[]", listed.stderr
    assert [p.name for p in (home / "tmp").iterdir()] == ["trash"]  # settled: one rename
    left = files_under(home / "tmp" / "trash")
    assert total - OPEN_FILES <= left < total  # some deleted, never more than the budget

    again = maskhub(home, "ls", "--json")  # each open deletes a bounded amount more
    assert again.returncode == 0
    left_again = files_under(home / "tmp" / "trash")
    assert left - OPEN_FILES <= left_again < left

    check = maskhub(home, "fsck")
    assert check.returncode == 0, check.stdout
    assert check.stdout.splitlines() == [
        f"clean: 0 mask(s), 0 store(s), 0 array(s) checked ({left_again} file(s) left by "
        "interrupted writes in tmp/trash, deleted a bounded amount at each open; fsck "
        "--repair deletes them now)"]
    repair = maskhub(home, "fsck", "--repair")
    assert repair.returncode == 0, repair.stdout
    assert repair.stdout.startswith("clean: 0 mask(s), 0 store(s), 0 array(s) checked "
                                    "(deleted ")
    assert list((home / "tmp").iterdir()) == []
    assert maskhub(home, "fsck").stdout.splitlines() == [
        "clean: 0 mask(s), 0 store(s), 0 array(s) checked"]
    fresh = maskhub(home, "import", str(store), "--json")  # the same import now succeeds
    assert fresh.returncode == 0, fresh.stderr
