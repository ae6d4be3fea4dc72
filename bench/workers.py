"""The measured workloads, each run in its own process by ``bench_diff.py``.

``python bench/workers.py naive BASE TARGET OUT TOL`` or
``python bench/workers.py maskhub BASE TARGET HOME TOL WARMUP_CKPT``; prints one JSON line:
wall seconds of the work (imports and maskhub's one-time JIT cache load excluded, for both),
and the process's peak resident memory (``VmHWM``: ``ru_maxrss`` would carry the parent's
peak across fork+exec) and its resident memory before the work.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _shards(directory: Path) -> list[Path]:
    index_path = directory / "model.safetensors.index.json"
    if not index_path.exists():  # one file (bench_peers' pairs)
        return sorted(directory.glob("*.safetensors"))
    index = json.loads(index_path.read_text())
    return [directory / f for f in dict.fromkeys(index["weight_map"].values())]


def naive(base: Path, target: Path, out: Path, tol: float) -> dict:
    """The usual script: load both state dicts whole, subtract in fp32, torch.save masks."""
    import torch
    from safetensors.torch import load_file

    before = _status_kb("VmRSS")
    t0, c0 = time.perf_counter(), _cpu_s()
    a: dict = {}
    b: dict = {}
    for f in _shards(base):
        a.update(load_file(str(f)))
    for f in _shards(target):
        b.update(load_file(str(f)))
    masks = {k: ((a[k].float() - b[k].float()).abs() > tol) for k in a}
    torch.save(masks, str(out))
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    n_updated = sum(int(m.sum()) for m in masks.values())
    return {"wall_s": wall, "cpu_s": cpu, "peak_kb": _status_kb("VmHWM"), "before_kb": before,
            "n_updated": n_updated, "stored_bytes": out.stat().st_size}


def maskhub(base: Path, target: Path, home: Path, tol: float, warmup: Path,
            device: str = "cpu") -> dict:
    """``Registry.diff``, the library call behind ``maskhub diff``, on ``device``."""
    import maskhub.diff.run as diff_run
    import maskhub.registry.api as api

    pipeline = []

    def timed_run_diff(*args, **kwargs):  # the pipeline alone, without registry bookkeeping
        t = time.perf_counter()
        try:
            return run_diff(*args, **kwargs)
        finally:
            pipeline.append(time.perf_counter() - t)

    run_diff = diff_run.run_diff
    diff_run.run_diff = timed_run_diff
    reg = api.Registry(home)
    reg.diff(warmup, warmup, name=f"warmup-{time.time_ns()}", tol=tol, device=device)
    import numpy as np

    from maskhub.kernels.kernel import DiffKernel

    tiny = np.zeros(64, np.uint8)  # load the numba kernels too (a tiny diff uses numpy)
    DiffKernel(tol=tol, backend="numba").run_raw(tiny, tiny, "bfloat16", "bfloat16", 32)
    before = _status_kb("VmRSS")
    t0, c0 = time.perf_counter(), _cpu_s()
    mask = reg.diff(base, target, name=f"bench-{time.time_ns()}", tol=tol, device=device)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    stats = [(t.numel, t.n_updated) for t in mask.tensor_stats()]
    stored = sum(p.stat().st_size for p in mask.path.rglob("*") if p.is_file())
    return {"wall_s": wall, "cpu_s": cpu, "pipeline_s": pipeline[-1],
            "peak_kb": _status_kb("VmHWM"), "before_kb": before,
            "n_updated": mask.n_updated, "n_params": mask.n_params, "stored_bytes": stored,
            "tensors": stats, "mask_path": str(mask.path)}


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "naive":
        result = naive(Path(args[0]), Path(args[1]), Path(args[2]), float(args[3]))
    else:
        result = maskhub(Path(args[0]), Path(args[1]), Path(args[2]), float(args[3]),
                         Path(args[4]), *args[5:6])
    print(json.dumps(result))
