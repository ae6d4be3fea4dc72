"""Issue 26: the messages and conventions a newcomer meets, each as it was found wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from click.testing import CliRunner
from clitools import fail_line
from factory import llama_shapes, random_state, save

from maskhub import Registry
from maskhub.cli import main

MASKHUB = [sys.executable, "-c", "from maskhub.entry import run; run()"]


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_home_that_does_not_exist_is_not_created_by_reading(tmp_path: Path) -> None:
    home = tmp_path / "nonexistent" / "deep" / "dir"
    for command in (["ls"], ["sql", "select 1"], ["show", "x"]):
        assert fail_line("--home", str(home), *command) == (
            f"Error: no registry at {home}: no such directory (`maskhub diff` or "
            "`maskhub demo` creates one)")
        assert fail_line(*command, "--home", str(home)).startswith("Error: no registry at")
    assert not (tmp_path / "nonexistent").exists()


def test_ls_where_without_a_match(tmp_path: Path) -> None:
    base = random_state(llama_shapes(), seed=0)
    b = save(base, tmp_path / "b")
    Registry().diff(b, b, name="same", algorithm="dpo")
    res = cli("ls", "--where", "algorithm = 'ppo'")
    assert res.exit_code == 0 and res.stderr == "no masks match --where\n"


def _pair_disjoint(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A base and two targets that update disjoint halves of every weight matrix."""
    base = random_state(llama_shapes(), torch.bfloat16, seed=0)
    t1, t2 = {}, {}
    for name, t in base.items():
        a, b = t.clone(), t.clone()
        if "norm" not in name:
            flat_a, flat_b = a.view(-1), b.view(-1)
            flat_a[0::2] += 1.0
            flat_b[1::2] += 1.0
        t1[name], t2[name] = a, b
    return (save(base, tmp_path / "sft"), save(t1, tmp_path / "even"),
            save(t2, tmp_path / "odd"))


def test_overlap_words_and_parents_by_name(tmp_path: Path) -> None:
    base, even, odd = _pair_disjoint(tmp_path)
    reg = Registry()
    reg.diff(base, even, name="even")
    reg.diff(base, odd, name="odd")
    res = cli("overlap", "even", "odd")
    assert res.exit_code == 0, res.output
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("below random: 0x the magnitude-stratified expectation")
    res = cli("overlap", "--all")
    assert res.exit_code == 0 and "1 pair, " in res.stdout and "1 pairs" not in res.stdout
    reg.combine("union", ["even", "odd"], name="both")
    res = cli("show", "both")
    row = next(ln for ln in res.stdout.splitlines() if ln.startswith("parents"))
    assert row.split()[-1] == "even,odd"


def test_fsck_store_help_says_what_fsck_does_with_it() -> None:
    res = cli("fsck", "--help")
    assert "Write the mask store" not in res.stdout
    assert "Also look for orphan mask stores under this store root" in " ".join(
        res.stdout.split())


def test_closed_pipe_exits_0_quietly_and_no_live_bar_without_a_tty(tmp_path: Path) -> None:
    env = {**os.environ, "FORCE_COLOR": "1"}  # as ipykernel sets it in a notebook
    base, even, _ = _pair_disjoint(tmp_path)
    proc = subprocess.run([*MASKHUB, "diff", str(base), str(even), "--name", "e"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[?25l" not in proc.stderr and "\r" not in proc.stderr  # no live bar
    # `maskhub sql ... | head -1`: the reader goes away after one line
    reader = subprocess.Popen([*MASKHUB, "sql", "select * from range(200000)", "--format",
                               "csv"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout is not None and reader.stdout.readline() == b"range\n"
    reader.stdout.close()
    assert reader.wait(timeout=120) == 0
    assert reader.stderr is not None and reader.stderr.read() == b""


def test_offline_hub_is_one_line_at_once(monkeypatch) -> None:
    """A Hub whose host name does not resolve: no retries with back-off (they took 26 s)."""
    env = {**os.environ, "HF_ENDPOINT": "https://hub.invalid", "HF_HUB_OFFLINE": "0"}
    for args, line in (
            (["search"], "Error: Hub search: the Hub cannot be reached (hub.invalid does not "
                         "resolve: offline?)"),
            (["search", "--quiet"], "Error: Hub search: the Hub cannot be reached "
                                    "(hub.invalid does not resolve: offline?)"),
            (["pull", "org/some-mask"], "Error: org/some-mask is not (completely) in the "
             "local Hugging Face cache and the Hub cannot be reached (hub.invalid does not "
             "resolve: offline?)")):
        start = time.monotonic()
        proc = subprocess.run([*MASKHUB, *args], capture_output=True, text=True, env=env)
        took = time.monotonic() - start
        assert proc.returncode == 1
        assert proc.stderr.splitlines() == [line], proc.stderr
        assert took < 20  # start-up included; five retries took 26 s more


def test_shell_completion_of_mask_names(tmp_path: Path) -> None:
    from click.shell_completion import BashComplete

    base = save(random_state(llama_shapes(), seed=0), tmp_path / "b")
    Registry().diff(base, base, name="dpo-one")
    Registry().diff(base, base, name="grpo-one", force=True)
    complete = BashComplete(main, {}, "maskhub", "_MASKHUB_COMPLETE")
    for args in (["show"], ["rm"], ["edit"], ["export"], ["overlap", "grpo-one"]):
        got = [c.value for c in complete.get_completions(args, "dp")]
        assert got == ["dpo-one"], args
    got = [c.value for c in complete.get_completions(["--home", str(tmp_path / "none"),
                                                      "show"], "")]
    assert got == [] and not (tmp_path / "none").exists()
