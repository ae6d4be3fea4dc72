"""The ``--device`` option the training benchmarks share, and honest timing on CUDA."""

from __future__ import annotations

import argparse
import gc
import sys

import torch


def add_device_arg(ap: argparse.ArgumentParser) -> None:
    """``--device`` (default ``cpu``): ``cpu``, ``cuda`` or ``cuda:N``."""
    ap.add_argument("--device", default="cpu",
                    help="where the model, batches, mask and optimizer state live: cpu, cuda "
                    "or cuda:N (default: cpu)")


def resolve_device(spec: str, prog: str) -> torch.device:
    """The ``torch.device`` that ``--device spec`` names; exits with one line when it is not
    ``cpu``/``cuda``/``cuda:N`` or when that CUDA device is not there."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        sys.exit(f"{prog}: --device {spec}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"{prog}: --device {spec}: CUDA is not available in this torch "
                     f"({torch.__version__}) on this machine")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            sys.exit(f"{prog}: --device {spec}: no such device ({torch.cuda.device_count()} "
                     "CUDA device(s))")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    return device


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on CUDA, else ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU), before reading a timer."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> int:
    """Free what is unreachable and reset the CUDA peak-memory counter; returns the bytes
    still allocated (the baseline the next peak includes). 0 on the CPU."""
    if device.type != "cuda":
        return 0
    gc.collect()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak(device: torch.device) -> int:
    """``torch.cuda.max_memory_allocated`` since the last :func:`reset_peak` (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    sync(device)
    return torch.cuda.max_memory_allocated(device)
