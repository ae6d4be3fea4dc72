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
