"""Cost of the precision null in a diff (issue 24): per 2^20-entry bf16 chunk (~30% of the
entries updated), the diff kernel, the magnitude strata and the largest-|Δ| walk, each the
best of 30 calls, for the numba and numpy backends. Prints Markdown lines.

    python bench/bench_precision_null.py
"""

from __future__ import annotations

import os
import time

import numpy as np

from maskhub.kernels import fastkernel
from maskhub.kernels.kernel import DiffKernel
from maskhub.kernels.precision import delta_max_fn
from maskhub.kernels.strata import BINS, strata_fn

N = 1 << 20


def best_ms(fn, reps: int = 30) -> float:
    """Best wall time of ``reps`` calls, in ms."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    """Time the three per-chunk functions on each backend."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal(N).astype(np.float32) * 0.02
    b = a + (rng.random(N) < 0.3) * 1e-3

    def bf16(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)

    ar, br = bf16(a), bf16(b)
    print(f"Load average at start {os.getloadavg()[0]:.2f}.\n")
    print("| backend | diff kernel (ms) | strata (ms) | largest \\|Δ\\| (ms) | added |")
    print("|---|---:|---:|---:|---:|")
    for backend in ("numba", "numpy") if fastkernel.HAVE_NUMBA else ("numpy",):
        td, ts, tm = _times(backend, ar, br)
        print(f"| {backend} | {td:.2f} | {ts:.2f} | {tm:.2f} | +{100 * tm / (td + ts):.0f}% |")


def _times(backend: str, ar: np.ndarray, br: np.ndarray) -> tuple[float, float, float]:
    """(diff kernel, strata, largest |Δ|) ms per chunk on ``backend``."""
    fn = DiffKernel(tol=1e-5, backend=backend).chunk_fn("bfloat16", "bfloat16")
    sfn = strata_fn("bfloat16", backend)
    dfn = delta_max_fn("bfloat16", "bfloat16", backend)
    assert dfn is not None
    out = np.empty(N // 8, np.uint8)
    counts = np.zeros(1, np.int64)
    st = np.zeros((2, BINS), np.int64)
    fn(ar, br, out, counts)
    return (best_ms(lambda: fn(ar, br, out, counts)), best_ms(lambda: sfn(ar, out, N, st)),
            best_ms(lambda: dfn(ar, br, out, N)))

if __name__ == "__main__":
    main()
