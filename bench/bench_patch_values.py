"""Patch size and ``apply`` speed (issue 22, items 1-2): not a test; writes a BENCHMARKS.md
section.

    .venv/bin/python bench/bench_patch_values.py --params 64

Builds a bf16 checkpoint pair (``--params`` million parameters, 4 shards, N(0, 0.02) weights)
whose target moves a fraction d of the entries by a few bf16 steps (an RL-like update), for
d in 0.2, 0.05, 0.01 and 0.002, and measures in one run, per density:

* the patch's bytes (``maskhub diff --patch``: every file of its store) in bits per
  parameter, split into mask and values, against ``16·d + H(d)`` (raw bf16 values plus the
  mask at its entropy bound) and the issue's target ``16·d + 1.1·H(d)``;
* ``maskhub apply`` (``Registry.apply``) against ``cp -r`` of the target, page cache warm,
  median of three, in GB/s of output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import write_section  # noqa: E402

DENSITIES = (0.2, 0.05, 0.01, 0.002)


def entropy(p: float) -> float:
    """Binary entropy H(p) in bits."""
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def save(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A bf16 safetensors file from uint16 bit arrays (2-D ``[rows, 4096]``)."""
    header, offset = {}, 0
    for name, bits in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(bits.shape),
                        "data_offsets": [offset, offset + bits.nbytes]}
        offset += bits.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for bits in tensors.values():
            f.write(bits.tobytes())


def make_pair(root: Path, n_params: int, density: float, seed: int = 0) -> tuple[Path, Path]:
    """Base and target directories, 4 shards each, target = base moved at ``density``."""
    rng = np.random.default_rng(seed)
    base, target = root / "base", root / "target"
    base.mkdir(parents=True)
    target.mkdir(parents=True)
    rows = n_params // 4 // 4096
    weight_map = {}
    for s in range(4):
        w = (rng.standard_normal((rows, 4096), dtype=np.float32) * 0.02)
        bits = (w.view(np.uint32) >> 16).astype(np.uint16)
        moved = bits.copy()
        where = rng.random(bits.shape) < density
        step = rng.integers(1, 4, size=int(where.sum()), dtype=np.uint16)  # 1-3 bf16 steps
        moved[where] = moved[where] + np.where(rng.random(step.shape) < 0.5, step,
                                               (-step.astype(np.int32)).astype(np.uint16))
        name = f"model-{s + 1:05d}-of-00004.safetensors"
        save(base / name, {f"layers.{s}.w": bits})
        save(target / name, {f"layers.{s}.w": moved})
        weight_map[f"layers.{s}.w"] = name
    for d in (base, target):
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    return base, target


def tree_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=int, default=64, help="million parameters per side")
    ap.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    args = ap.parse_args()
    from maskhub import Registry

    n = (args.params * 1_000_000) // (4 * 4096) * 4 * 4096
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-patch-") as tmp:
        reg = Registry(Path(tmp) / "home")
        for d in DENSITIES:
            root = Path(tmp) / f"d{d}"
            base, target = make_pair(root, n, d)
            mask = reg.diff(base, target, name=f"p{d}", patch=True)
            store = Path(mask.path)
            total = tree_bytes(store)
            values = tree_bytes(store / "values")
            h = entropy(mask.density)
            apply_s, cp_s = [], []
            for i in range(3):  # alternated, so that both see the same load
                out, copy = root / f"out{i}", root / f"cp{i}"
                t = time.perf_counter()
                reg.apply(mask, base, out)
                apply_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                subprocess.run(["cp", "-r", str(target), str(copy)], check=True)
                cp_s.append(time.perf_counter() - t)
                shutil.rmtree(out)
                shutil.rmtree(copy)
            gb = 2 * n / 1e9
            rows.append({"d": mask.density, "bits": 8 * total / n, "mask": 8 * (total - values) / n,
                         "values": 8 * values / n, "val_bits": 8 * values / max(1, mask.n_updated),
                         "bound": 16 * mask.density + h, "target": 16 * mask.density + 1.1 * h,
                         "apply": gb / statistics.median(apply_s),
                         "cp": gb / statistics.median(cp_s)})
            shutil.rmtree(root)
    load = os.getloadavg()
    lines = [
        "## Patches: `bench/bench_patch_values.py` (issue 22, items 1-2)", "",
        f"Produced by one run of `python bench/bench_patch_values.py --params {args.params}`: "
        f"a bf16 pair of {n / 1e6:.1f} M parameters in 4 shards, N(0, 0.02) weights, the "
        "target moved by 1-3 bf16 steps at density d. Load average at start "
        f"{load[0]:.2f}: other jobs shared the 2 cores, so the speeds are noisy.", "",
        "| d | patch bits/param | mask | values | bits per value | 16d + H(d) | "
        "target 16d + 1.1H(d) | patch / target | apply GB/s | cp GB/s | apply / cp |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']:.4f} | {r['bits']:.4f} | {r['mask']:.4f} | {r['values']:.4f} | "
            f"{r['val_bits']:.2f} | {r['bound']:.4f} | {r['target']:.4f} | "
            f"{r['bits'] / r['target']:.3f} | {r['apply']:.2f} | {r['cp']:.2f} | "
            f"{r['apply'] / r['cp']:.2f} |")
    lo = min(r["apply"] / r["cp"] for r in rows)
    hi = max(r["apply"] / r["cp"] for r in rows)
    lines += ["", "Size: values are stored with blosc (byte shuffle, zstd-1), the exponent "
              "bytes apart from the mantissa bytes, so a bf16 value costs about 11 bits "
              "instead of 16 (more at the lowest densities, where the arrays are small). The "
              "mask is the store's packed bits at zstd-1: 1.02x its entropy at 20% but about "
              "1.8x at 1% and below, which is where a patch exceeds the 16d + 1.1·H(d) "
              "target; a gap-coded index (DESIGN.md: 1.01x at 2-5%) would meet it, at the "
              "cost of a second mask layout.", "",
              f"Speed: `apply` ran at {lo:.2f}-{hi:.2f}x the throughput of `cp -r` of the "
              "target (coreutils, which copies in the kernel with `copy_file_range`), short "
              "of the issue's 0.7x. `apply` copies each same-dtype tensor the same way and "
              "then scatters the values into the mapped output (compiled loop, one thread "
              "per core); its time also holds fixed costs (opening the patch and BASE, "
              "checking BASE, reading the values) that weigh on a 128 MB model. Measured "
              "under the load above: rerun on a quiet machine before reading more into it."]
    body = "\n".join(lines)
    print(body)
    write_section(Path(args.out), "bench_patch_values", body)


if __name__ == "__main__":
    main()
