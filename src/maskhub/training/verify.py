"""Verify a masked training run: did anything change outside the mask?

``verify_mask(mask, base, trained)`` diffs the trained checkpoint against the base with the
diff code (``open_checkpoint``, ``match_tensors``, :class:`DiffKernel`), one tensor at a
time, and counts the changed entries that the mask does not mark as trainable:
``popcount(changed & ~mask)`` on the packed bits. The default tolerance is 0: after an
exact-mode run every entry outside the mask must be bit-identical to the base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from os import PathLike
from typing import Any

import numpy as np

from maskhub.checkpoints import fingerprint as fp
from maskhub.checkpoints.mapped import MappedCheckpoint
from maskhub.checkpoints.pairing import match_tensors
from maskhub.checkpoints.sources import Checkpoint, open_checkpoint
from maskhub.core.identity import base_mismatch, recorded_base_fingerprint
from maskhub.core.masklike import MaskLike, listing
from maskhub.errors import MaskMismatchError
from maskhub.kernels.bitcount import count_entries
from maskhub.kernels.kernel import DiffKernel, backend_for
from maskhub.schemas.dtypes import itemsize
from maskhub.schemas.metadata import TensorStats
from maskhub.schemas.modelfit import another_model
from maskhub.schemas.progress import ProgressFn


@dataclass(frozen=True)
class TensorCheck:
    """One tensor: entries changed between base and trained, and how many lie outside."""

    tensor: str
    numel: int
    n_mask: int       # entries the mask marks as trainable
    n_changed: int    # entries with |trained - base| > tol
    n_outside: int    # changed entries the mask does not cover


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify_mask`; ``ok`` iff nothing changed outside the mask."""

    mask: str | None
    mask_id: str | None
    base: str
    trained: str
    tol: float
    tensors: tuple[TensorCheck, ...]
    skipped: tuple[str, ...] = ()
    #: The tolerance the mask itself was made with (None for a mask that does not say).
    mask_tol: float | None = None

    @property
    def n_params(self) -> int:
        """Entries compared."""
        return sum(t.numel for t in self.tensors)

    @property
    def n_changed(self) -> int:
        """Entries changed between base and trained."""
        return sum(t.n_changed for t in self.tensors)

    @property
    def n_outside(self) -> int:
        """Changed entries outside the mask."""
        return sum(t.n_outside for t in self.tensors)

    @property
    def ok(self) -> bool:
        """True iff no entry changed outside the mask."""
        return self.n_outside == 0

    def outside(self) -> list[TensorCheck]:
        """The tensors with changes outside the mask, most first."""
        return sorted((t for t in self.tensors if t.n_outside), key=lambda t: -t.n_outside)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (with the totals and ``ok``)."""
        return {"ok": self.ok, "mask": self.mask, "mask_id": self.mask_id, "base": self.base,
                "trained": self.trained, "tol": self.tol, "mask_tol": self.mask_tol,
                "n_params": self.n_params,
                "n_changed": self.n_changed, "n_outside": self.n_outside,
                "tensors": [asdict(t) for t in self.tensors], "skipped": list(self.skipped)}


def verify_mask(mask: MaskLike, base: str | PathLike[str], trained: str | PathLike[str], *,
                tol: float = 0.0, device: str = "cpu", allow_missing: bool = False,
                progress: ProgressFn | None = None,
                warn: Callable[[str], None] | None = None) -> VerifyReport:
    """Count, per tensor, the entries of ``trained`` that differ from ``base`` by more than
    ``tol`` where ``mask`` says they should be frozen.

    ``base``/``trained``: anything :func:`~maskhub.checkpoints.sources.open_checkpoint` takes.
    Tensors present in one checkpoint only, or in the checkpoints and not in the mask (or the
    reverse), are an error unless ``allow_missing`` (then they are skipped with a warning).
    """
    base_ck = open_checkpoint(base)
    trained_ck = open_checkpoint(trained)
    try:
        names, skipped = match_tensors(base_ck, trained_ck, allow_missing, warn,
                                       sides=("base", "trained"))
        stats = {s.tensor: s for s in mask.tensor_stats()}
        present = set(names)
        not_in_mask = [n for n in names if n not in stats]
        # (a tensor in one checkpoint only is already in ``skipped``)
        not_in_ckpt = [n for n in mask.tensor_names() if n not in present and n not in skipped]
        label = getattr(mask, "name", None)
        why = another_model({s.tensor: s.shape for s in stats.values()},
                            {n: t.shape for n, t in base_ck.tensors.items()},
                            "the mask", "the checkpoints")
        if why is not None:  # a different architecture, not a few missing tensors
            raise MaskMismatchError(f"mask {label!r} is a mask of another model: {why}")
        if (not_in_mask or not_in_ckpt) and not allow_missing:
            parts = [f"mask {label!r} and the checkpoints do not hold the same tensors"]
            if not_in_ckpt:
                parts.append(f"{len(not_in_ckpt)} mask tensor(s) not in the checkpoints: "
                             + listing(not_in_ckpt))
            if not_in_mask:
                parts.append(f"{len(not_in_mask)} checkpoint tensor(s) not in the mask: "
                             + listing(not_in_mask))
            raise MaskMismatchError("; ".join(parts) + "; use --allow-missing to skip them",
                                    not_in_ckpt, not_in_mask)
        if not_in_mask or not_in_ckpt:
            if warn:
                warn(f"skipping {len(not_in_mask) + len(not_in_ckpt)} tensor(s) not in both "
                     "the mask and the checkpoints: " + listing(not_in_mask + not_in_ckpt))
            skipped = skipped + not_in_mask + not_in_ckpt
            names = [n for n in names if n in stats]
        bad = [f"{n} {list(stats[n].shape)} in the mask vs {list(base_ck.tensors[n].shape)} in "
               "the checkpoints" for n in names
               if tuple(stats[n].shape) != tuple(base_ck.tensors[n].shape)]
        if bad:
            raise MaskMismatchError(f"mask {label!r} does not fit the checkpoints: "
                                    f"{len(bad)} shape(s) differ: " + listing(bad, 3),
                                    shape_mismatches=bad)
        kernel = DiffKernel(tol=tol, device=device, backend=backend_for(
            sum(base_ck.tensors[n].nbytes + trained_ck.tensors[n].nbytes for n in names)))
        # content identity: is BASE the base the mask was made from? (its recorded
        # fingerprint covers all of the mask's tensors: comparable when none was skipped)
        # and same dtypes: the same values stored wider (an fp32 copy of a bf16 base) are
        # other bytes, not another model, and are not compared)
        hash_base = (recorded_base_fingerprint(mask) is not None
                     and set(names) == set(stats) and len(names) == len(stats)
                     and all(base_ck.tensors[n].dtype == stats[n].base_dtype for n in names))
        digests: dict[str, bytes] = {}
        with MappedCheckpoint(base_ck) as mb, MappedCheckpoint(trained_ck) as mt:
            checks = _check_tensors(mask, names, stats, base_ck, trained_ck, mb, mt, kernel,
                                    progress, digests if hash_base else None)
        if hash_base:
            line = base_mismatch(mask, fp.combine(digests), f"the base {base}")
            if line is not None:
                raise MaskMismatchError(line)
    finally:
        base_ck.close()
        trained_ck.close()
    return VerifyReport(label, getattr(mask, "id", None), str(base), str(trained), float(tol),
                        tuple(checks), tuple(skipped), mask_tolerance(mask))


def mask_tolerance(mask: MaskLike) -> float | None:
    """The tolerance ``mask`` was made with (its registry row), or None when unknown."""
    row = getattr(mask, "row", None)
    tol = row.get("tol") if isinstance(row, dict) else None
    return float(tol) if tol is not None else None


def _check_tensors(mask: MaskLike, names: list[str], stats: dict[str, TensorStats],
                   base_ck: Checkpoint, trained_ck: Checkpoint, mb: MappedCheckpoint,
                   mt: MappedCheckpoint, kernel: DiffKernel, progress: ProgressFn | None,
                   digests: dict[str, bytes] | None = None) -> list[TensorCheck]:
    """One :class:`TensorCheck` per tensor, read from the mapped files one pair at a time;
    ``digests``: also the base tensors' content digests, filled in."""
    checks = []
    total = sum(base_ck.tensors[n].nbytes + trained_ck.tensors[n].nbytes for n in names)
    done = 0
    for i, name in enumerate(names):
        a, b = base_ck.tensors[name], trained_ck.tensors[name]
        result = kernel.run_raw(mb.region(name).raw(), mt.region(name).raw(), a.dtype, b.dtype,
                                a.numel)
        if digests is not None:  # the base's bytes, still in cache
            raw, step = mb.region(name).raw(), fp.CHUNK * itemsize(a.dtype)
            digests[name] = fp.tensor_digest(name, a.dtype, a.shape, [
                fp.chunk_digest(raw[i:i + step]) for i in range(0, len(raw), step)])
        frozen = np.invert(mask.packed(name))
        checks.append(TensorCheck(name, stats[name].numel, stats[name].n_updated,
                                  result.n_updated,
                                  count_entries(np.bitwise_and(result.packed, frozen), a.numel)))
        done += a.nbytes + b.nbytes
        if progress:
            progress(i + 1, len(names), done, total, name)
    return checks
