"""Cold files read around the page cache (O_DIRECT): the same bytes, the same masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factory import plant_updates, random_state, save

from maskhub import Registry
from maskhub.checkpoints import direct
from maskhub.cli import main

MB = 1 << 20


def _direct_fd(path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("MASKHUB_DIRECT_IO", "1")
    fd = os.open(path, os.O_RDONLY)
    try:
        dfd = direct.open_direct(path, path.stat().st_size, fd)
    finally:
        os.close(fd)
    if dfd is None:
        pytest.skip("this file system does not support O_DIRECT")
    return dfd


def test_direct_reader_hands_out_every_chunks_bytes(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = np.random.default_rng(0).integers(0, 256, 23 * MB + 777, dtype=np.uint8)
    path = tmp_path / "f.bin"
    path.write_bytes(data.tobytes())
    dfd = _direct_fd(path, monkeypatch)
    # Two ranges as two tensors would lie: unaligned starts, the second ending at the
    # file's (unaligned) end, chunks of 2 and 3 MiB, some reads grouping several chunks.
    ranges = [(1000, 9 * MB + 3, 2 * MB), (9 * MB + 3, len(data), 3 * MB)]
    reader = direct.DirectReader(ahead=4 * MB)
    position = 0
    chunks = []
    for begin, end, step in ranges:
        reader.add(dfd, position, begin, end, step)
        chunks += [(s, min(end, s + step)) for s in range(begin, end, step)]
        position += end - begin
    reader.start()
    try:
        for begin, end in chunks:
            reader.advance(end - begin)
            got = reader.take(dfd, begin)
            assert got is not None and np.array_equal(got, data[begin:end]), begin
            reader.release(dfd, begin)
        pooled = len(reader.pool)
    finally:
        reader.close()
    assert len(chunks) == 10 and not reader.pieces
    # Buffers came back and were read into again: a few for 10 chunks (a 4 MiB window).
    assert 1 <= pooled <= 4


def test_a_short_file_falls_back_to_the_mapping(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(3 * MB))
    dfd = _direct_fd(path, monkeypatch)
    reader = direct.DirectReader(ahead=MB)
    reader.add(dfd, 0, 0, 5 * MB, 4 * MB)  # the header promises 5 MiB, the file has 3
    reader.start()
    try:
        reader.advance(5 * MB)
        assert reader.take(dfd, 0) is None
    finally:
        reader.close()


def test_auto_mode_reads_only_cold_large_files_around_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASKHUB_DIRECT_IO", raising=False)
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(direct.DIRECT_MIN))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        size = direct.DIRECT_MIN
        assert direct.open_direct(path, size, fd) is None  # just written: cached
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        dfd = direct.open_direct(path, size, fd)
        if dfd is None and not direct.cached(fd, 0, memoryview(bytearray(1))):
            probe = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            os.close(probe)  # O_DIRECT opens, yet no descriptor: the choice is wrong
            pytest.fail("a cold 64 MiB file was not read around the cache")
        if dfd is not None:
            os.close(dfd)
        # A pair that fits in the memory available stays on the page cache.
        assert direct.open_direct(path, size, fd, outgrows_cache=False) is None
        assert direct.pair_outgrows_cache(1 << 60) and not direct.pair_outgrows_cache(1)
        monkeypatch.setenv("MASKHUB_DIRECT_IO", "0")
        assert direct.open_direct(path, size, fd) is None
        small = tmp_path / "small.bin"
        small.write_bytes(bytes(MB))
        monkeypatch.delenv("MASKHUB_DIRECT_IO")
        assert direct.open_direct(small, MB, fd) is None  # below DIRECT_MIN
    finally:
        os.close(fd)


def _pair(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    shapes = {"model.embed_tokens.weight": (1024, 3 * 1024 + 5),  # 3 chunks and a bit
              "model.layers.0.mlp.up_proj.weight": (700, 2048),
              "model.layers.0.input_layernorm.weight": (2048,)}
    base = random_state(shapes, torch.bfloat16, seed=3)
    base["model.layers.0.mlp.up_proj.weight"] = \
        base["model.layers.0.mlp.up_proj.weight"].float()  # fp32: other chunk bytes
    target, planted = plant_updates(base, 0.07, seed=4)
    return save(base, tmp_path / "base", 2), save(target, tmp_path / "target", 2), planted


@pytest.mark.parametrize("patch", [False, True])
def test_cold_diff_through_the_cli_reads_around_the_cache_with_the_same_mask(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, patch: bool) -> None:
    base, target, planted = _pair(tmp_path)
    taken: list[int] = []
    original = direct.DirectReader.take

    def counting(self: direct.DirectReader, dfd: int, begin: int) -> np.ndarray | None:
        got = original(self, dfd, begin)
        taken.append(0 if got is None else len(got))
        return got

    monkeypatch.setattr(direct.DirectReader, "take", counting)
    monkeypatch.setenv("MASKHUB_HOME", str(tmp_path / "home"))
    flags = ["--patch"] if patch else []
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("MASKHUB_DIRECT_IO", mode)
        r = CliRunner().invoke(main, ["diff", str(base), str(target), "--name", f"m{mode}",
                                      "--device", "cpu", *flags])
        assert r.exit_code == 0, r.output
        results[mode] = Registry(tmp_path / "home").get(f"m{mode}")
    if not taken:
        pytest.skip("this file system does not support O_DIRECT")
    # Every chunk of both sides, once: bf16 embeddings and norm, fp32 MLP.
    assert sum(taken) == 2 * (1024 * 3077 * 2 + 700 * 2048 * 4 + 2048 * 2)
    for m in results.values():
        assert m.n_updated == sum(int(v.sum()) for v in planted.values())
        for name, expect in planted.items():
            assert np.array_equal(m[name], expect), name
    assert results["0"].row["base_fingerprint"] == results["1"].row["base_fingerprint"]
    assert results["0"].row["target_fingerprint"] == results["1"].row["target_fingerprint"]
