"""Benchmark: ``maskhub diff`` single-process vs ``maskhub diff --ray`` (Ray local mode).

One bf16 Llama-shaped pair (``bench/make_pair.py``, default 0.75 GB per side, density 0.2)
is diffed on this machine:

* end to end, as users run it: ``maskhub diff`` and ``maskhub diff --ray`` each in a fresh
  process (the latter starts a local Ray with all the CPUs, here 2, and stops it on exit);
* in one process, to separate the costs: ``ray.init(num_cpus=2)`` alone, then
  ``Registry.diff(..., ray="auto")`` on the running Ray (first call: workers start; then
  warm), against ``Registry.diff`` without Ray.

The page cache is warmed first (every timed run reads cached files). Both masks are checked
bit for bit. ``--write`` puts the figures into BENCHMARKS.md (section ``bench_ray``); the
generated checkpoints and registries are deleted at the end.

Usage::

    .venv/bin/python bench/bench_ray.py --size-gb 0.75 --write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from make_pair import make_pair  # noqa: E402
from report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MASKHUB = str(Path(sys.executable).parent / "maskhub")


def warm(paths: list[Path]) -> float:
    """Read every file once (page cache); return the bytes read."""
    total = 0
    for d in paths:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while chunk := fh.read(64 << 20):
                    total += len(chunk)
    return total


def cli(home: Path, *args: str) -> tuple[float, dict]:
    """Run ``maskhub ARGS --json`` in a fresh process; return (wall seconds, output)."""
    env = {**os.environ, "MASKHUB_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    out = subprocess.run([MASKHUB, *args, "--json"], env=env, check=True,
                         capture_output=True, text=True)
    return time.perf_counter() - t0, json.loads(out.stdout)


def main() -> None:
    """Run the benchmark and print (or write) the section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=0.75, help="bytes per side, in GB")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="maskhub-bench-ray-"))
    try:
        base, target = make_pair(work / "pair", int(args.size_gb * 1e9), args.density)
        nbytes = warm([base, target])
        warm([base, target])
        import torch
        from safetensors import safe_open

        n_tensors = 0
        for f in base.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                n_tensors += len(list(h.keys()))

        # 1. end to end, fresh processes
        e2e_local, e2e_ray = [], []
        for i in range(args.repeat):
            t, out_local = cli(work / "h-cli", "diff", str(base), str(target),
                               "--name", f"local-{i}")
            e2e_local.append(t)
            t, out_ray = cli(work / "h-cli", "diff", str(base), str(target),
                             "--name", f"ray-{i}", "--ray")
            e2e_ray.append(t)
            assert out_local["n_updated"] == out_ray["n_updated"]

        # 2. in one process: Ray start-up, first and warm Ray diffs, local diffs
        import ray

        import maskhub

        reg = maskhub.Registry(work / "h-api")
        reg.diff(base, target, name="warmup")  # imports, numba compile, page cache
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        t_init = time.perf_counter() - t0
        api_local, api_ray = [], []
        for i in range(args.repeat):
            t0 = time.perf_counter()
            reg.diff(base, target, name=f"ray-{i}", ray="auto")
            api_ray.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reg.diff(base, target, name=f"local-{i}")
            api_local.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ray.shutdown()
        t_shutdown = time.perf_counter() - t0
        a, b = reg.get("local-0"), reg.get("ray-0")
        identical = a.tensor_stats() == b.tensor_stats() and all(
            np.array_equal(a.packed(n), b.packed(n)) for n in a.tensor_names())
        assert identical, "Ray and local masks differ"
        n_params = a.n_params
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gb = nbytes / 1e9
    med = statistics.median
    load = os.getloadavg()
    lines = [
        "## Ray local mode: `bench/bench_ray.py` (issue 8)",
        "",
        f"Produced by one run of `.venv/bin/python bench/bench_ray.py --size-gb {args.size_gb}"
        " --write`; rerun it to refresh this section.",
        "",
        f"- Machine: {os.cpu_count()} CPU cores, no GPU; Python {platform.python_version()}, "
        f"torch {torch.__version__}, ray {ray.__version__}. Load average at the end: "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.",
        f"- Pair: bf16, Llama-shaped, {n_tensors} tensors, {n_params / 1e9:.2f} G parameters, "
        f"{gb:.2f} GB of input (both sides), planted density {args.density}; page cache warm "
        "for every timed run. Masks of both ways compared bit for bit: "
        f"{'identical' if identical else 'DIFFERENT'}.",
        f"- Median of {args.repeat} runs (all runs listed).",
        "",
        "| run | wall time (s) | input GB/s | vs single process |",
        "|---|---:|---:|---:|",
        f"| `maskhub diff`, fresh process | {med(e2e_local):.2f} | {gb / med(e2e_local):.2f} "
        "| 1.00x |",
        f"| `maskhub diff --ray`, fresh process (starts and stops a local Ray, 2 CPUs) | "
        f"{med(e2e_ray):.2f} | {gb / med(e2e_ray):.2f} | "
        f"{med(e2e_local) / med(e2e_ray):.2f}x |",
        f"| `Registry.diff`, in process | {med(api_local):.2f} | {gb / med(api_local):.2f} | "
        "1.00x |",
        f"| `Registry.diff(ray=...)` on a running Ray, first call (workers start) | "
        f"{api_ray[0]:.2f} | {gb / api_ray[0]:.2f} | {med(api_local) / api_ray[0]:.2f}x |",
        f"| `Registry.diff(ray=...)` on a running Ray, later calls (median) | "
        f"{med(api_ray[1:] or api_ray):.2f} | {gb / med(api_ray[1:] or api_ray):.2f} | "
        f"{med(api_local) / med(api_ray[1:] or api_ray):.2f}x |",
        f"| `ray.init(num_cpus=2)` alone | {t_init:.2f} | | |",
        f"| `ray.shutdown()` alone | {t_shutdown:.2f} | | |",
        "",
        "All runs (s): `maskhub diff` " + ", ".join(f"{x:.2f}" for x in e2e_local)
        + "; `maskhub diff --ray` " + ", ".join(f"{x:.2f}" for x in e2e_ray)
        + "; `Registry.diff` " + ", ".join(f"{x:.2f}" for x in api_local)
        + "; `Registry.diff(ray=...)` " + ", ".join(f"{x:.2f}" for x in api_ray) + ".",
        "",
        "Reading the figures: on one 2-core machine Ray cannot beat the single process beyond "
        "noise. "
        "The local pipeline already keeps both cores busy (read, compute and write threads, "
        "docs/performance.md), so Ray's tasks only share the same two cores. With Ray "
        "already running and its workers warm, a diff takes about as long as in process "
        "(the last `Registry.diff(ray=...)` row: the tasks' own overheads, reopening and "
        "mapping the shards, scheduling, are small at this size). Everything else is Ray's "
        "fixed cost: starting Ray (the `ray.init` row), starting worker processes that "
        "import torch and maskhub (the first-call row), stopping Ray; so a fresh "
        "`maskhub diff --ray` on one machine is several times slower end to end. `--ray` "
        "pays off when the tasks land on more cores, GPUs or nodes than one process can "
        "use; docs/scale-out.md estimates the speed-up there.",
    ]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", "bench_ray", body)


if __name__ == "__main__":
    main()
