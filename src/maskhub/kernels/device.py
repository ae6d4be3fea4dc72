"""Which device a diff runs on, decided without importing torch on a machine with no GPU.

``import torch`` costs seconds of every command's start-up; a CPU diff never needs it. torch
is imported only when a GPU may be present (an NVIDIA or AMD driver is loaded, or a CUDA
device is named explicitly), and then it is torch that decides.
"""

from __future__ import annotations

import glob
import importlib.util
import os

from maskhub.errors import UsageError

#: Files whose presence says a GPU driver is loaded (NVIDIA's, or ROCm's kernel driver).
_DRIVER_HINTS = ("/proc/driver/nvidia/version", "/dev/kfd")


def gpu_may_exist() -> bool:
    """False when this process certainly sees no CUDA/ROCm GPU: torch is not installed,
    ``CUDA_VISIBLE_DEVICES`` hides every device, or no GPU driver is loaded."""
    if importlib.util.find_spec("torch") is None:
        return False
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(os.path.exists(p) for p in _DRIVER_HINTS) or bool(glob.glob("/dev/nvidia[0-9]*"))


def cuda_available() -> bool:
    """``torch.cuda.is_available()``, asked only when :func:`gpu_may_exist`."""
    if not gpu_may_exist():
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; validates explicit choices."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cpu":
        return device
    index = device[5:] if device.startswith("cuda:") else None
    if device != "cuda" and not (index and index.isdigit() and str(int(index)) == index):
        raise UsageError(f"invalid device {device!r}: use auto, cpu, cuda or cuda:N "
                         "(N a GPU number such as 0)")
    if importlib.util.find_spec("torch") is None:
        raise UsageError(f"--device {device} needs PyTorch with CUDA (pip install torch)")
    import torch  # a GPU was named: torch decides, whatever the driver files say

    if not torch.cuda.is_available():
        raise UsageError(f"--device {device} was asked for but no CUDA GPU is available")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise UsageError(f"--device {device}: there is no such GPU (this machine has "
                         f"{count}, cuda:0 to cuda:{count - 1})")
    return device


def resolve_stream_device(device: str) -> str:
    """The device of a streaming pass over checkpoint files (diff, trajectory, compare,
    verify): ``auto`` → ``cpu``; an explicit ``cpu``/``cuda[:N]`` is checked as by
    :func:`resolve_device`, and honoured.

    Such a pass is bound by reading host memory, not by arithmetic: every byte goes from the
    page cache through the CPU whatever the device, and the GPU path adds a copy into pinned
    buffers and the PCIe round trip. Measured on an H200 node with 16 cores (BENCHMARKS.md,
    "Diff on a GPU"): a 4 GB pair took 0.75-1.73 s on the CPU against 3.80-4.74 s on the GPU
    in process, and 2.61 s against 9.85 s as whole processes (CUDA start-up included). So
    ``auto`` keeps the CPU, and does not pay torch's import for the question; compute-bound
    work (``--rank``'s SVDs) still takes the GPU under ``auto`` (:func:`resolve_device`).
    """
    return "cpu" if device == "auto" else resolve_device(device)


def is_cuda(device: str) -> bool:
    """Whether a resolved device string names a CUDA device."""
    return device == "cuda" or device.startswith("cuda:")
