"""Trajectories over built checkpoint sequences with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factory import llama_shapes, random_state, save

from maskhub import Registry
from maskhub.analytics import trajectory
from maskhub.cli import main


def _sequence(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """checkpoint-0..300: S1 changed at 100, S2 at 200, S1 reverted and S3 changed at 300."""
    c0 = random_state(llama_shapes(), torch.bfloat16, seed=4)
    g = torch.Generator().manual_seed(9)
    sets: dict[str, dict[str, np.ndarray]] = {"S1": {}, "S2": {}, "S3": {}}
    states = [dict(c0), {}, {}, {}]
    for name, t in c0.items():
        u = torch.rand(t.shape, generator=g)
        s1, s2, s3 = u < 0.1, (u >= 0.1) & (u < 0.15), (u >= 0.15) & (u < 0.3)
        bump = (t.to(torch.float64) + 0.25).to(t.dtype)
        states[1][name] = torch.where(s1, bump, t)
        states[2][name] = torch.where(s1 | s2, bump, t)
        states[3][name] = torch.where(s2 | s3, bump, t)
        for key, m in zip(("S1", "S2", "S3"), (s1, s2, s3), strict=True):
            sets[key][name] = m.numpy()
    for i, st in enumerate(states):
        save(st, root / f"checkpoint-{i * 100}", shards=2 if i % 2 else 1)
    return sets


def _count(sets: dict[str, np.ndarray]) -> int:
    return sum(int(m.sum()) for m in sets.values())


def test_trajectory_counts_cancelled_updates(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # the points go in by INSERTs of several rows: 3 + 1 here
    monkeypatch.setattr(trajectory, "_POINTS_PER_INSERT", 3)
    root = tmp_path / "run"
    sets = _sequence(root)
    n1, n2, n3 = (_count(sets[k]) for k in ("S1", "S2", "S3"))
    res = CliRunner().invoke(main, ["trajectory", str(root), "--name", "run", "--json",
                                    "--plot", str(tmp_path / "traj.png")])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    n = data["n_params"]
    assert n == sum(m.size for m in sets["S1"].values())
    pts = data["points"]
    assert [p["step"] for p in pts] == [0, 100, 200, 300]
    assert [p["n_updated_vs_first"] for p in pts] == [0, n1, n1 + n2, n2 + n3]
    assert [p["n_updated_vs_prev"] for p in pts] == [0, n1, n2, n1 + n3]
    assert [p["n_ever"] for p in pts] == [0, n1, n1 + n2, n1 + n2 + n3]
    assert [p["n_not_in_final"] for p in pts] == [0, n1, n1, 0]  # Figure 6
    assert (data["n_subnetwork"], data["n_cancelled"], data["n_never"]) == (
        n2 + n3, n1, n - n1 - n2 - n3)
    assert data["frac_never"] + data["frac_cancelled"] + data["frac_subnetwork"] == 1.0

    reg = Registry()
    final, ever = reg.get("run-final"), reg.get("run-ever")
    for name in sets["S1"]:
        assert np.array_equal(final[name], sets["S2"][name] | sets["S3"][name]), name
        assert np.array_equal(ever[name], sets["S1"][name] | sets["S2"][name]
                              | sets["S3"][name]), name
    cols, rows = reg.sql("select idx, step, n_updated_vs_first, n_ever, n_not_in_final "
                         "from trajectory_points order by idx")
    assert rows == [(i, p["step"], p["n_updated_vs_first"], p["n_ever"], p["n_not_in_final"])
                    for i, p in enumerate(pts)]
    assert [r[3] for r in rows] == [0, n1, n1 + n2, n1 + n2 + n3]
    cols, rows = reg.sql("select n_cancelled, final_mask_id from trajectories")
    assert rows == [(n1, final.id)]
    direct = reg.diff(root / "checkpoint-0", root / "checkpoint-300", name="direct")
    strata = ("select tensor, stratum, numel, n_updated from tensor_strata where mask_id = '{}' "
              "order by 1, 2")
    assert reg.sql(strata.format(final.id))[1] == reg.sql(strata.format(direct.id))[1]
    png = tmp_path / "traj.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png.read_bytes()[16:20], "big"), \
        int.from_bytes(png.read_bytes()[20:24], "big")
    assert (width, height) == (1000, 400)


def test_trajectory_explicit_list_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _sequence(root)
    res = CliRunner().invoke(main, ["trajectory", str(root / "checkpoint-0")])
    assert res.exit_code == 1 and "at least two checkpoints" in res.output
    res = CliRunner().invoke(main, ["trajectory", str(root / "checkpoint-0"),
                                    str(root / "checkpoint-300")])
    assert res.exit_code == 0, res.output
    assert "registered checkpoint-300-final and checkpoint-300-ever" in res.stdout
    res = CliRunner().invoke(main, ["trajectory", str(root / "checkpoint-0"),
                                    str(root / "checkpoint-300")])
    assert res.exit_code == 1 and "already exists" in res.output
    assert len(Registry().ls()) == 2


def test_ever_updated_means_against_the_first_checkpoint(tmp_path: Path) -> None:
    """One definition of "ever updated": |θk − θ0| > tol at some k. Entry 0 drifts by 0.4 tol
    per step (never more than tol between consecutive checkpoints) and crosses tol at step 3;
    entry 1 jumps at step 1 and comes back (cancelled); entry 2 jumps at step 2 and stays;
    entry 3 wiggles within tol of θ0 (never touched)."""
    tol = 1e-3
    values = [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
              [1.0 + 0.4 * tol, 1.0 + 5 * tol, 1.0, 1.0 + 0.3 * tol, 1.0, 1.0],
              [1.0 + 0.8 * tol, 1.0, 1.0 + 5 * tol, 1.0 - 0.3 * tol, 1.0, 1.0],
              [1.0 + 1.2 * tol, 1.0, 1.0 + 5 * tol, 1.0, 1.0, 1.0]]
    root = tmp_path / "drift"
    for i, v in enumerate(values):
        save({"w": torch.tensor(v, dtype=torch.float64)}, root / f"checkpoint-{i}")
    res = CliRunner().invoke(main, ["trajectory", str(root), "--name", "d", "--tol", str(tol),
                                    "--algorithm", "grpo", "--seed", "3", "--dataset", "gsm8k",
                                    "--tag", "sweep-a", "--json"])
    assert res.exit_code == 0, res.output
    pts = json.loads(res.stdout)["points"]
    assert [p["n_updated_vs_prev"] for p in pts] == [0, 1, 2, 0]  # 0's steps never count
    assert [p["n_updated_vs_first"] for p in pts] == [0, 1, 1, 2]
    assert [p["n_ever"] for p in pts] == [0, 1, 2, 3]
    assert all(p["n_ever"] >= p["n_updated_vs_first"] for p in pts)
    assert [p["n_not_in_final"] for p in pts] == [0, 1, 0, 0]
    data = json.loads(res.stdout)
    assert (data["n_subnetwork"], data["n_cancelled"], data["n_never"]) == (2, 1, 3)
    reg = Registry()
    assert reg.get("d-ever")["w"].tolist() == [True, True, True, False, False, False]
    assert reg.get("d-final")["w"].tolist() == [True, False, True, False, False, False]
    # magnitude strata from C0's exponents (1.0 in float64: exponent field 1023 -> a single
    # stratum for this dtype, which maskhub treats as one whole-tensor stratum)
    _, strata = reg.sql("select m.name, s.stratum, s.numel, s.n_updated from tensor_strata s "
                        "join masks m on m.id = s.mask_id order by 1")
    assert strata == [("d-ever", -1, 6, 3), ("d-final", -1, 6, 2)]
    _, rows = reg.sql("select name, algorithm, seed, dataset, tags, operation from masks "
                      "order by name")
    assert rows == [("d-ever", "grpo", 3, "gsm8k", ["sweep-a"], "trajectory-ever"),
                    ("d-final", "grpo", 3, "gsm8k", ["sweep-a"], "trajectory-final")]
    text = CliRunner().invoke(main, ["trajectory", str(root), "--name", "e", "--tol",
                                     str(tol)]).stdout
    assert "not in final" in text



@pytest.mark.parametrize("hard", [4096, 262])
def test_a_trajectory_raises_a_low_open_files_limit_or_says_so(tmp_path: Path,
                                                              hard: int) -> None:
    """Every file of every checkpoint is mapped at once (two descriptors each: 6 files here,
    12 plus a margin of 256): a soft limit below that is raised up to the hard limit, and a
    hard limit below it is a one-line error, with nothing registered."""
    import resource
    import subprocess
    import sys

    root = tmp_path / "run"
    _sequence(root)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (262, hard))

    proc = subprocess.run([sys.executable, "-c", "from maskhub.entry import run; run()",
                           "trajectory", str(root), "--name", "fd"], capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)
    if hard > 268:
        assert proc.returncode == 0, proc.stderr
        assert [r["name"] for r in Registry().ls()] == ["fd-ever", "fd-final"]
    else:
        assert proc.returncode != 0
        assert proc.stderr.strip().splitlines() == [
            "Error: this needs about 268 open files and the limit is 262: raise it "
            "(`ulimit -n 268`) or pass fewer checkpoints or shards"]
        assert Registry().ls() == []
