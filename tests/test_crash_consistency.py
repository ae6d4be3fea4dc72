"""kill -9 anywhere: a `maskhub diff`, `combine`, `pull` or `rm` subprocess is killed with
SIGKILL at each named step of the commit protocol (``MASKHUB_TEST_KILL_AT``, see
:mod:`maskhub.core.crashpoints`) and at random instants. After each kill, ``fsck`` (opened
without recovery) sees exactly what the crash left; the next writable open recovers; then
``fsck`` is clean, the mask is whole or absent as the step implies, and a fresh command with
the same name succeeds. The trials and their outcomes are printed (``pytest -s``)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from factory import llama_shapes, plant_updates, random_state, save
from hubserver import HubServer

from maskhub import Registry
from maskhub.core.crashpoints import ENV, STEPS

pytest_plugins = ["hub_fixture"]
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>'.*:DeprecationWarning")

REGISTER_STEPS = [s for s in STEPS if s.startswith("register:")]
RM_STEPS = [s for s in STEPS if s.startswith("rm:")]
#: Whether the mask is registered after a kill at each step (and the next open's recovery).
SURVIVES = {"register:staged": False, "register:intent-written": False,
            "register:published": False, "register:committed": True,
            "rm:intent-written": True, "rm:tombstoned": True, "rm:committed": False,
            "rm:half-deleted": False}
#: What fsck reports after a kill at each step, before any recovery.
LEFT_BEHIND = {"register:staged": {"stale-staging"},
               "register:intent-written": {"stale-staging", "interrupted"},
               "register:published": {"interrupted"}, "register:committed": {"interrupted"},
               "rm:intent-written": {"interrupted"}, "rm:tombstoned": {"interrupted"},
               "rm:committed": {"interrupted"}, "rm:half-deleted": {"interrupted"}}
RUN = "import sys; sys.argv[0] = 'maskhub'; from maskhub.entry import run; run()"


def maskhub(home: Path, *args: str, kill_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "MASKHUB_HOME": str(home)}
    env.pop(ENV, None)
    if kill_at is not None:
        env[ENV] = kill_at
    return subprocess.Popen([sys.executable, "-c", RUN, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def killed(home: Path, *args: str, kill_at: str) -> None:
    proc = maskhub(home, *args, kill_at=kill_at)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, err)


def problems(home: Path) -> set[str]:
    """The kinds of problem fsck finds, the registry opened without recovery."""
    return {f.kind for f in Registry(home, recover=False).fsck().findings}


def registered(home: Path, name: str) -> bool:
    return any(r["name"] == name for r in Registry(home, recover=False).ls())


def recover_and_check(home: Path, name: str) -> bool:
    """The next open recovers; fsck is then clean; returns whether ``name`` is registered
    (whole: its store validates against its metadata)."""
    reg = Registry(home)
    report = Registry(home, recover=False).fsck()
    assert report.clean, [f.line() for f in report.findings]
    assert not list((home / "tmp").glob("*")) if (home / "tmp").exists() else True
    if not registered(home, name):
        return False
    reg.get(name).store.validate()
    return True


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("crash-pair")
    base = random_state(llama_shapes(), seed=3)
    target, _ = plant_updates(base, 0.2, 4)
    return str(save(base, root / "base")), str(save(target, root / "target"))


TALLY: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def summary(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the trials and their outcomes once the module's tests ran (in pytest's report,
    not captured)."""
    yield
    trials = sum(v for k, v in TALLY.items() if k != "clean")
    line = (f"crash consistency: {trials} SIGKILL trials, {TALLY['clean']} recovered clean "
            "with fsck clean and a fresh same-name run; " + ", ".join(
                f"{k}: {v}" for k, v in sorted(TALLY.items()) if k != "clean"))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n{line}")


def test_diff_and_combine_killed_at_every_step(pair: tuple[str, str], tmp_path: Path) -> None:
    home = tmp_path / "home"
    reg = Registry(home)
    reg.diff(*pair, name="a", device="cpu")
    reg.diff(*pair, name="b", device="cpu", tol=0.5)
    for command, name in ((["diff", *pair, "--device", "cpu"], "m"),
                          (["combine", "union", "a", "b"], "u")):
        for step in REGISTER_STEPS:
            killed(home, *command, "--name", name, kill_at=step)
            assert problems(home) == LEFT_BEHIND[step], (command[0], step)
            assert recover_and_check(home, name) is SURVIVES[step], (command[0], step)
            TALLY[f"{command[0]} {'registered' if SURVIVES[step] else 'absent'}"] += 1
            if command[0] == "combine":
                lineage = reg.sql("SELECT count(*) FROM mask_lineage l JOIN masks m "
                                  "ON m.id = l.mask_id WHERE m.name = 'u'")[1][0][0]
                assert lineage == (2 if SURVIVES[step] else 0)
            if SURVIVES[step]:
                reg.rm(name)
            fresh = maskhub(home, *command, "--name", name)  # the same name: it must succeed
            assert fresh.wait(timeout=120) == 0, fresh.stderr.read()
            assert recover_and_check(home, name)
            reg.rm(name)
            TALLY["clean"] += 1


