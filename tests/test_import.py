"""Masks made elsewhere: ``maskhub import`` (``Registry.add``) of a Zarr store written by hand
in the documented layout, a safetensors file of bool/uint8 masks, and arrays or tensors from
Python; checked like a pull, registered through the commit protocol, provenance recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from factory import make_pair
from safetensors.numpy import save_file
from test_overlap import fail, run

from maskhub import Registry
from maskhub.cli import main

W = "model.layers.0.self_attn.q_proj.weight"
N = "model.norm.weight"
W_BITS = np.array([[1, 1, 0, 0, 1], [0, 0, 0, 1, 0], [1, 1, 1, 1, 1]], bool)  # 9 of 15
N_BITS = np.array([0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1], bool)  # 3 of 11 (padding in byte 2)


def hand_written_store(path: Path, *, attrs: dict | None = None, bitorder: str = "little",
                       claim: int | None = None) -> Path:
    """The README's layout written with stock zarr, metadata left out but what is given:
    ``W`` as a bool array, ``N`` as packed uint8 with ``shape`` and ``bitorder``."""
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.attrs.update(attrs if attrs is not None else {"base_model": "org/base-7b"})
    w = g.create_array(W, shape=W_BITS.shape, dtype=bool)
    w[:] = W_BITS
    packed = np.packbits(N_BITS, bitorder=bitorder)
    n = g.create_array(N, shape=packed.shape, dtype="uint8")
    n[:] = packed
    n.attrs.update({"shape": [11], "bitorder": bitorder,
                    **({"n_updated": claim} if claim is not None else {})})
    return path


def staging_left(reg: Registry) -> list[str]:
    return sorted(p.name for p in (reg.home / "tmp").glob("*")) if (reg.home / "tmp").exists() \
        else []


@pytest.mark.parametrize("bitorder", ["little", "big"])
def test_import_a_hand_written_store_with_minimal_metadata(tmp_path: Path, bitorder: str
                                                           ) -> None:
    store = hand_written_store(tmp_path / "my-rl-run.zarr", bitorder=bitorder)
    got = run("import", str(store), "--algorithm", "grpo", "--seed", "3", "--json")
    assert {k: got[k] for k in ("name", "base_model", "target_model", "n_params",
                                "n_updated", "tol")} == {
        "name": "my-rl-run", "base_model": "org/base-7b", "target_model": "my-rl-run",
        "n_params": 26, "n_updated": 12, "tol": 1e-5}
    reg = Registry()
    mask = reg.get("my-rl-run")
    assert mask.tensor_names() == [W, N]  # no tensors attribute: by name
    assert mask[W].tolist() == W_BITS.tolist() and mask[N].tolist() == N_BITS.tolist()
    assert len(mask.id) == 32 and mask.row["created_at"] is not None
    assert (mask.row["operation"], mask.row["algorithm"], mask.row["seed"]) == (
        "import", "grpo", 3)
    assert mask.metadata.extra == {"import": {"format": "zarr", "source": "my-rl-run.zarr"}}
    assert reg.sql("select tensor, layer, module, shape, numel, n_updated from tensors "
                   "order by tensor")[1] == [
        (W, 0, "self_attn.q_proj", [3, 5], 15, 9), (N, None, "norm", [11], 11, 3)]
    assert reg.sql("select count(*) from tensor_strata")[1] == [(0,)]  # no θ0, no strata
    # The registered store is maskhub's own layout, readable with zarr and numpy alone.
    a = zarr.open_group(str(mask.path), mode="r")[N]
    assert a.attrs["bitorder"] == "little" and a.attrs["n_updated"] == 3
    assert np.unpackbits(a[:], count=11, bitorder="little").tolist() == N_BITS.tolist()
    assert reg.fsck().findings == [] and staging_left(reg) == []


def test_a_store_in_the_full_layout_keeps_its_metadata(tmp_path: Path) -> None:
    attrs = {"kind": "maskhub.mask", "format_version": 1, "tensors": [N, W],
             "id": "0123456789abcdef0123456789abcdef", "name": "kept", "base_model": "org/b",
             "target_model": "org/t", "tol": 0.001, "created_at": "2025-06-01T12:00:00",
             "n_params": 26, "n_updated": 12, "tags": ["rl"]}
    store = hand_written_store(tmp_path / "s.zarr", attrs=attrs)
    mask = Registry().add(store, tags=["imported"], dataset="org/prefs")
    assert (mask.id, mask.name, mask.tensor_names()) == (attrs["id"], "kept", [N, W])
    row = mask.row
    assert (row["base_model"], row["target_model"], row["tol"], row["dataset"]) == (
        "org/b", "org/t", 0.001, "org/prefs")
    assert (row["tags"], str(row["created_at"])) == (["rl", "imported"], "2025-06-01 12:00:00")


def test_import_a_safetensors_file_gives_the_diff_s_bits_and_overlaps(tmp_path: Path) -> None:
    base, target, planted = make_pair(tmp_path, density=0.3)
    reg = Registry()
    diffed = reg.diff(base, target, name="diffed", base_model="org/sft", device="cpu")
    # The user's own RL code saved its masks: bool for some tensors, uint8 0/1 for others.
    save_file({k: (v.astype(np.uint8) if i % 2 else v) for i, (k, v) in
               enumerate(planted.items())}, str(tmp_path / "masks.safetensors"))
    got = run("import", str(tmp_path / "masks.safetensors"), "--name", "theirs",
              "--base-model", "org/sft", "--json")
    assert (got["n_params"], got["n_updated"]) == (
        diffed.n_params, sum(int(v.sum()) for v in planted.values()))
    theirs = reg.get("theirs")
    for t in diffed.tensor_names():
        assert theirs.packed(t).tobytes() == diffed.packed(t).tobytes(), t
    o = run("overlap", "diffed", "theirs", "--json")
    assert (o["n_both"], o["o1"], o["o2"]) == (diffed.n_updated, 1.0, 1.0)
    assert o["expected_magnitude"] is None  # falls back to the stratified baseline
    assert o["expected_stratified"] == pytest.approx(sum(
        int(v.sum()) ** 2 / v.size for v in planted.values()))


def test_add_arrays_and_tensors_from_python() -> None:
    mask = Registry().add({W: torch.from_numpy(W_BITS), N: N_BITS.astype(np.uint8)},
                          name="from-python", base_model="org/base-7b", tol=0.0)
    assert (mask.n_params, mask.n_updated, mask.row["tol"]) == (26, 12, 0.0)
    assert mask.tensor_names() == [W, N]  # the mapping's order
    assert mask[W].tolist() == W_BITS.tolist() and mask[N].tolist() == N_BITS.tolist()
    assert mask.metadata.extra["import"] == {"format": "arrays", "source": "arrays"}


def test_bad_sources_fail_in_one_line_and_register_nothing(tmp_path: Path) -> None:
    store = hand_written_store(tmp_path / "s.zarr")
    assert fail("import", str(hand_written_store(tmp_path / "n.zarr", attrs={}))) == (
        "Error: importing n.zarr needs --base-model (the Hub id or name of the checkpoint "
        "the mask was taken against)")
    assert fail("import", str(hand_written_store(tmp_path / "c.zarr", claim=4))) == (
        f"Error: c.zarr: array {N!r} has n_updated 3, its attributes say 4")
    save_file({W: np.full((2, 2), 2, np.uint8)}, str(tmp_path / "two.safetensors"))
    assert fail("import", str(tmp_path / "two.safetensors"), "--base-model", "b") == (
        f"Error: two.safetensors: tensor {W!r} holds values other than 0 and 1 (up to 2); a "
        "mask is bool, or uint8 0/1")
    save_file({W: np.zeros((2, 2), np.float32)}, str(tmp_path / "f.safetensors"))
    assert fail("import", str(tmp_path / "f.safetensors"), "--base-model", "b") == (
        f"Error: f.safetensors: tensor {W!r} is float32; a mask is bool, or uint8 0/1")
    (tmp_path / "masks.pt").write_bytes(b"\x80\x04not opened")
    assert fail("import", str(tmp_path / "masks.pt")).startswith(
        f"Error: {tmp_path / 'masks.pt'} is a pickle checkpoint, which maskhub never loads")
    g = zarr.open_group(str(tmp_path / "odd.zarr"), mode="w", zarr_format=3)
    g.create_array("x", shape=(2,), dtype="uint8").attrs.update({"shape": [9]})
    assert fail("import", str(tmp_path / "odd.zarr"), "--base-model", "b") == (
        "Error: odd.zarr: packed array 'x' needs a bitorder attribute, 'little' or 'big' "
        "(not None)")
    run("import", str(store), "--name", "taken")
    assert fail("import", str(store), "--name", "taken") == (
        "Error: a mask named 'taken' already exists; choose another --name or "
        "`maskhub rm taken`")
    reg = Registry()
    assert [r["name"] for r in reg.ls()] == ["taken"] and staging_left(reg) == []


def test_import_help_names_the_library_call() -> None:
    out = CliRunner().invoke(main, ["import", "--help"]).output
    assert "Registry().add(...)" in out and "maskhub import ./my-rl-mask.zarr" in out
