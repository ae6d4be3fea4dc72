"""The store writer's zstd frames (storage/zstdframe.py): byte for byte numcodecs' frames at
level 1 without checksum, whichever library compresses them, and decoded by numcodecs."""

from __future__ import annotations

import numpy as np
import pytest
from numcodecs import Zstd

from maskhub.storage import zstdframe


@pytest.mark.parametrize("nbytes", [1, 100, 1 << 20])
@pytest.mark.parametrize("density", [0.01, 0.19, 0.5])
def test_frames_are_numcodecs_frames(nbytes: int, density: float,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(nbytes)
    packed = np.packbits(rng.random(nbytes * 8) < density)
    expected = bytes(Zstd(level=1, checksum=False).encode(packed))
    assert zstdframe._libzstd() is not None  # numcodecs' own zstd, loaded without numcodecs
    assert zstdframe.compress(packed, 1) == expected
    out = np.empty_like(packed)
    zstdframe.decompress(expected, out)
    assert np.array_equal(out, packed)
    monkeypatch.setattr(zstdframe, "_libzstd", lambda: None)  # no library: numcodecs
    assert zstdframe.compress(packed, 1) == expected


def test_decoding_is_numcodecs_decoding() -> None:
    rng = np.random.default_rng(5)
    packed = np.packbits(rng.random(8 << 16) < 0.1)
    frame = bytes(Zstd(level=1, checksum=False).encode(packed))
    out = np.empty_like(packed)
    assert zstdframe.decompress(frame, out) is out and np.array_equal(out, packed)
    with pytest.raises(ValueError, match="destination buffer too small"):
        zstdframe.decompress(frame, np.empty(packed.size - 1, np.uint8))
    with pytest.raises(RuntimeError, match="Zstd decompression error"):
        zstdframe.decompress(b"not a zstd frame", out)
    with pytest.raises(RuntimeError, match="Zstd decompression error"):
        zstdframe.decompress(frame[:-5], out)  # truncated


def test_decoding_into_a_bytearray_needs_no_numpy_array() -> None:
    """A store's validation decodes into a bytearray: the same bytes and the same errors."""
    rng = np.random.default_rng(6)
    packed = np.packbits(rng.random(8 << 16) < 0.1)
    frame = bytes(Zstd(level=1, checksum=False).encode(packed))
    out = bytearray(packed.size)
    assert zstdframe.decompress(frame, out) is out and bytes(out) == packed.tobytes()
    with pytest.raises(ValueError, match="destination buffer too small"):
        zstdframe.decompress(frame, bytearray(packed.size - 1))
    with pytest.raises(RuntimeError, match="Zstd decompression error"):
        zstdframe.decompress(frame[:-5], out)
