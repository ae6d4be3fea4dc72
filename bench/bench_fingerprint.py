"""What the content fingerprint costs the diff: ``run_diff`` on one bf16 Llama-shaped pair
(warm page cache) with and without hashing every chunk of both sides (XXH3-128), alternated,
best of ``--reps``; and a plain :func:`checkpoint_fingerprint` of one side. Not a test.

    python bench/bench_fingerprint.py --size-mb 512 --reps 5
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from make_pair import make_pair  # noqa: E402

from maskhub.checkpoints.fingerprint import checkpoint_fingerprint  # noqa: E402
from maskhub.checkpoints.sources import open_checkpoint  # noqa: E402
from maskhub.diff.pipeline import run_diff  # noqa: E402
from maskhub.kernels.kernel import DiffKernel  # noqa: E402
from maskhub.storage.store import MaskWriter  # noqa: E402


def one(base: Path, target: Path, out: Path, fingerprint: bool) -> float:
    """Seconds of one pipeline run into a fresh store."""
    a, b = open_checkpoint(base), open_checkpoint(target)
    shutil.rmtree(out, ignore_errors=True)
    writer = MaskWriter(out)
    t = time.perf_counter()
    outcome = run_diff(a, b, list(a.tensors), DiffKernel(tol=1e-5, device="cpu"), writer,
                       fingerprint=fingerprint)
    dt = time.perf_counter() - t
    assert (outcome.base_fingerprint is not None) == fingerprint
    return dt


def main() -> None:
    """Measure and print one Markdown table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=512, help="bytes per side, in MiB")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mh-fp-"))
    try:
        base, target = make_pair(root, args.size_mb << 20, 0.1)
        nbytes = sum(f.stat().st_size for d in (base, target) for f in d.glob("*.safetensors"))
        one(base, target, root / "warm.zarr", True)  # warm the page cache and numba
        with_fp, without = [], []
        for _ in range(args.reps):
            without.append(one(base, target, root / "m.zarr", False))
            with_fp.append(one(base, target, root / "m.zarr", True))
        t = time.perf_counter()
        checkpoint_fingerprint(base)
        alone = time.perf_counter() - t
        half = nbytes / 2
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs (shared, noisy), "
              f"pair {nbytes / 1e9:.2f} GB (both sides), warm cache, best of {args.reps}")
        print("| run | seconds | GB/s of input |")
        print("|---|---|---|")
        print(f"| run_diff without fingerprint | {min(without):.3f} | "
              f"{nbytes / min(without) / 1e9:.2f} |")
        print(f"| run_diff with fingerprint (both sides) | {min(with_fp):.3f} | "
              f"{nbytes / min(with_fp) / 1e9:.2f} |")
        print(f"| cost of the fingerprint | {min(with_fp) - min(without):+.3f} | "
              f"{(min(with_fp) / min(without) - 1) * 100:+.1f}% |")
        print(f"| checkpoint_fingerprint of one side alone | {alone:.3f} | "
              f"{half / alone / 1e9:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
