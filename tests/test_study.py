"""``maskhub study --quick`` end to end through the CLI: real TRL trainers, the registry, the
report. No assertion on the paper's findings (results, not invariants); these check that the
report is complete and true to the registry, and that the masked runs froze what they must."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clitools import fail_line, run_json
from safetensors.torch import load_file

from maskhub import Registry
from maskhub.kernels.threads import torch_threads
from maskhub.study.measure import TRAJECTORY_RUNS
from maskhub.study.model import load_bf16
from maskhub.study.run import STUDY_THREADS
from maskhub.study.runs import FP32_RUNS
from maskhub.study.sizes import QUICK, resolve_size
from maskhub.study.task import answer_loss, make_tokenizer, split_problems

pytest.importorskip("trl")
pytest.importorskip("matplotlib")

TABLES = ("runs", "table1", "fp32", "seeds", "table6", "figure3_layers", "figure3_modules",
          "table2", "table4", "figure2", "figure5", "curve", "conjecture1")
FIGURES = ("figure3-dpo-s0", "figure3-grpo-s0", "table4-overlap", "figure5-dpo-s0",
           "figure5-dpo-s1", "figure5-grpo-s0", "figure5-dpo-nosft-s0", "curves")
RUNS = ("sft", "dpo-s0", "dpo-s1", "grpo-s0", "dpo-nosft-s0", "dpo-sub-s0", "dpo-subcb-s0",
        "dpo-rand-s0", "sfteq-s0", "sfteq-nosft-s0")
VERDICTS = {"reproduced", "not reproduced", "explained by precision", "cannot tell"}


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """One quick study (and a second one with another name, for determinism), in one home:
    the first called with torch at 2 threads, the second at 1 (the study fixes its own)."""
    home = tmp_path_factory.mktemp("study-home")
    out = tmp_path_factory.mktemp("study") / "quick"
    mp = pytest.MonkeyPatch()
    mp.setenv("MASKHUB_HOME", str(home))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        summary = run_json("study", "--quick", "--out", str(out))
        torch.set_num_threads(1)
        # the quick size's own rate and steps, given as flags: the same study, plus a
        # second seed of GRPO and the equal-budget control (--seeds 2)
        again = run_json("study", "--size", "quick", "--lr", "5e-6", "--steps", "20",
                         "--seeds", "2", "--out", str(out.parent / "again"), "--name", "again")
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return home, out, {"first": summary, "again": again}


def _sql(home: Path, query: str) -> list[dict]:
    return run_json("--home", str(home), "sql", query)


def test_report_is_written_with_every_table_and_figure(quick_study: tuple) -> None:
    home, out, summary = quick_study
    report = json.loads((out / "report.json").read_text())
    assert Path(summary["first"]["markdown"]) == out / "report.md"
    assert report["study"] == "study" and report["size"]["name"] == "quick"
    assert list(report["tables"]) == list(TABLES)
    for key, table in report["tables"].items():
        assert table["rows"], f"table {key} is empty"
        assert all(len(r) == len(table["columns"]) for r in table["rows"])
    assert [r[0] for r in report["tables"]["runs"]["rows"]] == [f"study-{r}" for r in RUNS]
    assert set(report["figures"]) == set(FIGURES)
    for rel in report["figures"].values():
        data = (out / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (out / "report.md").read_text()
    for table in report["tables"].values():
        assert f"## {table['title']}" in md and table["sql"] in md
    assert report["timing"]["training_seconds"] > 0 and report["timing"]["maskhub_seconds"] > 0
    assert summary["first"]["masks"] == ["study-dpo-s0", "study-dpo-s0-random",
                                         *(f"study-{r}" for r in RUNS if r != "dpo-s0"),
                                         *(f"study-{r}-fp32" for r in FP32_RUNS)]
    claims = [v["claim"] for v in report["verdicts"]]
    assert len(claims) == 8 and {v["verdict"] for v in report["verdicts"]} <= VERDICTS
    assert md.index("## Verdicts") < md.index("## What this run found")
    assert "were not tuned" in md and "chosen on the" not in md  # --quick's rates


def test_report_numbers_are_the_registry_s(quick_study: tuple) -> None:
    home, out, _ = quick_study
    report = json.loads((out / "report.json").read_text())
    for key, table in report["tables"].items():
        rows = _sql(home, table["sql"])
        assert [list(r.values()) for r in rows] == table["rows"], key
    # The run facts in the report are the masks' own notes.
    runs = {r[0]: dict(zip(report["tables"]["runs"]["columns"], r, strict=True))
            for r in report["tables"]["runs"]["rows"]}
    for name, row in runs.items():
        notes = json.loads(Registry(home).get(name).row["notes"])
        assert row["steps"] == notes["steps"] and row["learning_rate"] == notes["learning_rate"]
        assert row["heldout_acc_after"] == round(100 * notes["accuracy_heldout_after"], 2)
    # Every mask's sparsity in table 1 is its registered count.
    for name, _, _, n_params, n_updated, pct, *_ in report["tables"]["table1"]["rows"]:
        mask = Registry(home).get(name)
        assert (mask.n_params, mask.n_updated) == (n_params, n_updated)
        assert pct == round(100 * (1 - n_updated / n_params), 2)


def test_masked_runs_pass_verify_and_freeze_every_masked_out_entry(quick_study: tuple) -> None:
    home, out, _ = quick_study
    full = Registry(home).get("study-dpo-s0")
    sft = load_file(out / "checkpoints" / "sft" / "model.safetensors")
    for run, mask in (("dpo-sub-s0", full), ("dpo-subcb-s0", full),
                      ("dpo-rand-s0", Registry(home).get("study-dpo-s0-random"))):
        final = sorted((out / "checkpoints" / run).glob("step-*"))[-1]
        check = run_json("--home", str(home), "verify", mask.name,
                         str(out / "checkpoints" / run / "step-0000"), str(final))
        assert check["ok"] is True and check["n_outside"] == 0
        trained = load_file(final / "model.safetensors")
        moved = 0
        for name in full.tensor_names():
            a, b = sft[name].view(torch.int16), trained[name].view(torch.int16)
            inside = torch.from_numpy(mask[name])
            assert torch.equal(a[~inside], b[~inside]), f"{run}: {name} moved outside"
            moved += int((a != b).sum())
        assert moved > 0
        # and the step-0000 checkpoint the runs start from is θ_sft, bit for bit
        start = load_file(out / "checkpoints" / run / "step-0000" / "model.safetensors")
        assert all(torch.equal(start[k].view(torch.int16), sft[k].view(torch.int16)) for k in sft)
    row = _sql(home, "SELECT json_extract(notes, '$.conjecture1.verify_ok') AS ok FROM masks "
                     "WHERE name = 'study-dpo-sub-s0'")
    assert row == [{"ok": "true"}]


def test_trajectories_are_recorded_live_without_intermediate_checkpoints(quick_study: tuple
                                                                        ) -> None:
    home, out, _ = quick_study
    registry = Registry(home)
    for run in TRAJECTORY_RUNS:
        # only the start and the final checkpoint (grading, diff) are written
        assert sorted(p.name for p in (out / "checkpoints" / run).iterdir()) == [
            "fp32-step-0020", "step-0000", "step-0020"]
        points = _sql(home, "SELECT p.step, p.checkpoint, p.n_updated_vs_first, "
                            "p.n_updated_vs_prev FROM trajectory_points p JOIN trajectories t "
                            f"ON t.id = p.trajectory_id WHERE t.name = 'study-traj-{run}' "
                            "ORDER BY p.idx")
        assert [p["step"] for p in points] == [0, 5, 10, 15, 20]
        assert all(p["n_updated_vs_prev"] is not None for p in points[1:])
        # the last point (the bf16 view of the fp32 weights) is the run's own mask, the diff
        # of its saved bf16 checkpoints, bit for bit
        final, mask = registry.get(f"study-traj-{run}-step-20"), registry.get(f"study-{run}")
        assert points[-1]["n_updated_vs_first"] == final.n_updated == mask.n_updated
        for name in mask.tensor_names():
            assert (final[name] == mask[name]).all(), f"{run}: {name}"
        assert final.row["dtype"] == mask.row["dtype"] == "bfloat16"
    md = (out / "report.md").read_text()
    assert "**Trajectories recorded live.**" in md and "no intermediate checkpoint" in md


def test_same_command_gives_the_same_measurements(quick_study: tuple) -> None:
    home, _, _ = quick_study
    query = ("SELECT replace(m.name, split_part(m.name, '-', 1), '') AS run, m.n_updated, "
             "json_extract(m.notes, '$.accuracy_heldout_after') AS acc, "
             "json_extract(m.notes, '$.curve') AS curve, "
             "list(t.n_updated ORDER BY t.tensor) AS per_tensor FROM masks m "
             "JOIN tensors t ON t.mask_id = m.id WHERE list_contains(m.tags, 'study:{}') "
             "AND m.notes IS NOT NULL GROUP BY ALL ORDER BY run")
    first, again = _sql(home, query.format("study")), _sql(home, query.format("again"))
    # --seeds 2 adds runs after the base ones, which stay the same
    assert len(first) == len(RUNS)
    assert first == [r for r in again if r["run"] not in ("-grpo-s1", "-sfteq-s1")]
    assert len(again) == len(RUNS) + 2


def test_bad_study_arguments_are_one_line_errors(quick_study: tuple, tmp_path: Path) -> None:
    home, out, _ = quick_study
    line = fail_line("--home", str(home), "study", "--quick", "--out", str(out))
    assert "already exists and is not an empty directory" in line
    line = fail_line("--home", str(home), "study", "--quick", "--out", str(tmp_path / "x"),
                     "--name", "again")
    assert "already has a mask named 'again-sft'" in line
    assert not (tmp_path / "x").exists()
    assert "invalid mask name" in fail_line("study", "--out", str(tmp_path / "y"),
                                            "--name", "no/slash")
    for flags, expected in (
            (("--lr", "0"), "Error: --lr must be a learning rate above 0 and below 1, not 0.0"),
            (("--lr", "inf"), "Error: --lr must be a learning rate above 0 and below 1, not inf"),
            (("--steps", "0"), "Error: --steps must be a whole number of RL steps from 1 to "
                               "100,000, not 0"),
            (("--seeds", "11"), "Error: --seeds must be a whole number from 1 to 10, not 11"),
            (("--seeds", "0"), "Error: --seeds must be a whole number from 1 to 10, not 0"),
            (("--quick", "--size", "default"),
             "Error: --quick is --size quick; it cannot go with --size default"),
            (("--size", "huge"), "Error: Invalid value for '--size': 'huge' is not one of "
                                 "'default', 'quick'. (see 'maskhub study --help')")):
        assert fail_line("study", "--out", str(tmp_path / "w"), *flags) == expected
    assert not (tmp_path / "w").exists()


def test_size_flags_set_the_rl_runs(quick_study: tuple) -> None:
    _, out, summary = quick_study
    assert resolve_size("quick", lr=1e-5, steps=7) == dataclasses.replace(
        QUICK, dpo_lr=1e-5, grpo_lr=1e-5, dpo_steps=7, grpo_steps=7)
    assert resolve_size("quick") == QUICK
    again = json.loads(Path(summary["again"]["json"]).read_text())
    assert again["flags"] == ["--size", "quick", "--lr", "5e-06", "--steps", "20",
                              "--seeds", "2"]
    assert again["command"].endswith("study --size quick --lr 5e-06 --steps 20 --seeds 2 "
                                     f"--name again --out {out.parent / 'again'}")
    first = json.loads((out / "report.json").read_text())
    assert first["size"]["seeds"] == 1 and again["size"]["seeds"] == 2
    assert {**again["size"], "seeds": 1} == first["size"]
    md = Path(summary["again"]["markdown"]).read_text()
    assert "(5e-06 for DPO, 5e-06 for GRPO) were set with --lr" in md


def test_seeds_table_aggregates_every_seed(quick_study: tuple) -> None:
    home, out, summary = quick_study
    registry = Registry(home)
    for prefix, report_json, kinds in (
            ("study", out / "report.json", {"dpo": 2}),
            ("again", Path(summary["again"]["json"]), {"dpo": 2, "grpo": 2, "sfteq": 2})):
        table = json.loads(report_json.read_text())["tables"]["seeds"]
        rows = [dict(zip(table["columns"], r, strict=True)) for r in table["rows"]]
        assert [(r["runs"], r["n_seeds"]) for r in rows] == [
            (f"{prefix}-{k}", n) for k, n in kinds.items()]
        for row in rows:
            masks = [registry.get(f"{row['runs']}-s{k}") for k in range(row["n_seeds"])]
            sparsity = [100 * (1 - m.n_updated / m.n_params) for m in masks]
            acc = [100 * json.loads(m.row["notes"])["accuracy_heldout_after"] for m in masks]
            assert row["sparsity_min_pct"] == round(min(sparsity), 2)
            assert row["sparsity_max_pct"] == round(max(sparsity), 2)
            assert row["heldout_acc_max_pct"] == round(max(acc), 2)
            assert row["sparsity_mean_pct"] == pytest.approx(sum(sparsity) / 2, abs=0.006)
        verdicts = json.loads(report_json.read_text())["verdicts"]
        dpo = rows[0]
        assert (f"DPO (seeds: mean {dpo['sparsity_mean_pct']:.1f}%, "
                f"{dpo['sparsity_min_pct']:.1f}-{dpo['sparsity_max_pct']:.1f}%, n=2)"
                in verdicts[0]["this_run"])


def test_fp32_masters_are_each_run_s_control(quick_study: tuple) -> None:
    home, out, _ = quick_study
    registry = Registry(home)
    ckpt = out / "checkpoints"
    start = load_file(ckpt / "sft-fp32" / "model.safetensors")
    bf16_start = load_file(ckpt / "sft" / "model.safetensors")
    final = load_file(ckpt / "dpo-s0" / "fp32-step-0020" / "model.safetensors")
    bf16_final = load_file(ckpt / "dpo-s0" / "step-0020" / "model.safetensors")
    control = registry.get("study-dpo-s0-fp32")
    assert control.row["dtype"] == "float32"
    n = 0
    for name, value in final.items():
        # the masters start at the bf16 start's values; the bf16 checkpoint is their cast
        assert torch.equal(start[name], bf16_start[name].float())
        assert torch.equal(value.to(torch.bfloat16), bf16_final[name])
        n += int(((value - start[name]).abs() > 1e-5).sum())
    assert control.n_updated == n
    table = json.loads((out / "report.json").read_text())["tables"]["fp32"]
    rows = {r[0]: dict(zip(table["columns"], r, strict=True)) for r in table["rows"]}
    assert list(rows) == [f"study-{r}" for r in RUNS if r in FP32_RUNS]
    bf16 = registry.get("study-dpo-s0")
    assert rows["study-dpo-s0"]["fp32_sparsity_pct"] == round(100 * (1 - n / control.n_params), 2)
    assert rows["study-dpo-s0"]["bf16_sparsity_pct"] == round(
        100 * (1 - bf16.n_updated / bf16.n_params), 2)
    shown = run_json("--home", str(home), "show", "study-dpo-s0", "--control",
                     "study-dpo-s0-fp32")
    assert shown["control"]["control"] == "study-dpo-s0-fp32"
    report = json.loads((out / "report.json").read_text())
    assert report["verdicts"][0]["control"].endswith(
        f"; fp32 masters {rows['study-dpo-s0']['fp32_sparsity_pct']:.1f}%")


def test_curves_end_at_the_saved_checkpoints(quick_study: tuple) -> None:
    home, out, _ = quick_study
    curve = _sql(home, json.loads((out / "report.json").read_text())["tables"]["curve"]["sql"])
    runs = _sql(home, json.loads((out / "report.json").read_text())["tables"]["runs"]["sql"])
    runs_by_name = {r["name"]: r for r in runs}
    tokenizer = make_tokenizer()
    heldout = split_problems(QUICK.max_operand, QUICK.n_heldout, 0).heldout
    for run in TRAJECTORY_RUNS:
        points = [r for r in curve if r["name"] == f"study-{run}"]
        assert [p["step"] for p in points] == [0, 5, 10, 15, 20]
        # the first point is the start's grade, the last the saved checkpoint's
        row = runs_by_name[f"study-{run}"]
        assert points[0]["heldout_acc_pct"] == row["heldout_acc_before"]
        assert points[-1]["heldout_acc_pct"] == row["heldout_acc_after"]
    final = load_bf16(QUICK, out / "checkpoints" / "dpo-s0" / "step-0020")
    last = [r for r in curve if r["name"] == "study-dpo-s0"][-1]
    with torch_threads(STUDY_THREADS):
        assert last["heldout_loss"] == round(answer_loss(final, tokenizer, heldout), 4)


def test_unwritable_out_and_missing_library_are_one_line_errors(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    (tmp_path / "file").write_text("x")
    line = fail_line("study", "--quick", "--out", str(tmp_path / "file" / "sub"))
    assert line.startswith("Error: cannot create ") and "Not a directory" in line
    import maskhub.study.requirements as requirements

    monkeypatch.setattr(requirements, "REQUIRED", ("trl", "no_such_library_xyz"))
    line = fail_line("study", "--quick", "--out", str(tmp_path / "z"))
    assert line == ("Error: maskhub study needs no_such_library_xyz: "
                    "pip install 'maskhub[study]'")
    assert Registry().ls() == [] and not (tmp_path / "z").exists()


def test_ctrl_c_names_the_masks_already_registered(tmp_path: Path, maskhub_home: Path) -> None:
    # SIGINT's default handler, even when this test runs under a shell that ignores it
    entry = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from maskhub.entry import run; sys.argv[0] = 'maskhub'; run()")
    proc = subprocess.Popen([sys.executable, "-c", entry, "study", "--quick",
                             "--out", str(tmp_path / "s")], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MASKHUB_HOME": str(maskhub_home)})
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # interrupt the first masked run, once dpo-s0 is registered
        lines.append(line)
        if line.startswith("DPO dpo-sub-s0"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130
    # dpo-s0's mask, and the four trajectories recorded live before the masked runs
    done = ["study-dpo-s0", *(f"study-traj-{r}-ever" for r in TRAJECTORY_RUNS),
            *(f"study-traj-{r}-step-{s}" for r in sorted(TRAJECTORY_RUNS) for s in (5, 10, 15, 20))]
    assert rest.strip().splitlines() == [
        f"Error: interrupted: the study registered {len(done)} complete mask(s) before it "
        f"stopped ({', '.join(done)}); checkpoints so far are in {tmp_path / 's'}. Rerun "
        "with another --out and --name, or 'maskhub rm' them"]
    assert sorted(m["name"] for m in Registry(maskhub_home).ls()) == sorted(done)
