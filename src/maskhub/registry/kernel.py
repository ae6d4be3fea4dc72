"""The diff kernel: which entries of a tensor pair differ by more than ``tol``.

Definition (DESIGN.md): an entry is *updated* iff ``|target - base| > tol``, the difference
taken exactly (inputs up-cast to float64, never subtracted in bf16). ``+0 == -0``; NaN vs NaN
is unchanged, NaN vs a number is updated; equal infinities are unchanged.

The kernel works through a tensor in fixed-size chunks so that its scratch memory does not
grow with the tensor, and returns the mask packed at one bit per entry
(``numpy.packbits(flat_mask, bitorder="little")``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from maskhub.schemas.metadata import BITORDER

#: Entries per chunk; a multiple of 8 so that chunks pack to whole bytes.
CHUNK = 1 << 22


@dataclass(frozen=True)
class TensorDiff:
    """Result of diffing one tensor pair."""

    packed: np.ndarray  # uint8, ceil(numel / 8) bytes, little bit order
    n_updated: int
    sweep_counts: tuple[int, ...]  # one count per sweep tolerance


def updated(a: torch.Tensor, b: torch.Tensor, tol: float) -> torch.Tensor:
    """Reference definition: boolean tensor of the entries of ``b`` updated from ``a``.

    Both inputs are up-cast to float64 before subtracting. Slow; used for checks and for
    small tensors.
    """
    a64 = a.to(torch.float64)
    b64 = b.to(torch.float64)
    return _updated64(a64, b64, tol)


def _updated64(a64: torch.Tensor, b64: torch.Tensor, tol: float) -> torch.Tensor:
    differs = a64 != b64
    differs &= ~(torch.isnan(a64) & torch.isnan(b64))
    # |a-b| <= tol is False for NaN, so NaN vs number stays updated.
    return differs & ~((b64 - a64).abs() <= tol)


def pack_bits(mask: torch.Tensor) -> np.ndarray:
    """Pack a boolean tensor (any device) into little-bit-order uint8 bytes on the host."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return np.packbits(flat.numpy(), bitorder=BITORDER)
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    packed = (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)
    return packed.cpu().numpy()


class DiffKernel:
    """Diffs tensor pairs at one tolerance, counting a sweep of other tolerances on the way."""

    def __init__(self, tol: float = 1e-5, sweep: Sequence[float] = (), device: str = "cpu"):
        """``device`` is ``"cpu"`` or a CUDA device string; inputs are moved there per chunk."""
        self.tol = float(tol)
        self.sweep = tuple(float(t) for t in sweep)
        self.device = torch.device(device)

    def run(self, a: torch.Tensor, b: torch.Tensor) -> TensorDiff:
        """Diff ``b`` (target) against ``a`` (base); both must have the same shape."""
        fa = a.reshape(-1)
        fb = b.reshape(-1)
        n = fa.numel()
        packed = np.empty((n + 7) // 8, dtype=np.uint8)
        n_updated = 0
        sweep_counts = [0] * len(self.sweep)
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            ca = fa[start:stop].to(self.device, torch.float64, non_blocking=True)
            cb = fb[start:stop].to(self.device, torch.float64, non_blocking=True)
            m = _updated64(ca, cb, self.tol)
            n_updated += int(m.sum())
            if self.sweep:
                absdiff = (cb - ca).abs()
                changed = (ca != cb) & ~(torch.isnan(ca) & torch.isnan(cb))
                for i, t in enumerate(self.sweep):
                    sweep_counts[i] += int((changed & ~(absdiff <= t)).sum())
            packed[start // 8 : (stop + 7) // 8] = pack_bits(m)
        return TensorDiff(packed, n_updated, tuple(sweep_counts))
