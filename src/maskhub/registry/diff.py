"""Diff two checkpoints tensor by tensor into a mask store.

One tensor pair is in memory at a time; the kernel works on it in fixed-size chunks, so peak
memory is bounded by the largest tensor pair whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from maskhub.errors import CheckpointMismatchError, UsageError
from maskhub.registry.kernel import DiffKernel
from maskhub.registry.sources import Checkpoint
from maskhub.registry.store import MaskWriter
from maskhub.schemas.metadata import TensorStats
from maskhub.schemas.names import parse_tensor_name

#: ``progress(tensors_done, tensors_total, bytes_done, bytes_total, tensor_name)``
ProgressFn = Callable[[int, int, int, int, str], None]


@dataclass
class DiffOutcome:
    """What a diff found, before it is registered."""

    tensors: list[TensorStats] = field(default_factory=list)
    sweep: list[tuple[str, float, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        """Parameters compared."""
        return sum(t.numel for t in self.tensors)

    @property
    def n_updated(self) -> int:
        """Parameters updated."""
        return sum(t.n_updated for t in self.tensors)

    def dtype_summary(self) -> str:
        """``"bfloat16"`` when both sides share one dtype, else ``"base->target"`` or lists."""
        base = sorted({t.base_dtype for t in self.tensors})
        target = sorted({t.target_dtype for t in self.tensors})
        b, t = ",".join(base), ",".join(target)
        return b if b == t else f"{b}->{t}"


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; validates explicit choices."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA GPU is available")
        return device
    raise UsageError(f"unknown device {device!r}: use auto, cpu or cuda[:N]")


def match_tensors(base: Checkpoint, target: Checkpoint, allow_missing: bool,
                  warn: Callable[[str], None] | None = None) -> tuple[list[str], list[str]]:
    """Names to diff (base order) and names skipped; errors on any mismatch."""
    only_base = [n for n in base.tensors if n not in target.tensors]
    only_target = [n for n in target.tensors if n not in base.tensors]
    if (only_base or only_target) and not allow_missing:
        name, side = (only_base[0], "base") if only_base else (only_target[0], "target")
        more = len(only_base) + len(only_target) - 1
        extra = f" (and {more} more)" if more else ""
        raise CheckpointMismatchError(
            f"tensor {name!r} exists only in the {side} checkpoint{extra}; "
            "use --allow-missing to skip such tensors", name)
    skipped = only_base + only_target
    if skipped and warn:
        warn(f"skipping {len(skipped)} tensor(s) present on one side only: "
             + ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    names = [n for n in base.tensors if n in target.tensors]
    for n in names:
        a, b = base.tensors[n], target.tensors[n]
        if a.shape != b.shape:
            raise CheckpointMismatchError(
                f"tensor {n!r} has shape {list(a.shape)} in the base and {list(b.shape)} in the "
                "target", n)
    if not names:
        raise CheckpointMismatchError("the two checkpoints have no tensor in common")
    return names, skipped


def run_diff(base: Checkpoint, target: Checkpoint, names: Sequence[str], kernel: DiffKernel,
             writer: MaskWriter, progress: ProgressFn | None = None) -> DiffOutcome:
    """Diff every named tensor pair with ``kernel`` and write its bits with ``writer``."""
    outcome = DiffOutcome()
    total_bytes = sum(base.tensors[n].nbytes + target.tensors[n].nbytes for n in names)
    done_bytes = 0
    for i, name in enumerate(names):
        a_info, b_info = base.tensors[name], target.tensors[name]
        a, b = base.get(name), target.get(name)
        result = kernel.run(a, b)
        del a, b
        layer, module = parse_tensor_name(name)
        stats = TensorStats(name, a_info.shape, a_info.numel, result.n_updated, layer, module,
                            a_info.dtype, b_info.dtype)
        writer.add(stats, result.packed)
        outcome.tensors.append(stats)
        outcome.sweep.extend((name, t, n) for t, n in zip(kernel.sweep, result.sweep_counts,
                                                          strict=True))
        done_bytes += a_info.nbytes + b_info.nbytes
        if progress:
            progress(i + 1, len(names), done_bytes, total_bytes, name)
    return outcome
