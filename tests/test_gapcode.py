"""The byte-gap layout of low-density mask arrays (``encoding: "gaps-u8"``): exact at every
density and edge, read by stock zarr + numpy with the README's lines, picked per tensor where
it is smaller, and every tool (overlap, combine, import, fsck) works on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import zarr

from maskhub import Registry
from maskhub.errors import MaskStoreError
from maskhub.schemas.metadata import MaskMetadata, TensorStats
from maskhub.storage import gapcode
from maskhub.storage.store import MaskStore, MaskWriter, write_packed_array


def _readme_decode(arr: zarr.Array) -> np.ndarray:
    """The README's lines: a gap-coded array back to the boolean mask."""
    c = arr[:].astype(np.int64)
    idx = np.cumsum(c + (c < 255))[c < 255] - 1
    bits = np.zeros(math.prod(arr.attrs["shape"]), bool)
    bits[idx] = True
    return bits.reshape(arr.attrs["shape"])


def _entropy_bits(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _roundtrip(mask: np.ndarray) -> np.ndarray:
    packed = np.packbits(mask, bitorder="little")
    codes = gapcode.encode(packed, mask.size)
    assert np.array_equal(gapcode.indices(codes), np.flatnonzero(mask))
    back, count = gapcode.decode(codes, mask.size)
    assert count == int(mask.sum())
    assert np.array_equal(back, packed)
    return codes


@pytest.fixture(params=["numpy", "numba"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both implementations: numpy in small blocks (several blocks per tensor), and the numba
    kernels (used from 1 MiB packed when numba is loaded, else from 64 MiB)."""
    if request.param == "numba":
        monkeypatch.setattr(gapcode, "KERNEL_LOAD_BYTES", 0)
        monkeypatch.setattr(gapcode, "KERNEL_MIN_BYTES", 0)
    else:
        monkeypatch.setattr(gapcode, "NUMPY_BLOCK", 1000)
    return request.param


@pytest.mark.parametrize("numel,density", [
    *((40_003, d) for d in (0.0, 0.0005, 0.01, 0.05, 0.2, 0.5, 1.0)), (1 << 20, 0.003)])
def test_random_masks_roundtrip_exactly(numel: int, density: float, path: str) -> None:
    mask = np.random.default_rng(int(density * 1e4) + numel).random(numel) < density
    _roundtrip(mask)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 255, 256, 257, 511, 4096, 8005, (1 << 21) + 5])
def test_edges_empty_full_first_last(numel: int, path: str) -> None:
    assert _roundtrip(np.zeros(numel, bool)).size == 0
    assert not _roundtrip(np.ones(numel, bool)).any()  # every gap is 0
    first = np.zeros(numel, bool)
    first[0] = True
    assert _roundtrip(first).tolist() == [0]
    last = np.zeros(numel, bool)
    last[-1] = True
    codes = _roundtrip(last)
    assert codes.size == (numel - 1) // 255 + 1 and codes[-1] == (numel - 1) % 255


@pytest.mark.parametrize("gap,codes", [
    (0, [0]), (254, [254]), (255, [255, 0]), (256, [255, 1]), (509, [255, 254]),
    (510, [255, 255, 0])])
def test_gap_escapes(gap: int, codes: list[int], path: str) -> None:
    mask = np.zeros(gap + 600, bool)
    mask[[gap, gap + 255, gap + 255 + 256]] = True  # then a gap of 254, then one of 255
    got = _roundtrip(mask)
    assert got.tolist() == [*codes, 254, 255, 0]


def test_gap_beyond_32_bits() -> None:
    far = (1 << 32) + 1000
    idx = np.array([3, far, far + 1], dtype=np.int64)
    codes = gapcode.codes_of_indices(idx)
    assert codes.size == 1 + (far - 4) // 255 + 1 + 1
    assert np.array_equal(gapcode.indices(codes), idx)


def test_count_without_decoding() -> None:
    """``count`` gives decode's count and refuses what decode refuses, without decoding."""
    idx = np.array([0, 7, 8, 300, 301, 5000, 99_999], dtype=np.int64)
    codes = gapcode.codes_of_indices(idx)
    assert gapcode.count(codes, 100_000) == 7 == gapcode.decode(codes, 100_000)[1]
    assert gapcode.count(np.zeros(0, np.uint8), 10) == 0
    with pytest.raises(gapcode.GapCodeError, match="names entry 99999 of 99999$"):
        gapcode.count(codes, 99_999)
    with pytest.raises(gapcode.GapCodeError, match="names entry 10 of 10$"):
        gapcode.count(np.array([10], np.uint8), 10)
    with pytest.raises(gapcode.GapCodeError, match="ends in an escape byte"):
        gapcode.count(np.array([1, 255], np.uint8), 1000)
    far = (1 << 32) + 1000  # a sum beyond 32 bits
    codes = gapcode.codes_of_indices(np.array([3, far], dtype=np.int64))
    assert gapcode.count(codes, far + 1) == 2
    with pytest.raises(gapcode.GapCodeError, match=f"names entry {far} of {far}$"):
        gapcode.count(codes, far)


def test_damaged_codes_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(gapcode.GapCodeError, match="names entry 10 of 10"):
        gapcode.decode(np.array([10], np.uint8), 10)
    with pytest.raises(gapcode.GapCodeError, match="escape"):
        gapcode.decode(np.array([1, 255], np.uint8), 1000)
    monkeypatch.setattr(gapcode, "KERNEL_LOAD_BYTES", 0)  # the numba kernel's check
    big = 9 << 20
    with pytest.raises(gapcode.GapCodeError, match=f"does not fit {big} entries"):
        gapcode.decode(np.full(big // 255 + 2, 255, np.uint8), big)


def _write(path: Path, tensors: dict[str, np.ndarray]) -> None:
    w = MaskWriter(path)
    for name, mask in tensors.items():
        w.add(TensorStats(name, mask.shape, mask.size, int(mask.sum())),
              np.packbits(mask.reshape(-1), bitorder="little"))
    w.finish(MaskMetadata(id="x", name="x", base_model="a", target_model="b",
                          n_params=sum(m.size for m in tensors.values()),
                          n_updated=sum(int(m.sum()) for m in tensors.values())))


@pytest.mark.parametrize("density", [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5])
def test_stored_size_within_5_percent_of_entropy(tmp_path: Path, density: float) -> None:
    n = 1 << 21
    mask = np.random.default_rng(3).random(n) < density
    _write(tmp_path / "m.zarr", {"t": mask})
    stored = sum(p.stat().st_size for p in (tmp_path / "m.zarr" / "t" / "c").iterdir())
    ratio = stored * 8 / (n * _entropy_bits(float(mask.mean())))
    assert ratio <= 1.05, ratio
    enc = json.loads((tmp_path / "m.zarr" / "t" / "zarr.json").read_text())["attributes"]
    if density <= 0.1 or density >= 0.3:  # in between: whichever compressed smaller
        assert enc.get("encoding") == ("gaps-u8" if density <= 0.1 else None)
    assert np.array_equal(MaskStore(tmp_path / "m.zarr").unpacked("t"), mask)


def test_stock_zarr_reads_a_gap_array(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    tensors = {"w.sparse": rng.random((300, 70)) < 0.03,
               "w.dense": rng.random((300, 70)) < 0.5,
               "w.empty": np.zeros(50, bool), "w.far": np.zeros(3000, bool)}
    tensors["w.far"][[0, 2999]] = True
    _write(tmp_path / "m.zarr", tensors)
    g = zarr.open_group(str(tmp_path / "m.zarr"), mode="r", zarr_format=3)
    assert g["w.sparse"].attrs["encoding"] == "gaps-u8" and "bitorder" not in g["w.sparse"].attrs
    assert "encoding" not in g["w.dense"].attrs and "encoding" not in g["w.empty"].attrs
    for name in ("w.sparse", "w.far"):
        assert np.array_equal(_readme_decode(g[name]), tensors[name])
    store = MaskStore(tmp_path / "m.zarr")
    store.validate()
    assert [store.encoding(n) for n in tensors] == ["gaps-u8", None, None, "gaps-u8"]
    for name, mask in tensors.items():
        assert np.array_equal(store.unpacked(name), mask)


def test_a_damaged_gap_array_is_an_error(tmp_path: Path) -> None:
    mask = np.zeros(200, bool)
    mask[[5, 199]] = True
    _write(tmp_path / "m.zarr", {"t": mask})
    arr = zarr.open_array(str(tmp_path / "m.zarr" / "t"), mode="r+", zarr_format=3)
    assert arr[:].tolist() == [5, 193]
    arr[1] = 254  # the second bit would be entry 260 of 200
    with pytest.raises(MaskStoreError, match=r"m.zarr: array 't': its gap code names entry "
                                             r"260 of 200$"):
        MaskStore(tmp_path / "m.zarr").packed("t")
    with pytest.raises(MaskStoreError, match=r"m.zarr: array 't': its gap code names entry "
                                             r"260 of 200$"):
        MaskStore(tmp_path / "m.zarr").validate()  # counted without decoding: the same check
    arr[1] = 100
    assert np.flatnonzero(MaskStore(tmp_path / "m.zarr").unpacked("t")).tolist() == [5, 106]
    arr.update_attributes({"n_updated": 3})
    with pytest.raises(MaskStoreError, match="array 't' has 2 set bits, its metadata says 3"):
        MaskStore(tmp_path / "m.zarr").validate()
    arr.update_attributes({"encoding": "gaps-u16"})
    with pytest.raises(MaskStoreError, match="array 't' has encoding 'gaps-u16'; this maskhub "
                                             "reads packed bits and 'gaps-u8'"):
        MaskStore(tmp_path / "m.zarr").packed("t")


def test_packed_store_written_before_still_reads(tmp_path: Path) -> None:
    """A low-density tensor stored as packed bits (every store before gaps-u8) reads as before."""
    mask = np.random.default_rng(5).random(5000) < 0.02
    _write(tmp_path / "m.zarr", {"t": np.zeros(8, bool)})
    root = tmp_path / "m.zarr"
    import shutil

    shutil.rmtree(root / "t")
    write_packed_array(root / "t", np.packbits(mask, bitorder="little"),
                       {"shape": [5000], "bitorder": "little", "numel": 5000,
                        "n_updated": int(mask.sum())})
    doc = json.loads((root / "zarr.json").read_text())
    doc["attributes"]["n_params"], doc["attributes"]["n_updated"] = 5000, int(mask.sum())
    (root / "zarr.json").write_text(json.dumps(doc))
    store = MaskStore(root)
    store.validate()
    assert store.encoding("t") is None
    assert np.array_equal(store.unpacked("t"), mask)


def test_tools_work_on_gap_coded_masks(tmp_path: Path) -> None:
    """import -> overlap, combine, fsck and export on masks whose tensors are gap-coded."""
    rng = np.random.default_rng(6)
    shapes = {"model.layers.0.mlp.up_proj.weight": (512, 300),
              "model.layers.0.self_attn.q_proj.weight": (300, 300),
              "model.norm.weight": (300,)}
    a = {k: rng.random(s) < 0.02 for k, s in shapes.items()}
    b = {k: rng.random(s) < 0.04 for k, s in shapes.items()}
    a["model.norm.weight"][:] = False
    reg = Registry()
    ma = reg.add(a, name="a", base_model="base")
    reg.add(b, name="b", base_model="base")
    assert ma.store.encoding("model.layers.0.mlp.up_proj.weight") == "gaps-u8"
    res = reg.overlap("a", "b")
    both = sum(int((a[k] & b[k]).sum()) for k in shapes)
    assert res.n_both == both
    inter = reg.combine("intersect", ["a", "b"], name="ab")
    union = reg.combine("union", ["a", "b"], name="a-or-b")
    for k in shapes:
        assert np.array_equal(inter.store.unpacked(k), a[k] & b[k])
        assert np.array_equal(union.store.unpacked(k), a[k] | b[k])
    report = reg.fsck()
    assert report.clean and not report.findings
    other = Registry(tmp_path / "other-home")  # import of a maskhub store into another home
    again = other.add(ma.path, name="a-again", base_model="base")
    for k in shapes:
        assert np.array_equal(again.store.unpacked(k), a[k])


@pytest.mark.parametrize("seed", range(6))
def test_count_of_bytes_is_the_count_of_the_array(seed: int) -> None:
    """A push or a pull counts gap codes as bytes, without numpy: same count, same checks."""
    rng = np.random.default_rng(seed)
    mask = rng.random(int(rng.integers(1, 300_000))) < rng.choice([0.001, 0.02, 0.1])
    mask[-1] = bool(seed % 2)
    codes = gapcode.encode(np.packbits(mask, bitorder="little"), mask.size)
    for numel in (mask.size, mask.size + 7, int(np.flatnonzero(mask)[-1]) if mask.any() else 0):
        for form in (codes, codes.tobytes(), bytearray(codes.tobytes()),
                     memoryview(codes.tobytes())):
            try:
                want: int | str = gapcode.count(codes, numel)
            except gapcode.GapCodeError as exc:
                want = str(exc)
            try:
                got: int | str = gapcode.count(form, numel)
            except gapcode.GapCodeError as exc:
                got = str(exc)
            assert got == want
    with pytest.raises(gapcode.GapCodeError, match="escape byte"):
        gapcode.count(b"\x01\xff", 1000)
    assert gapcode.count(b"", 10) == 0


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 65_521, 1 << 20])
def test_byte_sum_is_exact(n: int) -> None:
    rng = np.random.default_rng(n)
    for data in (rng.integers(0, 256, n, dtype=np.uint8), np.full(n, 255, np.uint8)):
        assert gapcode.byte_sum(data.tobytes()) == int(data.sum(dtype=np.int64))
        assert gapcode.byte_sum(bytearray(data.tobytes())) == int(data.sum(dtype=np.int64))
