"""Mask arrays written by maskhub's direct writer are plain Zarr v3 that stock zarr reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from maskhub.errors import MaskStoreError
from maskhub.kernels.bitcount import count_bytes, count_entries
from maskhub.schemas.metadata import MaskMetadata, TensorStats
from maskhub.storage import zstdframe
from maskhub.storage.store import (
    CHUNK_BYTES,
    ZSTD_LEVEL,
    MaskStore,
    MaskWriter,
    write_packed_array,
)


def _entropy_bits(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _stock_read(path: Path) -> tuple[np.ndarray, dict]:
    """What a reader with only zarr + numpy does (the README's lines, both layouts)."""
    arr = zarr.open_array(store=str(path), mode="r", zarr_format=3)
    attrs = dict(arr.attrs)
    n = math.prod(attrs["shape"])
    if attrs.get("encoding") == "gaps-u8":
        c = arr[:].astype(np.int64)
        idx = np.cumsum(c + (c < 255))[c < 255] - 1
        bits = np.zeros(n, bool)
        bits[idx] = True
    else:
        bits = np.unpackbits(arr[:], count=n, bitorder=attrs["bitorder"])
    return bits.astype(bool).reshape(attrs["shape"]), attrs


@pytest.mark.parametrize("numel,density,chunk", [
    (1, 1.0, CHUNK_BYTES), (13, 0.5, CHUNK_BYTES), (4096 * 8 + 3, 0.1, 1000),
    (100_000, 0.0, 1000), (65_536, 0.02, 4096), (50_001, 1.0, 777)])
def test_direct_writer_roundtrips_through_stock_zarr(tmp_path: Path, numel: int, density: float,
                                                     chunk: int) -> None:
    rng = np.random.default_rng(numel)
    mask = rng.random(numel) < density
    packed = np.packbits(mask, bitorder="little")
    attrs = {"shape": [numel], "bitorder": "little", "numel": numel}
    write_packed_array(tmp_path / "t", packed, attrs, chunk_bytes=chunk)
    got, got_attrs = _stock_read(tmp_path / "t")
    assert np.array_equal(got, mask)
    assert got_attrs == attrs
    n_chunks = -(-packed.size // min(chunk, packed.size))
    stored = sorted(int(p.name) for p in (tmp_path / "t" / "c").iterdir())
    nonzero = [i for i in range(n_chunks)
               if packed[i * chunk:(i + 1) * chunk].any()]
    assert stored == nonzero  # all-zero chunks are not written


def test_metadata_document_is_what_zarr_writes(tmp_path: Path) -> None:
    packed = np.packbits(np.random.default_rng(0).random(80_000) < 0.1, bitorder="little")
    attrs = {"shape": [400, 200], "bitorder": "little"}
    write_packed_array(tmp_path / "mine", packed, attrs, chunk_bytes=4096)
    ref = zarr.create_array(store=str(tmp_path / "ref"), shape=packed.shape, dtype="uint8",
                            chunks=(4096,), compressors=[ZstdCodec(level=ZSTD_LEVEL)],
                            fill_value=0, attributes=attrs, zarr_format=3)
    ref[:] = packed
    mine = json.loads((tmp_path / "mine" / "zarr.json").read_text())
    theirs = json.loads((tmp_path / "ref" / "zarr.json").read_text())
    assert mine == theirs
    for i in range(3):  # same codec output, byte for byte
        assert (tmp_path / "mine" / "c" / str(i)).read_bytes() == \
            (tmp_path / "ref" / "c" / str(i)).read_bytes()


def _write_store(path: Path, tensors: dict[str, np.ndarray]) -> None:
    w = MaskWriter(path)
    n_params = n_upd = 0
    for name, mask in tensors.items():
        st = TensorStats(name, mask.shape, mask.size, int(mask.sum()))
        w.add(st, np.packbits(mask.reshape(-1), bitorder="little"))
        n_params += mask.size
        n_upd += int(mask.sum())
    w.finish(MaskMetadata(id="x", name="x", base_model="a", target_model="b",
                          n_params=n_params, n_updated=n_upd))


def test_mask_store_reads_direct_and_fallback_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": rng.random((96, 40)) < 0.2,
        "model.norm.weight": np.zeros(40, dtype=bool),
        "odd/nested name": rng.random((7, 3)) < 0.5,  # not a plain name: zarr's own path
    }
    _write_store(tmp_path / "m.zarr", tensors)
    store = MaskStore(tmp_path / "m.zarr")
    store.validate()
    for name, mask in tensors.items():
        assert np.array_equal(store.unpacked(name), mask)
    group = zarr.open_group(str(tmp_path / "m.zarr"), mode="r", zarr_format=3)
    got, _ = _stock_read(tmp_path / "m.zarr" / "model.layers.0.mlp.up_proj.weight")
    assert np.array_equal(got, tensors["model.layers.0.mlp.up_proj.weight"])
    assert group.attrs["tensors"] == list(tensors)
    # An untouched tensor costs only its metadata document.
    norm = tmp_path / "m.zarr" / "model.norm.weight"
    assert sum(p.stat().st_size for p in norm.rglob("*") if p.is_file()) < 1024


@pytest.mark.parametrize("density,bound", [(0.05, 1.35), (0.1, 1.15), (0.2, 1.15), (0.5, 1.01)])
def test_stored_size_tracks_the_entropy_bound(tmp_path: Path, density: float,
                                              bound: float) -> None:
    n = 1 << 23
    mask = np.random.default_rng(2).random(n) < density
    stored = write_packed_array(tmp_path / "t", np.packbits(mask, bitorder="little"),
                                {"shape": [n], "bitorder": "little"})
    ratio = stored * 8 / (n * _entropy_bits(float(mask.mean())))
    assert ratio <= bound, ratio


@pytest.mark.parametrize("plain", [True, False])
def test_validation_counts_the_same_with_or_without_numpy(tmp_path: Path, plain: bool,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """A push or a pull validates without numpy (``int.bit_count`` on the decoded chunks,
    byte sums of the gap codes): the same counts, and the same refusal of a flipped bit, as
    numpy's (forced here either way: the test process has numpy loaded)."""
    import maskhub.storage.store as store_module

    monkeypatch.setattr(store_module, "plain_count", lambda nbytes: plain)
    # several chunks per tensor: the writer's default chunk size, made 1 KiB
    monkeypatch.setattr(store_module.packed_array_files, "__defaults__", (1 << 10, None))
    rng = np.random.default_rng(2)
    tensors = {f"t{i}": rng.random(shape) < p for i, (shape, p) in enumerate(
        [((97, 41), 0.3), ((5000,), 0.02), ((3, 3), 0.5), ((8192 * 4 + 5,), 0.9), ((13,), 0.0)])}
    _write_store(tmp_path / "m.zarr", tensors)
    store = MaskStore(tmp_path / "m.zarr")
    store.validate()
    for name, mask in tensors.items():
        assert store.count(name, mask.size) == int(mask.sum())
    packed = tmp_path / "m.zarr" / "t3"  # dense: packed bits, not a gap code
    assert MaskStore(tmp_path / "m.zarr").encoding("t3") is None
    chunk = packed / "c" / "2"
    data = bytearray(zstdframe.decompress(chunk.read_bytes(), bytearray(1 << 10)))
    data[5] ^= 0x10
    chunk.write_bytes(zstdframe.compress(np.frombuffer(bytes(data), np.uint8), 1))
    n = int(tensors["t3"].sum())
    with pytest.raises(MaskStoreError, match=f"'t3' has {n - 1 if data[5] & 0x10 == 0 else n + 1} "
                                             f"set bits, its metadata says {n}"):
        MaskStore(tmp_path / "m.zarr").validate()


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 63, 64, 65, 1000, 8 * 4096 - 3])
def test_count_of_bytes_is_numpy_count(numel: int) -> None:
    rng = np.random.default_rng(numel)
    packed = rng.integers(0, 256, (numel + 7) // 8, dtype=np.uint8)
    want = count_entries(packed, numel)
    assert count_bytes(packed.tobytes(), numel) == want
    assert count_entries(memoryview(packed.tobytes()), numel) == want
    assert count_entries(bytearray(packed.tobytes()), numel) == want
