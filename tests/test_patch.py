"""Patches (a mask plus the target's values): ``diff --patch`` and ``apply`` rebuild the target
bit for bit, across dtypes and special values; a wrong base and a mask without values are
refused in one line; the values are readable with zarr and numpy alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from clitools import fail_line, run_json

from maskhub.checkpoints.header import read_header
from maskhub.errors import PatchError

CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64",
         "int8": "I8"}
WIDTH = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int8": 1}


def save(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]],
         metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file from raw bit patterns: ``{name: (dtype, shape, bits)}``."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, blobs = 0, []
    for name, (dtype, shape, bits) in tensors.items():
        data = np.ascontiguousarray(bits).tobytes()
        assert len(data) == int(np.prod(shape)) * WIDTH[dtype]
        header[name] = {"dtype": CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def tensor_bits(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a safetensors file or directory: ``{name: (dtype, shape, bytes)}``."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for f in files:
        raw = f.read_bytes()
        for info in read_header(f):
            out[info.name] = (info.dtype, info.shape, raw[info.offset:info.end])
    return out


def f32_bits(values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32).view(np.uint32)


def bf16(values: list[float]) -> np.ndarray:
    return (f32_bits(values) >> 16).astype(np.uint16)


# Special bit patterns, one per case, base -> target.
BF16_BASE = np.array([0x3F80, 0x0000, 0x8000, 0x7FC0, 0x7FC0, 0x7F80, 0x0001, 0x3F80,
                      0xBF80, 0x4000, 0x7FC0, 0x0001], dtype=np.uint16)
BF16_TARGET = np.array([0x3F80, 0x8000, 0x0000, 0x7FC1, 0x7FC0, 0xFF80, 0x0002, 0x7FC0,
                        0xBF80, 0x4001, 0x3F80, 0x8001], dtype=np.uint16)
# kept, +0->-0, -0->+0, NaN payload, NaN same, +inf->-inf, subnormal step, num->NaN,
# kept, one ulp, NaN->num, subnormal sign


def make_pair(tmp: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    base, target = tmp / "base", tmp / "target"
    base.mkdir()
    target.mkdir()
    w = bf16(list(rng.standard_normal(4096) * 0.02))
    w2 = w.copy()
    w2[rng.random(4096) < 0.1] ^= 0x0001  # 10% one-ulp updates
    f16 = (rng.standard_normal(300) * 3).astype(np.float16).view(np.uint16)
    f16t = f16.copy()
    f16t[::7] = np.array([0x8000, 0x7E01, 0x0001, 0xFC00], dtype=np.uint16)[
        np.arange(len(f16t[::7])) % 4]
    f32 = f32_bits(list(rng.standard_normal(100)))
    f32t = f32.copy()
    f32t[3], f32t[4], f32t[5] = 0x7FC00001, 0x80000000, 0x00000001
    mixed_t = (w[:64].astype(np.uint32) << 16)  # bf16 base widened exactly: unchanged
    mixed_t[1] += 1  # below one bf16 step
    mixed_t[2] = 0x7FC00000  # NaN
    mixed_t[3] = 0x80000000  # -0 against a base value
    mixed_b = w[:64].copy()
    mixed_b[3] = 0x0000  # +0 in the base, -0 in the target: equal values, different bits
    # a tensor large enough for the compiled gather/scatter (chunks of >= 64 Ki entries)
    big = (rng.standard_normal(1 << 19) * 0.02).astype(np.float32).view(np.uint32)
    big_t = big.copy()
    moved = rng.random(big.shape[0]) < 0.05
    big_t[moved] += 1
    big_t[-1] = 0x7F800001  # a signalling NaN at the very end
    save(base / "model-00001-of-00002.safetensors",
         {"emb.weight": ("bfloat16", (64, 64), w),
          "big.weight": ("float32", (512, 1024), big),
          "special": ("bfloat16", (3, 4), BF16_BASE)}, {"format": "pt"})
    save(base / "model-00002-of-00002.safetensors",
         {"h.0.f16": ("float16", (300,), f16), "h.0.f32": ("float32", (10, 10), f32),
          "h.0.mixed": ("bfloat16", (8, 8), mixed_b)}, {"format": "pt"})
    save(target / "model.safetensors",
         {"emb.weight": ("bfloat16", (64, 64), w2),
          "big.weight": ("float32", (512, 1024), big_t),
          "special": ("bfloat16", (3, 4), BF16_TARGET),
          "h.0.f16": ("float16", (300,), f16t), "h.0.f32": ("float32", (10, 10), f32t),
          "h.0.mixed": ("float32", (8, 8), mixed_t)})
    index = {"metadata": {"total_size": 0},
             "weight_map": {"emb.weight": "model-00001-of-00002.safetensors",
                            "big.weight": "model-00001-of-00002.safetensors",
                            "special": "model-00001-of-00002.safetensors",
                            "h.0.f16": "model-00002-of-00002.safetensors",
                            "h.0.f32": "model-00002-of-00002.safetensors",
                            "h.0.mixed": "model-00002-of-00002.safetensors"}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    (base / "config.json").write_text('{"model_type": "toy"}')
    return base, target


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return make_pair(tmp_path)


def test_patch_rebuilds_target_bit_for_bit(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, target = pair
    res = run_json("diff", str(base), str(target), "--patch", "--name", "p")
    assert res["tol"] == 0.0
    out = tmp_path / "out"
    applied = run_json("apply", "p", str(base), str(out))
    want = tensor_bits(target / "model.safetensors")
    got = tensor_bits(out)
    assert got == want
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(len(v[2]) for v in want.values())
    assert applied["n_values"] == res["n_updated"]
    assert applied["exact"] is True


def test_patch_mask_counts_bit_changes(pair: tuple[Path, Path]) -> None:
    base, target = pair
    run_json("diff", str(base), str(target), "--tol", "0", "--name", "plain")
    run_json("diff", str(base), str(target), "--patch", "--name", "p")
    plain = {r["tensor"]: r["n_updated"] for r in
             run_json("sql", "SELECT tensor, tensor_n_updated AS n_updated FROM mask_tensors "
                          "WHERE mask_name='plain'")}
    patch = {r["tensor"]: r["n_updated"] for r in
             run_json("sql", "SELECT tensor, tensor_n_updated AS n_updated FROM mask_tensors "
                          "WHERE mask_name='p'")}
    # special: tol 0 misses +0->-0, -0->+0 and the NaN payload change (3 of the 9 changes)
    assert (plain["special"], patch["special"]) == (6, 9)
    # mixed: tol 0 misses only +0 -> -0
    assert (plain["h.0.mixed"], patch["h.0.mixed"]) == (2, 3)
    assert plain["emb.weight"] == patch["emb.weight"]
    a = np.frombuffer(tensor_bits(base)["big.weight"][2], dtype=np.uint32)
    b = np.frombuffer(tensor_bits(target / "model.safetensors")["big.weight"][2],
                      dtype=np.uint32)
    assert plain["big.weight"] == patch["big.weight"] == int(np.count_nonzero(a != b))


def test_values_readable_with_zarr_and_numpy(pair: tuple[Path, Path]) -> None:
    base, target = pair
    run_json("diff", str(base), str(target), "--patch", "--name", "p")
    store = run_json("sql", "SELECT id FROM masks WHERE name='p'")[0]["id"]
    from maskhub import Registry

    path = Registry().get(store).path
    g = zarr.open_group(str(path), mode="r")
    assert g.attrs["has_values"] is True
    arr = g["special"]
    n = int(np.prod(arr.attrs["shape"]))
    mask = np.unpackbits(arr[:], count=n, bitorder=arr.attrs["bitorder"]).view(bool)
    values = g["values/special"][:]
    assert g["values/special"].attrs["dtype"] == "bfloat16" and values.dtype == np.uint16
    flat = BF16_BASE.ravel().copy()
    flat[np.flatnonzero(mask)] = values
    assert flat.tobytes() == BF16_TARGET.tobytes()


def test_ls_and_show_say_patch(pair: tuple[Path, Path]) -> None:
    base, target = pair
    run_json("diff", str(base), str(target), "--patch", "--name", "p")
    run_json("diff", str(base), str(target), "--name", "m")
    rows = {r["name"]: r["has_values"] for r in run_json("ls")}
    assert rows == {"p": True, "m": False}
    assert run_json("show", "p")["mask"]["has_values"] is True


def test_mask_without_values_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, target = pair
    run_json("diff", str(base), str(target), "--name", "m")
    assert fail_line("apply", "m", str(base), str(tmp_path / "out")) == (
        "Error: mask 'm' holds no values, so it cannot rebuild its target: make a patch with "
        "`maskhub diff BASE TARGET --patch`")
    assert not (tmp_path / "out").exists()


def test_wrong_base_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, target = pair
    run_json("diff", str(base), str(target), "--patch", "--name", "p")
    # the target itself: same names and shapes, but h.0.mixed is float32 there
    assert fail_line("apply", "p", str(target), str(tmp_path / "out")) == (
        f"Error: {target} is not the base of mask 'p': tensor 'h.0.mixed' is float32 [8, 8] "
        "there, the mask's base had bfloat16 [8, 8]")
    other = tmp_path / "other.safetensors"
    save(other, {"emb.weight": ("bfloat16", (64, 64), np.zeros(4096, np.uint16))})
    assert fail_line("apply", "p", str(other), str(tmp_path / "out")) == (
        f"Error: {other} is not the base of mask 'p': it lacks tensor 'big.weight' (and 4 more)")
    assert not (tmp_path / "out").exists()
    # the same names, shapes and dtypes, other bytes: refused by the content fingerprint
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(base, twin) if base.is_dir() else shutil.copy(base, twin)
    victim = next(twin.glob("*.safetensors")) if twin.is_dir() else twin
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0x01  # the last byte of the last tensor
    victim.write_bytes(bytes(raw))
    line = fail_line("apply", "p", str(twin), str(tmp_path / "out"))
    assert line.startswith(f"Error: mask 'p' is a mask of another model: {twin} is not the "
                           "base it was made from (its tensors hash to xxh3-128:"), line
    # the fingerprint comes from the bytes apply read: what it wrote aside is gone too
    assert not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]
    (tmp_path / "taken").mkdir()
    assert fail_line("apply", "p", str(base), str(tmp_path / "taken")) == (
        f"Error: {tmp_path / 'taken'} already exists: give a new directory for the rebuilt "
        "model")


def test_patch_at_positive_tol_warns(pair: tuple[Path, Path]) -> None:
    from click.testing import CliRunner

    from maskhub.cli import main

    base, target = pair
    result = CliRunner().invoke(main, ["diff", str(base), str(target), "--patch", "--tol",
                                       "1e-5", "--name", "lossy"])
    assert result.exit_code == 0, result.output
    assert " ".join(result.stderr.split()) == (  # rich wraps the line at the terminal width
        "warning: a patch at --tol 1e-05 leaves out entries that moved by at most 1e-05, so "
        "`maskhub apply` will not rebuild the target exactly; --tol 0 (the default with "
        "--patch) is lossless")


def test_mask_apply_to_torch_model(pair: tuple[Path, Path]) -> None:
    import torch

    from maskhub import Registry

    base, target = pair
    run_json("diff", str(base), str(target), "--patch", "--name", "p")
    want = tensor_bits(target / "model.safetensors")
    model = torch.nn.Module()
    for name, (dtype, shape, raw) in tensor_bits(base).items():
        # the mixed tensor is loaded in the target's dtype (fp32), the others as stored
        as_dtype = want[name][0]
        t = torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype)).reshape(shape)
        model.register_parameter(name.replace(".", "_"),
                                 torch.nn.Parameter(t.to(getattr(torch, as_dtype)),
                                                    requires_grad=False))
    mask = Registry().get("p")
    written = mask.apply_to(model, name_map=lambda n: n.replace(".", "_"))
    assert written == mask.n_updated
    for name, (_, _, raw) in want.items():
        got = getattr(model, name.replace(".", "_")).detach()
        assert got.contiguous().view(torch.uint8).numpy().tobytes() == raw, name
    run_json("diff", str(base), str(target), "--name", "m")
    with pytest.raises(PatchError, match="holds no values"):
        Registry().get("m").apply_to(model)


def test_a_patch_is_still_a_mask(pair: tuple[Path, Path], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from maskhub import Registry

    base, target = pair
    run_json("diff", str(base), str(target), "--patch", "--name", "p")
    run_json("diff", str(base), str(target), "--tol", "0", "--name", "m")
    assert run_json("fsck")["problems"] == []
    assert run_json("overlap", "p", "m")["n_both"] == run_json("show", "m")["mask"]["n_updated"]
    union = run_json("combine", "union", "p", "m", "--name", "u")
    assert union["n_updated"] == run_json("show", "p")["mask"]["n_updated"]
    assert run_json("show", "u")["mask"]["has_values"] is False
    # importing a patch's store elsewhere registers its bits (not its values)
    store = Registry().get("p").path
    monkeypatch.setenv("MASKHUB_HOME", str(tmp_path / "other"))
    run_json("import", str(store), "--name", "imported")
    assert [(r["name"], r["has_values"]) for r in run_json("ls")] == [("imported", False)]
    assert fail_line("apply", "imported", str(base), str(tmp_path / "out")).startswith(
        "Error: mask 'imported' holds no values")
