"""`maskhub verify MASK BASE TRAINED` and `Registry.verify`: updates outside a mask, counted
exactly per tensor, on checkpoints built with planted updates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from clitools import fail_line
from factory import llama_shapes, plant_updates, random_state, save

from maskhub import Registry
from maskhub.cli import main
from maskhub.errors import MaskMismatchError

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.1.input_layernorm.weight"


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def run(tmp_path: Path):
    """A base, the target of a planted 10% update registered as mask ``rl``, and the masks."""
    base = random_state(llama_shapes(), torch.bfloat16, seed=0)
    target, masks = plant_updates(base, 0.1, seed=1)
    base_dir = save(base, tmp_path / "base")
    target_dir = save(target, tmp_path / "target", shards=2)
    mask = Registry().diff(base_dir, target_dir, name="rl")
    return {"tmp": tmp_path, "base": base, "target": target, "masks": masks, "mask": mask,
            "base_dir": str(base_dir), "target_dir": str(target_dir)}


def _outside_entries(masks, name: str, k: int) -> list[int]:
    """The first ``k`` flat indices of tensor ``name`` outside the mask."""
    flat = masks[name].reshape(-1)
    return [i for i in range(flat.size) if not flat[i]][:k]


def _with_strays(run, strays: dict[str, int], delta: float = 0.25) -> str:
    """The target plus ``strays[name]`` changes outside the mask; returns its directory."""
    state = {k: v.clone() for k, v in run["target"].items()}
    for name, k in strays.items():
        flat = state[name].view(-1)
        for i in _outside_entries(run["masks"], name, k):
            flat[i] = (flat[i].double() + delta).to(flat.dtype)
    return str(save(state, run["tmp"] / ("trained-" + "-".join(map(str, strays.values())))))


def test_clean_run_passes_with_exit_0(run):
    res = cli("verify", "rl", run["base_dir"], run["target_dir"])
    assert res.exit_code == 0, res.output
    n = run["mask"].n_updated
    assert (f"{n:,} of {run['mask'].n_params:,} parameters changed (tol 0: any change at all, "
            "the exact-mode guarantee), 0 outside") in res.stdout
    assert "OK: nothing changed outside the mask" in res.stdout
    res = cli("verify", "rl", run["base_dir"], run["target_dir"], "--json")
    report = json.loads(res.stdout)
    assert res.exit_code == 0 and report["ok"] is True
    assert (report["n_changed"], report["n_outside"]) == (n, 0)
    assert report["n_params"] == run["mask"].n_params
    assert len(report["tensors"]) == len(llama_shapes())


def test_part_of_the_mask_changed_is_fine(run):
    """A masked run need not move every trainable entry: the base itself passes."""
    res = cli("verify", "rl", run["base_dir"], run["base_dir"], "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout)["n_changed"] == 0


def test_planted_strays_are_counted_exactly_per_tensor(run):
    trained = _with_strays(run, {Q: 3, "lm_head.weight": 2, NORM: 1})
    res = cli("verify", "rl", run["base_dir"], trained)
    assert res.exit_code == 1, res.output
    assert "FAIL: 6 parameter(s) changed outside the mask, in 3 tensor(s)" in res.stdout
    for name in (Q, "lm_head.weight", NORM):
        assert name in res.stdout
    res = cli("verify", "rl", run["base_dir"], trained, "--json")
    assert res.exit_code == 1
    report = json.loads(res.stdout)
    assert report["ok"] is False and report["n_outside"] == 6
    per_tensor = {t["tensor"]: t["n_outside"] for t in report["tensors"] if t["n_outside"]}
    assert per_tensor == {Q: 3, "lm_head.weight": 2, NORM: 1}
    changed = {t["tensor"]: t["n_changed"] for t in report["tensors"]}
    assert changed[Q] == int(run["masks"][Q].sum()) + 3
    assert changed[NORM] == 1


def test_python_api_report(run):
    trained = _with_strays(run, {Q: 4, NORM: 2})
    report = Registry().verify("rl", run["base_dir"], trained)
    assert not report.ok and report.n_outside == 6
    assert [(t.tensor, t.n_outside) for t in report.outside()] == [(Q, 4), (NORM, 2)]
    assert report.mask == "rl" and report.mask_id == run["mask"].id
    q = next(t for t in report.tensors if t.tensor == Q)
    assert (q.numel, q.n_mask) == (16 * 16, int(run["masks"][Q].sum()))
    # the same from a Mask object
    assert Registry().verify(run["mask"], run["base_dir"], run["target_dir"]).ok


def test_tolerance(run):
    """A norm entry moved by one bf16 step at 1.0 (2^-7): counted at tol 0, not at 0.01."""
    trained = _with_strays(run, {NORM: 1}, delta=2 ** -7)
    assert cli("verify", "rl", run["base_dir"], trained).exit_code == 1
    res = cli("verify", "rl", run["base_dir"], trained, "--tol", "0.01", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["tol"] == 0.01
    res = cli("verify", "rl", run["base_dir"], trained, "--tol", "-1")
    assert res.exit_code == 1 and "tolerance must be a finite number >= 0" in res.output


def test_a_full_run_against_its_own_mask_needs_the_masks_tolerance(run, tmp_path: Path):
    """The mask says updated iff |Δ| > 1e-5: a target that also moves some entries by less
    (here two norm entries of 1.0 by 2^-20 in fp32) fails at the default tol 0, with a note
    saying why, and passes with --tol mask."""
    state = {k: v.float() for k, v in run["base"].items()}
    target = {k: v.float() for k, v in run["target"].items()}
    target[NORM].view(-1)[:2] += 2.0 ** -20
    base_dir, full = save(state, tmp_path / "b32"), save(target, tmp_path / "t32")
    Registry().diff(base_dir, full, name="own")  # default tol 1e-5
    res = cli("verify", "own", str(base_dir), str(full))
    assert res.exit_code == 1
    assert "FAIL: 2 parameter(s) changed outside the mask, in 1 tensor(s)" in res.stdout
    assert ("note: the mask was made at tol 1e-05, so changes of at most 1e-05 are outside it "
            "by definition; to check a run against its own mask use --tol mask") in res.stdout
    res = cli("verify", "own", str(base_dir), str(full), "--tol", "mask")
    assert res.exit_code == 0, res.output
    assert "(tol 1e-05, the mask's own tolerance), 0 outside the mask" in res.stdout
    assert json.loads(cli("verify", "own", str(base_dir), str(full), "--tol", "MASK",
                          "--json").stdout)["tol"] == 1e-5
    res = cli("verify", "own", str(base_dir), str(full), "--tol", "loose")
    assert res.exit_code == 1
    assert res.stderr.strip() == "Error: --tol takes a number >= 0 or 'mask', not 'loose'"


def test_missing_tensor_one_line_error_or_skip(run):
    state = {k: v for k, v in run["target"].items() if k != "lm_head.weight"}
    trained = str(save(state, run["tmp"] / "no-head"))
    res = cli("verify", "rl", run["base_dir"], trained)
    assert res.exit_code == 1
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.output
    assert "'lm_head.weight' exists only in the base checkpoint" in res.stderr
    res = cli("verify", "rl", run["base_dir"], trained, "--allow-missing", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["skipped"] == ["lm_head.weight"]
    assert report["n_params"] == run["mask"].n_params - 32 * 16


def test_mask_of_another_model(run):
    """Checkpoints whose tensors the mask does not have (or with other shapes)."""
    tmp = run["tmp"]
    other = random_state(llama_shapes(layers=3), torch.bfloat16, seed=5)
    other_t, _ = plant_updates(other, 0.1, seed=6)
    Registry().diff(save(other, tmp / "o-base"), save(other_t, tmp / "o-target"), name="big")
    res = cli("verify", "big", run["base_dir"], run["target_dir"])
    assert res.exit_code == 1
    assert ("mask 'big' and the checkpoints do not hold the same tensors; 9 mask tensor(s) "
            "not in the checkpoints: model.layers.2.") in res.stderr
    with pytest.raises(MaskMismatchError) as info:
        Registry().verify("big", run["base_dir"], run["target_dir"])
    assert len(info.value.missing_in_target) == 9
    wide = random_state(llama_shapes(hidden=8), torch.bfloat16, seed=5)
    Registry().diff(save(wide, tmp / "w-base"), save(wide, tmp / "w-target"), name="wide")
    # A different architecture is a mask of another model, said in one line, and
    # --allow-missing does not turn it into a comparison of the tensors that happen to match.
    for extra in ((), ("--allow-missing",)):
        res = cli("verify", "wide", run["base_dir"], run["target_dir"], *extra)
        assert res.exit_code == 1
        assert res.stderr == (
            "Error: mask 'wide' is a mask of another model: only 0 of the 21 tensors of the "
            "mask are in the checkpoints with the same name and shape (e.g. 'lm_head.weight' "
            "is [32, 8] in the mask and [32, 16] in the checkpoints)\n")
    # diff of two checkpoints of different models: one line, no --allow-missing hint
    for extra in ((), ("--allow-missing",)):
        assert fail_line("diff", str(tmp / "w-base"), str(run["target_dir"]), *extra) == (
            "Error: the base and target checkpoints are of different models: only 0 of the 21 "
            "tensors of the base are in the target with the same name and shape (e.g. "
            "'lm_head.weight' is [32, 8] in the base and [32, 16] in the target)")


def test_unknown_mask_and_help(run):
    res = cli("verify", "nope", run["base_dir"], run["target_dir"])
    assert res.exit_code == 1 and "no mask named 'nope'" in res.stderr
    res = cli("verify", "--help")
    assert res.exit_code == 0 and "Example:" in res.output and "--json" in res.output


def test_odd_sized_tensors(tmp_path):
    """Tensors whose size is not a multiple of 8: the padding bits of the packed masks
    count for nothing."""
    base = {"a": torch.ones(13), "b": torch.ones(3, 5)}
    target = {k: v.clone() for k, v in base.items()}
    target["a"][0] = 2.0
    target["b"][0, 0] = 2.0
    trained = {k: v.clone() for k, v in target.items()}
    trained["a"][12] = 3.0
    dirs = [str(save(s, tmp_path / n)) for s, n in ((base, "b0"), (target, "t"), (trained, "x"))]
    Registry().diff(dirs[0], dirs[1], name="odd")
    assert Registry().verify("odd", dirs[0], dirs[1]).n_outside == 0
    report = Registry().verify("odd", dirs[0], dirs[2])
    assert [(t.tensor, t.n_changed, t.n_outside) for t in report.tensors] == [("a", 2, 1),
                                                                              ("b", 1, 0)]