def test_rm_killed_at_every_step(pair: tuple[str, str], tmp_path: Path) -> None:
    home = tmp_path / "home"
    reg = Registry(home)
    for step in RM_STEPS:
        mask = reg.diff(*pair, name="victim", device="cpu")
        killed(home, "rm", "victim", kill_at=step)
        assert problems(home) == LEFT_BEHIND[step], step
        assert recover_and_check(home, "victim") is SURVIVES[step], step
        if SURVIVES[step]:
            assert reg.get("victim").id == mask.id
            reg.rm("victim")
        assert not (home / "masks" / f"{mask.id}.zarr.removing").exists()
        TALLY[f"rm {'kept' if SURVIVES[step] else 'removed'}"] += 1
        TALLY["clean"] += 1


def test_pull_killed_at_every_step(pair: tuple[str, str], tmp_path: Path,
                                   hub_server: HubServer, monkeypatch: pytest.MonkeyPatch
                                   ) -> None:
    src = Registry(tmp_path / "src")
    mask = src.diff(*pair, name="hubbed", device="cpu")
    mask.push_to_hub("alice/crash")
    home = tmp_path / "home"
    for step in REGISTER_STEPS:
        killed(home, "pull", "alice/crash", kill_at=step)
        assert problems(home) == LEFT_BEHIND[step], step
        assert recover_and_check(home, "hubbed") is SURVIVES[step], step
        TALLY[f"pull {'registered' if SURVIVES[step] else 'absent'}"] += 1
        if SURVIVES[step]:
            Registry(home).rm("hubbed")
        fresh = maskhub(home, "pull", "alice/crash")  # same id, same name: must succeed
        assert fresh.wait(timeout=120) == 0, fresh.stderr.read()
        assert recover_and_check(home, "hubbed")
        assert Registry(home).get("hubbed").id == mask.id
        Registry(home).rm("hubbed")
        TALLY["clean"] += 1


def test_diff_killed_at_random_instants(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    base = random_state(llama_shapes(layers=4, hidden=64, inter=96, vocab=64), seed=5)
    target, _ = plant_updates(base, 0.2, 6)
    pair = [str(save(base, root / "base", shards=3)), str(save(target, root / "target",
                                                                  shards=3))]
    home = tmp_path / "home"
    Registry(home)
    start = time.monotonic()
    assert maskhub(home, "diff", *pair, "--device", "cpu", "--name", "timing").wait(120) == 0
    duration = time.monotonic() - start
    Registry(home).rm("timing")
    rng = random.Random(15)
    for trial in range(6):
        # Most of a diff's time is start-up: aim at its second half, where the writes are.
        delay = duration * rng.uniform(0.35, 0.95)
        proc = maskhub(home, "diff", *pair, "--device", "cpu", "--name", "r")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=120)
        outcome = "finished first" if code == 0 else (
            "registered" if registered(home, "r") else "absent")
        assert recover_and_check(home, "r") is (outcome != "absent"), (trial, delay)
        TALLY[f"random-time diff {outcome}"] += 1
        if registered(home, "r"):
            Registry(home).rm("r")
        assert maskhub(home, "diff", *pair, "--device", "cpu", "--name", "r").wait(120) == 0
        assert recover_and_check(home, "r")
        Registry(home).rm("r")
        TALLY["clean"] += 1


def test_edit_killed_between_the_store_rename_and_the_commit(tmp_path: Path) -> None:
    """issue 26: ``maskhub edit`` killed after the store's zarr.json is replaced, before the
    index commits: the store is ahead. fsck finds exactly that (one ``edit-uncommitted``
    line), ``fsck --repair`` puts the index's metadata back in the store, and a fresh edit
    then succeeds with the store and the index agreeing."""
    import json

    import numpy as np
    from clitools import ok

    home = tmp_path / "home"
    reg = Registry(home)
    mask = reg.add({"a.weight": np.eye(4, dtype=bool)}, name="m", base_model="org/base")
    reg.edit("m", tags=["t"])
    doc = home / "masks" / f"{mask.id}.zarr" / "zarr.json"

    def store_attrs() -> dict:
        return json.loads(doc.read_text())["attributes"]

    committed = store_attrs()
    killed(home, "edit", "m", "--algorithm", "grpo", "--name", "m2",
           kill_at="edit:attributes-replaced")
    ahead = store_attrs()
    assert (ahead["name"], ahead["algorithm"], len(ahead["extra"]["edits"])) == ("m2", "grpo", 3)
    report = Registry(home).fsck()  # a recovering open does not hide it
    assert [f.kind for f in report.findings] == ["edit-uncommitted"]
    assert report.findings[0].message == (
        f"mask m ({mask.id[:8]}): its store records 2 edit(s) the index does not (name, "
        f"algorithm differ), e.g. {ahead['extra']['edits'][1]!r} (a `maskhub edit` killed "
        "before its commit; repair: put the index's metadata back in the store)")
    assert reg.get("m").row["algorithm"] is None
    text = ok("--home", str(home), "fsck", "--repair")
    assert text.splitlines()[0].startswith("repaired edit-uncommitted: mask m (")
    assert store_attrs() == committed
    assert problems(home) == set()
    assert maskhub(home, "edit", "m", "--algorithm", "grpo", "--name", "m2").wait(60) == 0
    row = Registry(home).get("m2").row
    assert store_attrs()["extra"]["edits"] == list(row["edits"]) and len(row["edits"]) == 3
    assert (store_attrs()["name"], store_attrs()["algorithm"]) == ("m2", "grpo")
    assert problems(home) == set()
    TALLY["edit rolled back by fsck --repair"] += 1
    TALLY["clean"] += 1
