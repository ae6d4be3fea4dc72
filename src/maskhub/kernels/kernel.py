"""The diff kernel: which entries of a tensor pair differ by more than ``tol``.

Definition (DESIGN.md): an entry is *updated* iff ``|target - base| > tol``, the difference
taken exactly (inputs up-cast to float64, never subtracted in bf16). ``+0 == -0``; NaN vs NaN
is unchanged, NaN vs a number is updated; equal infinities are unchanged.

:func:`updated` is the reference (float64, slow). :class:`DiffKernel` gives the same bits
fast: for bf16/fp16/fp32 it compares bit patterns first and subtracts (in float64) only the
few entries whose magnitude is so small that one step of the format could be ``<= tol``
(:mod:`maskhub.kernels.floatbits`, :mod:`maskhub.kernels.fastkernel`); other dtypes and
exotic mixes go through the reference. On CUDA it compares and packs on the GPU
(:mod:`maskhub.kernels.gpukernel`).

Masks are packed at one bit per entry (``numpy.packbits(flat_mask, bitorder="little")``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from maskhub.errors import UsageError
from maskhub.kernels import fastkernel
from maskhub.kernels.device import is_cuda
from maskhub.kernels.floatbits import BF16, FORMATS, FP32, FloatFormat, value_table
from maskhub.schemas.dtypes import NUMPY_DTYPES, itemsize
from maskhub.schemas.metadata import BITORDER

if TYPE_CHECKING:
    import torch

#: Entries per chunk; a multiple of 8 so that chunks pack to whole bytes.
CHUNK = 1 << 20

#: ``fn(a_raw, b_raw, out, counts)``: diff one chunk given as raw bytes (uint8 arrays of
#: ``n * itemsize`` bytes each); writes ``ceil(n/8)`` packed bytes into ``out`` and adds the
#: number of updated entries at each tolerance of :attr:`DiffKernel.tols` to ``counts``.
ChunkFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]

BACKENDS = ("auto", "numba", "numpy", "reference")
#: Input bytes (both sides) from which a diff uses the numba kernels: importing numba and
#: loading its cached kernels costs ~0.3 s, which the numba kernel (5.0 GB/s per core here,
#: against 1.7 GB/s for numpy) wins back only on about this much input.
NUMBA_MIN_BYTES = 1 << 30


def backend_for(input_bytes: int) -> str:
    """The CPU backend for a diff of ``input_bytes``: numba for large inputs (when installed),
    numpy below :data:`NUMBA_MIN_BYTES` (same bits, no numba import)."""
    if fastkernel.HAVE_NUMBA and input_bytes >= NUMBA_MIN_BYTES:
        return "numba"
    return "numpy"


def check_tolerance(tol: object) -> None:
    """Raise :class:`UsageError` unless ``tol`` is a finite number >= 0."""
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise UsageError(f"tolerance must be a finite number >= 0, not {tol!r}")


@dataclass(frozen=True)
class TensorDiff:
    """Result of diffing one tensor pair."""

    packed: np.ndarray  # uint8, ceil(numel / 8) bytes, little bit order
    n_updated: int
    sweep_counts: tuple[int, ...]  # one count per sweep tolerance


def updated(a: torch.Tensor, b: torch.Tensor, tol: float) -> torch.Tensor:
    """Reference definition: boolean tensor of the entries of ``b`` updated from ``a``.

    Both inputs are up-cast to float64 before subtracting. Slow; used for checks.
    """
    import torch

    a64 = a.to(torch.float64)
    b64 = b.to(torch.float64)
    return _updated64(a64, b64, tol)


def _updated64(a64: torch.Tensor, b64: torch.Tensor, tol: float) -> torch.Tensor:
    import torch

    differs = a64 != b64
    differs &= ~(torch.isnan(a64) & torch.isnan(b64))
    # |a-b| <= tol is False for NaN, so NaN vs number stays updated.
    return differs & ~((b64 - a64).abs() <= tol)


def pack_bits(mask: torch.Tensor) -> np.ndarray:
    """Pack a boolean tensor (any device) into little-bit-order uint8 bytes on the host."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return np.packbits(flat.numpy(), bitorder=BITORDER)
    from maskhub.kernels.gpukernel import pack_on_device

    return pack_on_device(flat).cpu().numpy()


