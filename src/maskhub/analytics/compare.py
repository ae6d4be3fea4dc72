"""``compare``: how much two fine-tuned models of the same base agree, entry by entry.

Conjecture 1 of the paper: training only the subnetwork (θ_sub) reproduces full fine-tuning
(θ_full); "94% of entries equal at 1e-5 for DPO, 100% at 1e-4". ``compare A B`` counts the
entries with ``|A − B| <= tol`` (the diff kernel's own definition, negated: NaN vs NaN is
equal, NaN vs a number is not), overall and, with ``--mask``, inside and outside a mask, at
one or more tolerances, without registering anything. Tensors are read one at a time through
the memory-mapped files, as a diff reads them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maskhub.checkpoints.mapped import MappedCheckpoint
from maskhub.checkpoints.pairing import match_tensors
from maskhub.checkpoints.sources import open_checkpoint
from maskhub.core.masklike import MaskLike, listing
from maskhub.errors import MaskMismatchError, UsageError
from maskhub.kernels.bitcount import count_entries
from maskhub.kernels.kernel import DiffKernel, backend_for, check_tolerance
from maskhub.schemas.progress import ProgressFn


@dataclass
class Agreement:
    """Counts at one tolerance: entries compared and entries equal (``|a − b| <= tol``),
    overall and inside / outside the mask (``None`` without a mask)."""

    tol: float
    n_params: int = 0
    n_equal: int = 0
    n_inside: int | None = None
    n_equal_inside: int | None = None

    @property
    def frac_equal(self) -> float | None:
        """Share of all entries that are equal."""
        return self.n_equal / self.n_params if self.n_params else None

    @property
    def n_outside(self) -> int | None:
        """Entries outside the mask."""
        return None if self.n_inside is None else self.n_params - self.n_inside

    @property
    def n_equal_outside(self) -> int | None:
        """Equal entries outside the mask."""
        if self.n_equal_inside is None:
            return None
        return self.n_equal - self.n_equal_inside

    @property
    def frac_equal_inside(self) -> float | None:
        """Share of the mask's entries that are equal."""
        if not self.n_inside or self.n_equal_inside is None:
            return None
        return self.n_equal_inside / self.n_inside

    @property
    def frac_equal_outside(self) -> float | None:
        """Share of the entries outside the mask that are equal."""
        n, e = self.n_outside, self.n_equal_outside
        return e / n if n and e is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form with the derived fractions."""
        return {"tol": self.tol, "n_params": self.n_params, "n_equal": self.n_equal,
                "frac_equal": self.frac_equal, "n_inside": self.n_inside,
                "n_equal_inside": self.n_equal_inside,
                "frac_equal_inside": self.frac_equal_inside, "n_outside": self.n_outside,
                "n_equal_outside": self.n_equal_outside,
                "frac_equal_outside": self.frac_equal_outside}


@dataclass
class CompareReport:
    """The result of :func:`compare`: one :class:`Agreement` per tolerance."""

    a: str
    b: str
    mask: str | None
    agreements: list[Agreement] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"a": self.a, "b": self.b, "mask": self.mask, "skipped": self.skipped,
                "tolerances": [g.to_dict() for g in self.agreements]}


def compare(a: str | os.PathLike[str], b: str | os.PathLike[str], *,
            mask: MaskLike | None = None, tols: Sequence[float] = (1e-5,),
            device: str = "cpu", allow_missing: bool = False,
            progress: ProgressFn | None = None,
            warn: Callable[[str], None] | None = None) -> CompareReport:
    """Count the entries of checkpoints ``a`` and ``b`` equal within each of ``tols``,
    overall and inside / outside ``mask``."""
    if not tols:
        raise UsageError("give at least one tolerance")
    for t in tols:
        check_tolerance(t)
    ck_a, ck_b = open_checkpoint(a), open_checkpoint(b)
    try:
        names, skipped = match_tensors(ck_a, ck_b, allow_missing, warn, sides=("A", "B"))
        if mask is not None:
            stats = {s.tensor: s for s in mask.tensor_stats()}
            absent = [n for n in names if n not in stats]
            if absent:
                raise MaskMismatchError(f"mask {getattr(mask, 'name', '')!r} does not cover "
                                        f"{len(absent)} tensor(s) of the checkpoints: "
                                        + listing(absent), absent, [])
            bad = [n for n in names if tuple(stats[n].shape) != ck_a.tensors[n].shape]
            if bad:
                raise MaskMismatchError(f"mask {getattr(mask, 'name', '')!r} does not fit the "
                                        f"checkpoints: shapes differ for " + listing(bad),
                                        shape_mismatches=bad)
        total = sum(ck_a.tensors[n].nbytes + ck_b.tensors[n].nbytes for n in names)
        kernels = [DiffKernel(tol=t, device=device, backend=backend_for(total)) for t in tols]
        agreements = [Agreement(float(t), n_inside=0 if mask is not None else None,
                                n_equal_inside=0 if mask is not None else None) for t in tols]
        done = 0
        with MappedCheckpoint(ck_a) as ma, MappedCheckpoint(ck_b) as mb:
            for i, name in enumerate(names):
                ia, ib = ck_a.tensors[name], ck_b.tensors[name]
                bits = mask.packed(name) if mask is not None else None
                inside = count_entries(bits, ia.numel) if bits is not None else 0
                for kernel, g in zip(kernels, agreements, strict=True):
                    d = kernel.run_raw(ma.region(name).raw(), mb.region(name).raw(), ia.dtype,
                                       ib.dtype, ia.numel)
                    g.n_params += ia.numel
                    g.n_equal += ia.numel - d.n_updated
                    if bits is not None:
                        differ_inside = count_entries(np.bitwise_and(d.packed, bits), ia.numel)
                        g.n_inside += inside
                        g.n_equal_inside += inside - differ_inside
                done += ia.nbytes + ib.nbytes
                if progress:
                    progress(i + 1, len(names), done, total, name)
    finally:
        ck_a.close()
        ck_b.close()
    return CompareReport(str(a), str(b), getattr(mask, "name", None), agreements, skipped)
