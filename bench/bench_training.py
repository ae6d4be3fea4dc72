"""Benchmark: the cost of masked training on a >=100M-parameter model's training step.

A TinyLlama at GPT-2-small scale (vocab 32000, hidden 768, 12 layers, MLP 2048: 1.34e8
parameters, fp32) trains with AdamW (weight decay 0.1) on one batch per step. In the same
process, rounds alternate three modes so that machine noise hits them alike:

* ``plain``: no mask;
* ``grad-mask``: ``apply_mask(..., exact=False)``: gradient masking only;
* ``exact``: ``apply_mask(...)`` (default): gradient masking + restoring the frozen entries
  from the θ0 snapshot after each optimizer step.

The mask is random at ``--density`` per tensor (norms never updated, as in the paper). Reported:
median step time per mode and its overhead over ``plain``; the seconds spent inside the
grad hooks and the restores (timed directly, less noisy than step differences); mask and
snapshot memory against parameter and AdamW-state memory.

``--device cuda`` (or ``cuda:N``) puts the model, the batches, the AdamW state and what
``apply_mask`` builds (packed mask bits, θ0 snapshot: on each parameter's device) on that GPU;
the random mask is drawn on the host, as a mask is read. On CUDA every timer, the hook timers
included, is read after ``torch.cuda.synchronize()``: the hook seconds are device time, and
the two synchronizations per hook call (serializing the backward) are part of the masked
modes' step times. The peak of ``torch.cuda.max_memory_allocated()`` is reported per mode
(reset before each mode's steps in every round) beside the tensor-counted memory.

Usage::

    .venv/bin/python bench/bench_training.py                    # 1.34e8 params, batch 8x128
    .venv/bin/python bench/bench_training.py --threads 1 --rounds 4 --json
    .venv/bin/python bench/bench_training.py --device cuda --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from maskhub.demo.tinymodel import TinyLlama, synthetic_batches
from maskhub.torch import DictMask, apply_mask
from maskhub.training import masking as training

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_size import add_model_args, model_config  # noqa: E402
from torch_device import (  # noqa: E402
    add_device_arg,
    device_name,
    peak,
    reset_peak,
    resolve_device,
)
from torch_device import sync as device_sync  # noqa: E402

MODES = ("plain", "grad-mask", "exact")


def random_mask(model: torch.nn.Module, density: float, seed: int = 0) -> DictMask:
    """A random mask of ``density`` per tensor (norms all frozen), held packed."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in model.named_parameters():
        masks[name] = (torch.zeros(p.shape, dtype=torch.bool) if "norm" in name
                       else torch.rand(p.shape, generator=g) < density)
    return DictMask(masks, name=f"random-{density}")


class Timers:
    """Accumulates the seconds spent in MaskedParameter.mask_grad and .restore."""

    def __init__(self, device: torch.device) -> None:
        self.seconds = {"mask_grad": 0.0, "restore": 0.0}
        self.device = device  # CUDA: synchronize before each reading (device time)

    def wrap(self, name: str) -> None:
        original: Callable[..., Any] = getattr(training.MaskedParameter, name)

        def timed(obj: Any, *args: Any) -> Any:
            device_sync(self.device)
            t = time.perf_counter()
            try:
                return original(obj, *args)
            finally:
                device_sync(self.device)
                self.seconds[name] += time.perf_counter() - t

        setattr(training.MaskedParameter, name, timed)