def as_float64(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The values of raw bytes of dtype ``dtype``, exactly, as float64 (bf16 through its bit
    pattern, float8 through torch: the only dtypes numpy cannot hold)."""
    if dtype == "bfloat16":
        return (raw.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32) \
            .astype(np.float64)
    if dtype in NUMPY_DTYPES:
        view = raw.view(np.uint8) if dtype == "bool" else raw.view(np.dtype(dtype))
        return view.astype(np.float64)
    import torch  # float8: no numpy dtype

    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return torch.from_numpy(np.array(raw, copy=True)).view(dt).to(torch.float64).numpy()


_tls = threading.local()


def _scratch(n: int) -> np.ndarray:
    """Per-thread scratch of the numba kernels for ``n`` entries: the packed candidates
    (reused: fresh allocations cost page faults)."""
    size = getattr(_tls, "size", 0)
    if size < n:
        size = max(n, CHUNK)
        _tls.size = size
        _tls.pc = np.empty((size + 63) // 64 * 8, dtype=np.uint8)
    return _tls.pc[:(n + 63) // 64 * 8]


def _readonly(a: np.ndarray) -> np.ndarray:
    # numba compiles one specialisation per (writeable, aligned) flavour: keep inputs uniform.
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _to_fp32_bits(raw: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Exact up-cast of bf16/fp16/fp32 raw bytes to fp32 bit patterns (uint32)."""
    if fmt is FP32:
        return raw.view(np.uint32)
    if fmt is BF16:
        return raw.view(np.uint16).astype(np.uint32) << np.uint32(16)
    with np.errstate(invalid="ignore"):  # NaN stays NaN; its payload does not matter
        return raw.view(np.float16).astype(np.float32).view(np.uint32)


class DiffKernel:
    """Diffs tensor pairs at one tolerance, counting a sweep of other tolerances on the way."""

    def __init__(self, tol: float = 1e-5, sweep: Sequence[float] = (), device: str = "cpu",
                 backend: str = "auto"):
        """``device``: ``"cpu"`` or a CUDA device string. ``backend`` (CPU only): ``auto``
        (numba when installed, else numpy), ``numba``, ``numpy`` or ``reference``."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if backend == "numba" and not fastkernel.HAVE_NUMBA:
            raise ValueError("the numba backend needs numba installed")
        self.tol = float(tol)
        self.sweep = tuple(float(t) for t in sweep)
        #: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        self.device = str(device)
        self.backend = ("numba" if fastkernel.HAVE_NUMBA else "numpy") if backend == "auto" \
            else backend
        #: ``[tol, *sweep]``: ``counts[0]`` is the mask's count, ``counts[1:]`` the sweep's.
        self.tols = np.array((self.tol, *self.sweep), dtype=np.float64)
        self._luts: dict[str, np.ndarray] = {}

    @property
    def on_cuda(self) -> bool:
        """Whether this kernel diffs on a CUDA device."""
        return is_cuda(self.device)

    @property
    def tol_max(self) -> float:
        """Largest tolerance of the pass (decides which entries need the exact check)."""
        return float(self.tols.max())

    def _lut(self, fmt: FloatFormat) -> np.ndarray:
        if fmt.name not in self._luts:
            self._luts[fmt.name] = value_table(fmt)
        return self._luts[fmt.name]

    def chunk_fn(self, dtype_a: str, dtype_b: str) -> ChunkFn:
        """The CPU function that diffs chunks of a ``dtype_a`` base and ``dtype_b`` target."""
        fa, fb = FORMATS.get(dtype_a), FORMATS.get(dtype_b)
        if self.backend == "reference" or fa is None or fb is None:
            return self._reference_fn(dtype_a, dtype_b)
        if fa is fb and fa.width == 16:
            return self._fn16(fa)
        return self._fn32(fa, fb)

    def _fn16(self, fmt: FloatFormat) -> ChunkFn:
        lo, inf, tols = fmt.decisive_bits(self.tol_max), fmt.inf_bits, self.tols
        if self.backend == "numba":
            kind = 0 if fmt is BF16 else 1
            nk = fastkernel.numba_kernels()
            m, lo16, inf16 = np.uint16(fmt.mag_mask), np.uint16(lo), np.uint16(inf)

            def fn(a_raw, b_raw, out, counts):
                a = _readonly(a_raw.view(np.uint16))
                nk.numba_chunk(a, _readonly(b_raw.view(np.uint16)), kind, m, lo16, inf16, tols,
                               out, counts, _scratch(a.shape[0]))
        else:
            lut = self._lut(fmt)

            def fn(a_raw, b_raw, out, counts):
                fastkernel.numpy_chunk(a_raw.view(np.uint16), b_raw.view(np.uint16), lut, lut,
                                       fmt.mag_mask, lo, inf, tols, out, counts)
        return fn

    def _fn32(self, fmt_a: FloatFormat, fmt_b: FloatFormat) -> ChunkFn:
        lo, inf, tols = FP32.decisive_bits(self.tol_max), FP32.inf_bits, self.tols
        nk = fastkernel.numba_kernels() if self.backend == "numba" else None
        m, lo32, inf32 = np.uint32(FP32.mag_mask), np.uint32(lo), np.uint32(inf)

        def fn(a_raw, b_raw, out, counts):
            a = _readonly(_to_fp32_bits(a_raw, fmt_a))
            b = _readonly(_to_fp32_bits(b_raw, fmt_b))
            if nk is not None:
                nk.numba_chunk(a, b, 2, m, lo32, inf32, tols, out, counts, _scratch(a.shape[0]))
            else:
                fastkernel.numpy_chunk(a, b, None, None, FP32.mag_mask, lo, inf, tols, out,
                                       counts)
        return fn

    def _reference_fn(self, dtype_a: str, dtype_b: str) -> ChunkFn:
        tols = self.tols

        def fn(a_raw, b_raw, out, counts):
            a, b = as_float64(a_raw, dtype_a), as_float64(b_raw, dtype_b)
            with np.errstate(invalid="ignore"):  # inf - inf is NaN, as in the reference
                out[:] = np.packbits(fastkernel.updated_exact(a, b, tols, counts),
                                     bitorder=BITORDER)
        return fn

    def run(self, a: torch.Tensor, b: torch.Tensor) -> TensorDiff:
        """Diff ``b`` (target) against ``a`` (base); both must have the same shape."""
        if a.shape != b.shape:
            raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
        a_raw = _raw_bytes(a)
        b_raw = _raw_bytes(b)
        da, db = str(a.dtype).removeprefix("torch."), str(b.dtype).removeprefix("torch.")
        return self.run_raw(a_raw, b_raw, da, db, a.numel())

    def run_raw(self, a_raw: np.ndarray, b_raw: np.ndarray, dtype_a: str, dtype_b: str,
                numel: int) -> TensorDiff:
        """Diff one tensor pair given as raw bytes (chunk by chunk, in this thread)."""
        if self.on_cuda:
            from maskhub.kernels.gpukernel import CudaDiffer

            packed = np.empty((numel + 7) // 8, dtype=np.uint8)
            counts = CudaDiffer.for_kernel(self).diff(a_raw, b_raw, dtype_a, dtype_b, numel,
                                                      packed)
            return _result(packed, counts)
        fn = self.chunk_fn(dtype_a, dtype_b)
        sa, sb = itemsize(dtype_a), itemsize(dtype_b)
        packed = np.empty((numel + 7) // 8, dtype=np.uint8)
        counts = np.zeros(self.tols.shape[0], dtype=np.int64)
        for start in range(0, numel, CHUNK):
            stop = min(numel, start + CHUNK)
            fn(a_raw[start * sa:stop * sa], b_raw[start * sb:stop * sb],
               packed[start // 8:(stop + 7) // 8], counts)
        return _result(packed, counts)


def _result(packed: np.ndarray, counts: np.ndarray) -> TensorDiff:
    return TensorDiff(packed, int(counts[0]), tuple(int(c) for c in counts[1:]))


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    import torch

    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
