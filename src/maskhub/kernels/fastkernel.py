"""Fast CPU diff of raw bit patterns: bf16/fp16 (16-bit) and fp32 (32-bit).

Each function diffs one chunk: ``a`` (base) and ``b`` (target) are unsigned-integer views of
the raw values, ``out`` receives the packed mask (little bit order, ``ceil(n/8)`` bytes) and
``counts[t]`` is incremented by the number of entries updated at ``tols[t]`` (``tols[0]`` is
the mask's own tolerance, the rest the sweep).

Algorithm (same in both backends): an entry whose bit pattern equals the base's is unchanged;
one whose pattern differs while both magnitudes lie in ``[lo, inf]`` (``lo``: see
:mod:`maskhub.kernels.floatbits`) is updated; the rest ("candidates": a small or NaN value
on either side, the ±0 pair) are decided exactly in float64 with the reference formula.

The numba backend (:mod:`maskhub.kernels.numbakernel`) runs per chunk one vectorised pass
that classifies and packs at once (sure-updated bits into the mask, candidate bits into a
scratch bitmap), a popcount of the mask, and a walk over the
set bits of the packed candidates (``cttz``) that does the float64 check. The numpy backend
does the same in vectorised numpy passes.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np

#: numba is optional: without it the numpy backend (same results, slower) is used. It is
#: imported only when a diff needs it (``import numba`` costs ~0.2 s of every CLI start).
HAVE_NUMBA = importlib.util.find_spec("numba") is not None


_KERNELS: list[ModuleType] = []


def numba_kernels() -> ModuleType:
    """The compiled kernels (:mod:`maskhub.kernels.numbakernel`), imported on first use (the
    cache directory is chosen once, before: each call after that is a lookup, which counts
    where a kernel runs per tensor, e.g. a live record of a model's ~100 tensors)."""
    if not _KERNELS:
        choose_numba_cache()
        from maskhub.kernels import numbakernel

        _KERNELS.append(numbakernel)
    return _KERNELS[0]


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def choose_numba_cache() -> str | None:
    """Make sure numba can cache the compiled kernels on disk; return the directory chosen.

    numba caches next to the source (``kernels/__pycache__``) when it can write there, as
    in a checkout or a user's own venv. In a read-only site-packages (a system or container
    install) its fallback, ``~/.cache/numba``, may be unwritable too, and then numba refuses
    to even define the kernels. There the cache goes to ``$XDG_CACHE_HOME/maskhub/numba``
    (``~/.cache/maskhub/numba``), else to a per-user directory under the temp dir.
    ``NUMBA_CACHE_DIR`` set by the user always wins.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    if _writable_dir(Path(__file__).parent / "__pycache__"):
        return None  # numba's own in-tree cache
    import numba

    if numba.config.CACHE_DIR:
        return str(numba.config.CACHE_DIR)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for candidate in (Path(cache) / "maskhub" / "numba",
                      Path(tempfile.gettempdir()) / f"maskhub-numba-{os.getuid()}"):
        if _writable_dir(candidate):
            numba.config.CACHE_DIR = str(candidate)
            return str(candidate)
    return None


def updated_exact(fa: np.ndarray, fb: np.ndarray, tols: np.ndarray, counts: np.ndarray
                   ) -> np.ndarray:
    """Reference decision on float64 values; returns the mask at ``tols[0]`` and adds the
    count at every tolerance of ``tols`` to ``counts``."""
    changed = (fa != fb) & ~(np.isnan(fa) & np.isnan(fb))
    d = np.abs(fb - fa)
    result = changed & ~(d <= tols[0])
    counts[0] += int(np.count_nonzero(result))
    for t in range(1, tols.shape[0]):
        counts[t] += int(np.count_nonzero(changed & ~(d <= tols[t])))
    return result


def numpy_chunk(a: np.ndarray, b: np.ndarray, lut_a: np.ndarray | None,
                lut_b: np.ndarray | None, mag_mask: int, lo: int, inf: int, tols: np.ndarray,
                out: np.ndarray, counts: np.ndarray) -> None:
    """numpy backend. ``lut_a``/``lut_b``: 65536-entry float64 value tables indexed by the
    16-bit patterns (bf16, fp16), or ``None`` for fp32 bit patterns (``uint32``)."""
    ne = a != b
    ma = a & a.dtype.type(mag_mask)
    mb = b & b.dtype.type(mag_mask)
    sure = ne & (ma >= lo) & (ma <= inf) & (mb >= lo) & (mb <= inf)
    cand = np.flatnonzero(ne & ~sure)
    n_sure = int(np.count_nonzero(sure))
    if cand.size:
        with np.errstate(invalid="ignore"):  # NaN payloads and inf - inf, as in the reference
            if lut_a is None or lut_b is None:
                fa = a[cand].view(np.float32).astype(np.float64)
                fb = b[cand].view(np.float32).astype(np.float64)
            else:
                fa, fb = lut_a[a[cand]], lut_b[b[cand]]
            sure[cand] = updated_exact(fa, fb, tols, counts)
    counts += n_sure
    out[:] = np.packbits(sure, bitorder="little")
