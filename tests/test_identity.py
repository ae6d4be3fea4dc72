"""Issue 26: a model is its bytes, not its path. Fingerprints recorded by the diff, masks of
the same base comparable wherever it lies, a rerun of the same diff not registered twice,
metadata corrected with ``maskhub edit``, a mask of another model refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from clitools import fail_line
from clitools import run_json as _run_json
from factory import llama_shapes, plant_updates, random_state, save

from maskhub import Registry
from maskhub.checkpoints.fingerprint import CHUNK, checkpoint_fingerprint
from maskhub.cli import main
from maskhub.kernels.kernel import CHUNK as KERNEL_CHUNK


def run_json(*args: object) -> dict | list:
    return _run_json(*(str(a) for a in args))


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def pair(tmp_path: Path) -> dict:
    """One base saved twice (one file; three shards, elsewhere) and two targets. One tensor
    spans two fingerprint chunks (CHUNK + 1000 elements)."""
    shapes = llama_shapes()
    shapes["model.big.weight"] = (CHUNK + 1000,)
    base = random_state(shapes, torch.bfloat16, seed=0)
    t1, _ = plant_updates(base, 0.1, seed=1)
    t2, _ = plant_updates(base, 0.2, seed=2)
    return {"tmp": tmp_path, "base": save(base, tmp_path / "sft"),
            "sharded": save(base, tmp_path / "copies" / "sft-sharded", shards=3),
            "t1": save(t1, tmp_path / "dpo"), "t2": save(t2, tmp_path / "ppo")}


def test_fingerprint_is_content(pair):
    assert CHUNK == KERNEL_CHUNK
    reg = Registry()
    a = reg.diff(pair["base"], pair["t1"], name="a")
    b = reg.diff(pair["sharded"], pair["t2"], name="b")
    fp = checkpoint_fingerprint(pair["base"])
    assert fp.startswith("xxh3-128:") and len(fp) == len("xxh3-128:") + 32
    # the same bytes, one file or three shards: one fingerprint, the diff's and a plain read's
    assert a.row["base_fingerprint"] == b.row["base_fingerprint"] == fp
    assert checkpoint_fingerprint(pair["sharded"]) == fp
    assert a.row["target_fingerprint"] == checkpoint_fingerprint(pair["t1"]) != fp
    assert a.metadata.base_fingerprint == fp  # in the store's attributes too
    # comparable although recorded under two paths (was: "different base models")
    assert a.row["base_model"] != b.row["base_model"]
    res = run_json("overlap", "a", "b")
    assert res["n_both"] > 0
    # one byte changed is another base
    other = {k: v.clone() for k, v in random_state(llama_shapes(), torch.bfloat16, 0).items()}
    other["model.big.weight"] = torch.zeros(CHUNK + 1000, dtype=torch.bfloat16)
    other["model.big.weight"][CHUNK + 5] = 1.0  # in the second chunk
    o = save(other, pair["tmp"] / "sft-edited")
    oth = reg.diff(o, o, name="c")
    assert oth.row["base_fingerprint"] != fp
    line = fail_line("overlap", "a", "c")
    assert line.startswith("Error: a and c have different base models: the bytes of ")


def test_rerun_of_same_diff_is_not_registered_twice(pair):
    first = cli("diff", pair["base"], pair["t1"])
    assert first.exit_code == 0 and first.stdout.startswith("registered dpo (id ")
    again = cli("diff", pair["sharded"], pair["t1"])  # the same bytes from another copy
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith("already registered as dpo (id ")
    assert ("nothing registered; --force registers a copy" in again.stderr)
    assert [m["name"] for m in run_json("ls")] == ["dpo"]
    as_json = run_json("diff", pair["base"], pair["t1"])
    assert as_json["name"] == "dpo" and as_json["already_registered"] is True
    # another tolerance is another mask; --force and --name register copies
    assert run_json("diff", pair["base"], pair["t1"], "--tol", "0")["name"] == "dpo-2"
    forced = run_json("diff", pair["base"], pair["t1"], "--force")
    assert forced["name"] == "dpo-3" and forced["already_registered"] is False
    assert run_json("diff", pair["base"], pair["t1"], "--name", "mine")["name"] == "mine"
    reg = Registry()
    assert reg.diff(pair["base"], pair["t1"]).reused is True


def test_overlap_all_resolves_a_relative_base(pair, monkeypatch):
    reg = Registry()
    reg.diff(pair["base"], pair["t1"], name="a")
    reg.diff(pair["sharded"], pair["t2"], name="b")
    monkeypatch.chdir(pair["tmp"])
    res = run_json("overlap", "--all", "--base-model", "./sft")
    assert sorted(m["name"] for m in res["masks"]) == ["a", "b"]
    res = run_json("overlap", "--all", "--base-model", "copies/sft-sharded")
    assert sorted(m["name"] for m in res["masks"]) == ["a", "b"]
    res = run_json("overlap", "--all")  # two paths, one base: no --base-model needed
    assert sorted(m["name"] for m in res["masks"]) == ["a", "b"]


def test_edit_metadata_recorded(pair):
    reg = Registry()
    mask = reg.diff(pair["base"], pair["t1"], name="a", algorithm="dpo", tags=["x"])
    res = cli("edit", "a", "--base-model", "org/llama-sft", "--seed", "3", "--add-tag", "y")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        f"a: base_model: {str(pair['base'].resolve())!r} -> 'org/llama-sft'",
        "a: seed: None -> 3",
        "a: tags: ['x'] -> ['x', 'y']"]
    row = reg.get("a").row
    assert (row["base_model"], row["seed"], row["tags"]) == ("org/llama-sft", 3, ["x", "y"])
    assert row["edited_at"] is not None and len(row["edits"]) == 3
    # the store says the same (index and store consistent), fingerprints untouched
    attrs = json.loads((reg.store_path(mask.id) / "zarr.json").read_text())["attributes"]
    assert attrs["base_model"] == "org/llama-sft" and attrs["seed"] == 3
    assert attrs["tags"] == ["x", "y"] and len(attrs["extra"]["edits"]) == 3
    assert attrs["base_fingerprint"] == mask.row["base_fingerprint"]
    # Mask.update, renaming
    renamed = reg.get("a").update(name="llama-dpo", algorithm="grpo")
    assert (renamed.name, renamed.row["algorithm"]) == ("llama-dpo", "grpo")
    assert reg.get("llama-dpo").metadata.name == "llama-dpo"
    assert fail_line("edit", "llama-dpo", "--algorithm", "grpo") == (
        "Error: nothing to edit: mask 'llama-dpo' already has these values")
    assert fail_line("edit", "llama-dpo").startswith("Error: nothing to edit: give at least")
    reg.diff(pair["base"], pair["t2"], name="b")
    assert fail_line("edit", "b", "--name", "llama-dpo") == (
        "Error: a mask named 'llama-dpo' already exists; choose another --name or "
        "`maskhub rm llama-dpo`")


def test_apply_mask_refuses_a_mask_of_another_model(pair):
    from maskhub.errors import MaskMismatchError
    from maskhub.torch import MaskedAdamW, apply_mask

    wide = {k: (np.ones(s, dtype=bool)) for k, s in llama_shapes(hidden=8).items()}
    model = torch.nn.Module()
    for name, shape in llama_shapes().items():
        *path, leaf = name.split(".")
        mod = model
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        mod.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
    expected = ("mask 'in-memory' is a mask of another model: only 0 of the 21 tensors of the mask "
                "are in the model with the same name and shape (e.g. 'model.embed_tokens."
                "weight' is [32, 8] in the mask and [32, 16] in the model)")
    for kw in ({}, {"extra": "ignore", "missing": "train"}):
        with pytest.raises(MaskMismatchError) as info:
            apply_mask(model, wide, **kw)
        assert str(info.value) == expected
    with pytest.raises(MaskMismatchError) as info:
        MaskedAdamW(model, wide)
    assert str(info.value) == expected


def test_verify_and_check_base_know_the_base_by_its_bytes(pair):
    from maskhub.core.identity import check_base
    from maskhub.errors import MaskMismatchError

    reg = Registry()
    mask = reg.diff(pair["base"], pair["t1"], name="a")
    # the same base from a sharded copy elsewhere: verified (the diff's own target: ok)
    res = run_json("verify", "a", pair["sharded"], pair["t1"], "--tol", "mask")
    assert res["ok"] is True
    assert check_base(mask, pair["sharded"]) == mask.row["base_fingerprint"]
    # same architecture, other bytes: one line, not a count of "changes outside the mask"
    other = save(random_state(llama_shapes() | {"model.big.weight": (CHUNK + 1000,)},
                              torch.bfloat16, seed=9), pair["tmp"] / "other-sft")
    line = fail_line("verify", "a", str(other), str(pair["t1"]))
    assert line.startswith(f"Error: mask 'a' is a mask of another model: the base {other} is "
                           "not the base it was made from (its tensors hash to xxh3-128:")
    with pytest.raises(MaskMismatchError, match="is not the base it was made from"):
        check_base(mask, other)


def test_export_bool_and_packed(pair):
    """`maskhub export`: a bool file that safetensors loads and `maskhub import` reads back
    bit for bit, and a packed one that numpy unpacks with the file's own metadata."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    reg = Registry()
    mask = reg.diff(pair["base"], pair["t1"], name="a")
    out = pair["tmp"] / "a.safetensors"
    res = cli("export", "a", out)
    assert res.exit_code == 0 and res.stdout.startswith(f"wrote {out} (")
    arrays = load_file(str(out))
    assert sorted(arrays) == sorted(mask.tensor_names())
    for name, arr in arrays.items():
        assert arr.dtype == np.bool_ and (arr == mask[name]).all(), name
    with safe_open(str(out), framework="numpy") as f:
        meta = f.metadata()
    assert (meta["format"], meta["layout"], meta["name"]) == ("maskhub.mask", "bool", "a")
    assert meta["base_fingerprint"] == mask.row["base_fingerprint"]
    back = run_json("import", out, "--name", "back", "--base-model", "org/sft")
    assert back["n_updated"] == mask.n_updated
    packed = pair["tmp"] / "p.safetensors"
    assert cli("export", "a", packed, "--packed").exit_code == 0
    with safe_open(str(packed), framework="numpy") as f:
        shapes = json.loads(f.metadata()["shapes"])
        for name in f.keys():
            bits = np.unpackbits(f.get_tensor(name), count=int(np.prod(shapes[name])),
                                 bitorder=f.metadata()["bitorder"]).reshape(shapes[name])
            assert (bits.astype(bool) == mask[name]).all(), name
    assert fail_line("export", "a", str(pair["tmp"] / "x.bin")) == (
        f"Error: {pair['tmp'] / 'x.bin'} must end in .safetensors")


def test_show_tensor_density_map(pair):
    reg = Registry()
    mask = reg.diff(pair["base"], pair["t1"], name="a")
    name = "model.norm.weight"  # 16 entries, never updated: one row of blanks
    res = cli("show", "a", "--tensor", name)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        f"{name} [16]: 0 of 16 entries updated; each character 1 x 1 entries, "
        "' .:-=+*#%@' = 0% .. 100%", "|" + " " * 16 + "|"]
    q = "model.layers.0.self_attn.q_proj.weight"
    d = run_json("show", "a", "--tensor", q)
    bits = mask[q]
    assert d["shape"] == list(bits.shape) and d["n_updated"] == int(bits.sum())
    assert len(d["grid"]) == min(16, bits.shape[0])
    assert abs(np.mean(d["grid"]) - bits.mean()) < 1e-9  # equal cells: the mean is exact
    assert fail_line("show", "a", "--tensor", "nope") == "Error: mask 'a' has no tensor 'nope'"