def main() -> None:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, batch=8, seq=128)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per mode per round")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); "
                    "1 gives stable figures on a machine shared with other jobs")
    ap.add_argument("--json", action="store_true")
    add_device_arg(ap)
    a = ap.parse_args()
    device = resolve_device(a.device, "bench_training")
    if a.threads:
        torch.set_num_threads(a.threads)

    cfg = model_config(a, max_len=a.seq + 1)
    torch.manual_seed(0)
    model = TinyLlama(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    mask = random_mask(model, a.density)
    data = [b.to(device) for b in synthetic_batches(cfg, 4, batch=a.batch, seq=a.seq + 1,
                                                    seed=1)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    timers = Timers(device)
    timers.wrap("mask_grad")
    timers.wrap("restore")

    def step(i: int) -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.loss(data[i % len(data)]).backward()
        opt.step()
        device_sync(device)
        return time.perf_counter() - t

    step(0)  # warm-up: allocates grads and AdamW state
    times: dict[str, list[float]] = {m: [] for m in MODES}
    hook_seconds = {m: 0.0 for m in MODES}
    memory: dict[str, int] = {}
    apply_seconds: dict[str, float] = {}
    cuda_peak = {m: 0 for m in MODES}  # CUDA: max over rounds of max_memory_allocated
    for r in range(a.rounds):
        for mode in MODES:
            handle = None
            if mode != "plain":
                device_sync(device)
                t = time.perf_counter()
                handle = apply_mask(model, mask, exact=(mode == "exact"))
                device_sync(device)
                apply_seconds[mode] = time.perf_counter() - t
                if mode == "exact":
                    memory = handle.memory()
            reset_peak(device)
            before = sum(timers.seconds.values())
            for i in range(a.steps):
                times[mode].append(step(r * a.steps + i))
            hook_seconds[mode] += sum(timers.seconds.values()) - before
            cuda_peak[mode] = max(cuda_peak[mode], peak(device))
            if handle is not None:
                handle.remove()

    med = {m: statistics.median(v) for m, v in times.items()}
    steps_per_mode = a.rounds * a.steps
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    report = {
        "n_params": n_params, "batch": [a.batch, a.seq], "density": a.density,
        "device": str(device), "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "step_median_s": med,
        "overhead_vs_plain": {m: med[m] / med["plain"] - 1 for m in MODES[1:]},
        "in_hooks_s_per_step": {m: hook_seconds[m] / steps_per_mode for m in MODES[1:]},
        "in_hooks_fraction_of_plain_step": {m: hook_seconds[m] / steps_per_mode / med["plain"]
                                            for m in MODES[1:]},
        "grad_mask_s_per_step": timers.seconds["mask_grad"] / (2 * steps_per_mode),
        "restore_s_per_step": timers.seconds["restore"] / steps_per_mode,
        "apply_s": apply_seconds,
        "memory_bytes": {"params": param_bytes, "adamw_state": 2 * param_bytes, **memory},
    }
    if device.type == "cuda":
        report["hook_timers"] = "synchronized (device time; 2 syncs per hook call in the step)"
        report["cuda_max_memory_allocated_bytes"] = cuda_peak
    if a.json:
        print(json.dumps(report, indent=2))
        return
    print(f"TinyLlama {n_params / 1e6:.1f}M params fp32, batch {a.batch}x{a.seq}, mask density "
          f"{a.density}, {report['threads']} threads, {steps_per_mode} steps per mode, "
          f"device {device} ({report['device_name']})")
    for m in MODES:
        extra = "" if m == "plain" else (
            f"  (+{report['overhead_vs_plain'][m]:.1%} step; in hooks "
            f"{report['in_hooks_s_per_step'][m]:.3f} s = "
            f"{report['in_hooks_fraction_of_plain_step'][m]:.1%} of a plain step)")
        print(f"  {m:10s} median step {med[m]:.3f} s{extra}")
    print(f"  gradient masking {report['grad_mask_s_per_step']:.3f} s/step, restore "
          f"{report['restore_s_per_step']:.3f} s/step; apply_mask {apply_seconds}")
    mb = report["memory_bytes"]
    print(f"  memory: params {mb['params'] / 2**20:.0f} MiB, AdamW state "
          f"{mb['adamw_state'] / 2**20:.0f} MiB, mask {mb['mask'] / 2**20:.1f} MiB, "
          f"snapshot {mb['snapshot'] / 2**20:.0f} MiB")
    if device.type == "cuda":
        print("  CUDA max_memory_allocated: " + ", ".join(
            f"{m} {cuda_peak[m] / 2**20:.0f} MiB" for m in MODES))


if __name__ == "__main__":
    main()
