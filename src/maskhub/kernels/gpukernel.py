"""CUDA diff: compare and pack on the GPU, bring back only the packed bits.

Raw bytes are copied from the (memory-mapped) checkpoint into pinned host buffers, sent to
the GPU on a copy stream, diffed with the float64 reference formula (exact by construction;
the GPU is memory-bound long before float64 arithmetic matters), packed on the GPU, and only
the packed bits (1/16 of a bf16 pair) come back. Two slots alternate so that the host fills
one pinned buffer while the GPU copies and computes the other.
"""

from __future__ import annotations

import numpy as np
import torch

from maskhub.schemas.dtypes import itemsize

#: Entries per GPU transfer.
GPU_CHUNK = 1 << 23
_SLOTS = 2


def pack_on_device(flat: torch.Tensor) -> torch.Tensor:
    """Pack a flat boolean tensor into little-bit-order uint8 bytes, on its own device."""
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8,
                           device=flat.device)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)


class CudaDiffer:
    """Pipelined host-to-GPU diff of raw tensor bytes for one :class:`DiffKernel`."""

    def __init__(self, device: torch.device, tols: np.ndarray) -> None:
        """Streams and events on ``device``; buffers are allocated on first use."""
        self.device = device
        self.tols = [float(t) for t in tols]
        self.copy_stream = torch.cuda.Stream(device)
        self.compute_stream = torch.cuda.Stream(device)
        self._host: dict[tuple[str, int], torch.Tensor] = {}
        self._dev: dict[tuple[str, int], torch.Tensor] = {}

    @classmethod
    def for_kernel(cls, kernel) -> CudaDiffer:
        """The differ cached on ``kernel`` (created on first use)."""
        differ = getattr(kernel, "_cuda_differ", None)
        if differ is None:
            differ = cls(torch.device(kernel.device), kernel.tols)
            kernel._cuda_differ = differ
        return differ

    def _buf(self, pool: dict, key: tuple[str, int], nbytes: int, pinned: bool) -> torch.Tensor:
        buf = pool.get(key)
        if buf is None or buf.numel() < nbytes:
            if pinned:
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            pool[key] = buf
        return buf[:nbytes]

    def _compute(self, a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        changed = (a64 != b64) & ~(torch.isnan(a64) & torch.isnan(b64))
        absdiff = (b64 - a64).abs()
        mask = None
        for i, t in enumerate(self.tols):
            m = changed & ~(absdiff <= t)
            counts[i] += m.sum()
            if i == 0:
                mask = m
        return pack_on_device(mask)

    def diff(self, a_raw: np.ndarray, b_raw: np.ndarray, dtype_a: str, dtype_b: str,
             numel: int, out: np.ndarray) -> np.ndarray:
        """Diff one tensor pair given as raw host bytes; packed bits go to ``out``.

        Returns the counts at each tolerance (``int64``, ``[tol, *sweep]``).
        """
        with torch.cuda.device(self.device):  # events and allocations on the right GPU
            return self._diff(a_raw, b_raw, dtype_a, dtype_b, numel, out)

    def _diff(self, a_raw: np.ndarray, b_raw: np.ndarray, dtype_a: str, dtype_b: str,
              numel: int, out: np.ndarray) -> np.ndarray:
        ta, tb = getattr(torch, dtype_a), getattr(torch, dtype_b)
        sa, sb = itemsize(dtype_a), itemsize(dtype_b)
        counts = torch.zeros(len(self.tols), dtype=torch.int64, device=self.device)
        h2d_done = [torch.cuda.Event() for _ in range(_SLOTS)]
        comp_done = [torch.cuda.Event() for _ in range(_SLOTS)]
        pending: list[tuple[int, int, int] | None] = [None] * _SLOTS  # (slot, byte0, nbytes)
        used = [False] * _SLOTS

        def harvest(slot: int) -> None:
            job = pending[slot]
            if job is not None:
                comp_done[slot].synchronize()
                _, byte0, nbytes = job
                out[byte0:byte0 + nbytes] = self._host[("out", slot)][:nbytes].numpy()
                pending[slot] = None

        for i, start in enumerate(range(0, numel, GPU_CHUNK)):
            slot = i % _SLOTS
            stop = min(numel, start + GPU_CHUNK)
            n = stop - start
            if used[slot]:
                h2d_done[slot].synchronize()  # the pinned inputs of this slot are free again
            harvest(slot)
            ha = self._buf(self._host, ("a", slot), n * sa, pinned=True)
            hb = self._buf(self._host, ("b", slot), n * sb, pinned=True)
            ha.numpy()[:] = a_raw[start * sa:stop * sa]
            hb.numpy()[:] = b_raw[start * sb:stop * sb]
            da = self._buf(self._dev, ("a", slot), n * sa, pinned=False)
            db = self._buf(self._dev, ("b", slot), n * sb, pinned=False)
            with torch.cuda.stream(self.copy_stream):
                if used[slot]:
                    self.copy_stream.wait_event(comp_done[slot])  # device inputs are free
                da.copy_(ha, non_blocking=True)
                db.copy_(hb, non_blocking=True)
                h2d_done[slot].record(self.copy_stream)
            with torch.cuda.stream(self.compute_stream):
                self.compute_stream.wait_event(h2d_done[slot])
                packed = self._compute(da.view(ta), db.view(tb), counts)
                nbytes = packed.numel()
                ho = self._buf(self._host, ("out", slot), nbytes, pinned=True)
                ho.copy_(packed, non_blocking=True)
                comp_done[slot].record(self.compute_stream)
            used[slot] = True
            pending[slot] = (slot, start // 8, nbytes)
            harvest((slot + 1) % _SLOTS)  # the previous chunk, while the GPU works on this one
        for slot in range(_SLOTS):
            harvest(slot)
        self.compute_stream.synchronize()
        return counts.cpu().numpy()
