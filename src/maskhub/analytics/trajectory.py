"""Trajectories: how the update mask evolves across intermediate checkpoints.

For checkpoints C0..Cn (the paper's Figures 2, 5, 6 and 7): the sparsity of each Ck against
C0, the sparsity between consecutive checkpoints, the **ever-updated** set and the split of
all parameters into *never touched*, *touched but cancelled out* (ever updated, yet back
within ``tol`` of C0 at the end) and the *final subnetwork* (updated in Cn against C0).

"Ever updated" has one definition everywhere (the ``n_ever`` column, the ``NAME-ever``
mask, the split and the plot): **updated against C0 at some checkpoint so far**, i.e.
``|Ck − C0| > tol`` for some ``k``. Changes between consecutive checkpoints are reported
(``vs previous``) but do not define it: a drift of many steps each within ``tol`` that ends
past ``tol`` is ever updated from the checkpoint where it crosses, and one that stays within
``tol`` of C0 never is. So ``n_ever`` never falls below ``n_updated_vs_first`` and only
grows. The paper's Figure 6, updated at step k but not in the final subnetwork, is
``n_not_in_final``: ``|(Ck − C0 > tol) ∖ final|``.

Tensor by tensor, read from the mapped checkpoints (no torch, no copy), several tensors at
once (one per CPU, a bounded window ahead of the one written): a tensor's pages in a
checkpoint are dropped from the process once that checkpoint is done with (C0's at the end),
and the per-tensor bitsets stay packed, so memory does not grow with the number of
checkpoints or the model size.
"""

from __future__ import annotations

import re
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from maskhub.checkpoints.mapped import MappedCheckpoint, Region, allow_open_files
from maskhub.checkpoints.pairing import match_tensors
from maskhub.checkpoints.sources import Checkpoint, open_checkpoint
from maskhub.core.interrupts import critical_section
from maskhub.core.provenance import model_name, timestamp
from maskhub.errors import UsageError
from maskhub.kernels.bitcount import popcount
from maskhub.kernels.kernel import DiffKernel, TensorDiff
from maskhub.kernels.strata import BINS, strata_fn, strata_rows
from maskhub.kernels.threads import available_cpus
from maskhub.schemas.metadata import MaskMetadata, TensorStats
from maskhub.schemas.names import mask_name_from, parse_tensor_name
from maskhub.storage.files import remove_tree
from maskhub.storage.store import MaskWriter

if TYPE_CHECKING:
    from maskhub.core.home import Home
    from maskhub.core.record import MaskRecord

_STEP = re.compile(r"(\d+)(?!.*\d)")


@dataclass
class TrajectoryPoint:
    """Counts for checkpoint ``index`` of a trajectory."""

    index: int
    step: int
    checkpoint: str
    revision: str | None
    n_updated_vs_first: int = 0
    #: ``None`` when the previous values were not kept (a live recording without
    #: ``per_step``).
    n_updated_vs_prev: int | None = 0
    n_ever: int = 0
    n_not_in_final: int = 0


@dataclass
class TrajectoryResult:
    """A finished trajectory and the two masks it registered."""

    id: str
    name: str
    tol: float
    n_params: int
    points: list[TrajectoryPoint]
    n_never: int
    n_cancelled: int
    n_subnetwork: int
    final: MaskRecord
    ever: MaskRecord
    extra: dict[str, Any] = field(default_factory=dict)

    def split(self) -> dict[str, float]:
        """Fractions never / cancelled / subnetwork (they sum to 1)."""
        n = self.n_params or 1
        return {"never": self.n_never / n, "cancelled": self.n_cancelled / n,
                "subnetwork": self.n_subnetwork / n}

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the CLI."""
        return {
            "id": self.id, "name": self.name, "tol": self.tol, "n_params": self.n_params,
            "n_never": self.n_never, "n_cancelled": self.n_cancelled,
            "n_subnetwork": self.n_subnetwork, **{f"frac_{k}": v for k, v in self.split().items()},
            "final_mask": self.final.id, "ever_mask": self.ever.id,
            "points": [{**p.__dict__,
                        "sparsity_vs_first": 1 - p.n_updated_vs_first / self.n_params,
                        "sparsity_vs_prev": (None if p.n_updated_vs_prev is None
                                             else 1 - p.n_updated_vs_prev / self.n_params),
                        "sparsity_ever": 1 - p.n_ever / self.n_params,
                        "frac_not_in_final": p.n_not_in_final / self.n_params}
                       for p in self.points],
        }


def expand_checkpoints(specs: Sequence[str]) -> list[str]:
    """A single directory holding checkpoint subdirectories expands to them, ordered by the
    last number in their names (``checkpoint-500`` before ``checkpoint-1000``)."""
    if len(specs) == 1:
        root = Path(specs[0]).expanduser()
        if root.is_dir() and not any(root.glob("*.safetensors")):
            subdirs = [p for p in root.iterdir() if p.is_dir() and (
                any(p.glob("*.safetensors")))]
            if not subdirs:
                raise UsageError(f"{root} holds no checkpoint directories")
            return [str(p) for p in sorted(subdirs, key=lambda p: (_step_of(p.name, 0), p.name))]
    return list(specs)


def _step_of(label: str, default: int) -> int:
    m = _STEP.search(Path(label.rstrip("/")).name.split("@")[-1])
    return int(m.group(1)) if m else default


def run_trajectory(registry: Home, specs: Sequence[str], *, name: str | None = None,
                   tol: float = 1e-5, device: str = "cpu", algorithm: str | None = None,
                   seed: int | None = None, dataset: str | None = None,
                   tags: Sequence[str] = (),
                   progress: Callable[[int, int, int, int, str], None] | None = None
                   ) -> TrajectoryResult:
    """Measure a checkpoint sequence and register its final and ever-updated masks (with
    the run's ``algorithm``, ``seed``, ``dataset`` and ``tags``; ``masks.operation`` marks
    them ``trajectory-final`` / ``trajectory-ever``)."""
    specs = expand_checkpoints(specs)
    if len(specs) < 2:
        raise UsageError("a trajectory needs at least two checkpoints")
    ckpts: list[Checkpoint] = [open_checkpoint(s) for s in specs]
    try:
        names: list[str] = []
        for ck in ckpts[1:]:
            names, _ = match_tensors(ckpts[0], ck, allow_missing=False)
        labels = [model_name(ck.ref) for ck in ckpts]
        points = [TrajectoryPoint(i, _step_of(s, i), labels[i], ck.revision)
                  for i, (s, ck) in enumerate(zip(specs, ckpts, strict=True))]
        name = name or mask_name_from(Path(specs[-1].rstrip("/")).name)
        with registry.index.connect(write=False):  # one connection for both names
            for suffix in ("-final", "-ever"):
                registry.check_new_name(name + suffix)
        final_id, ever_id = uuid.uuid4().hex, uuid.uuid4().hex
        tmp_final = registry.new_store_location(final_id)
        tmp_ever = registry.new_store_location(ever_id)
        kernel = DiffKernel(tol=tol, device=device)
        try:
            w_final, w_ever = MaskWriter(tmp_final), MaskWriter(tmp_ever)
            final_stats, ever_stats = [], []
            final_strata: list[tuple[str, int, int, int]] = []
            ever_strata: list[tuple[str, int, int, int]] = []
            n_cancelled = 0
            total = len(names)
            # Tensors are measured on every CPU at once (the kernels release the GIL), at most
            # two per thread ahead of the one being written, straight from the mapped files:
            # no torch, no copy of a tensor.
            threads = 1 if kernel.on_cuda else available_cpus()
            allow_open_files(sum(2 * len({i.file for i in ck.tensors.values()})
                                 for ck in ckpts))  # a descriptor and its mapping's, each
            with ExitStack() as stack:
                mapped = [stack.enter_context(MappedCheckpoint(ck)) for ck in ckpts]
                pool = stack.enter_context(ThreadPoolExecutor(
                    threads, thread_name_prefix="maskhub-trajectory"))
                measured = _in_order(pool, names, lambda t: _measure(kernel, ckpts, mapped, t),
                                     2 * threads)
                # on an error or Ctrl-C, the tensors not started yet are dropped first: the
                # pool then waits only for those being measured
                stack.callback(measured.close)
                for i, (tname, m) in enumerate(zip(names, measured, strict=True)):
                    info = ckpts[0].tensors[tname]
                    for k, row in enumerate(m.counts.tolist(), start=1):
                        points[k].n_updated_vs_first += row[0]
                        points[k].n_updated_vs_prev += row[1]
                        points[k].n_ever += row[2]
                        points[k].n_not_in_final += row[3]
                    layer, module = parse_tensor_name(tname)
                    n_final = popcount(m.final)
                    n_ever = popcount(m.ever)  # final ⊆ ever: the split partitions the tensor
                    n_cancelled += n_ever - n_final
                    dt = info.dtype
                    common = dict(shape=info.shape, numel=info.numel, layer=layer,
                                  module=module, base_dtype=dt,
                                  target_dtype=ckpts[-1].tensors[tname].dtype)
                    fs = TensorStats(tname, n_updated=n_final, **common)
                    es = TensorStats(tname, n_updated=n_ever, **common)
                    if info.numel:  # magnitude strata of both masks, from C0's exponents
                        final_strata.extend(strata_rows(tname, dt, m.strata[0]))
                        ever_strata.extend(strata_rows(tname, dt, m.strata[1]))
                    w_final.add(fs, m.final)
                    w_ever.add(es, m.ever)
                    final_stats.append(fs)
                    ever_stats.append(es)
                    if progress:
                        progress(i + 1, total, i + 1, total, tname)
            n_params = sum(s.numel for s in final_stats)
            n_sub = sum(s.n_updated for s in final_stats)
            n_ever_total = sum(s.n_updated for s in ever_stats)
            common_meta = dict(base_model=labels[0], base_revision=ckpts[0].revision,
                               target_model=labels[-1], target_revision=ckpts[-1].revision,
                               n_params=n_params, tol=float(tol), created_at=timestamp(),
                               dtype=ckpts[0].tensors[names[0]].dtype, algorithm=algorithm,
                               seed=seed, dataset=dataset, tags=tuple(tags))
            meta_final, meta_ever = finish_stores(w_final, w_ever, (final_id, ever_id), name,
                                                  n_sub, n_ever_total, common_meta)
        except BaseException:
            remove_tree(tmp_final)
            remove_tree(tmp_ever)
            raise
    finally:
        for ck in ckpts:
            ck.close()
    return register_trajectory(registry, name, float(tol), points,
                               (tmp_final, meta_final, final_stats, final_strata),
                               (tmp_ever, meta_ever, ever_stats, ever_strata), n_cancelled)


@dataclass
class _Measured:
    """One tensor along the sequence: per step k (row ``k - 1``) updated vs the first
    checkpoint, vs the previous one, ever, and updated but not in the final mask; the final
    and ever-updated masks (packed); the magnitude strata of both (from C0's exponents)."""

    counts: np.ndarray
    final: np.ndarray
    ever: np.ndarray
    strata: tuple[np.ndarray, np.ndarray]


def _measure(kernel: DiffKernel, ckpts: Sequence[Checkpoint], mapped: Sequence[MappedCheckpoint],
             tname: str) -> _Measured:
    """Measure tensor ``tname`` along the mapped checkpoints (any thread)."""
    infos = [ck.tensors[tname] for ck in ckpts]
    regions = [m.region(tname) for m in mapped]
    n, last = infos[0].numel, len(ckpts) - 1

    def run(a: int, b: int) -> TensorDiff:
        return kernel.run_raw(regions[a].raw(), regions[b].raw(), infos[a].dtype,
                              infos[b].dtype, n)

    try:
        final = run(0, last).packed  # known first: for Figure 6
        not_final = np.invert(final)
        ever = np.zeros_like(final)
        counts = np.zeros((last, 4), dtype=np.int64)
        for k in range(1, last + 1):
            vs_first = run(0, k).packed if k < last else final
            vs_prev = run(k - 1, k)
            if k > 1:  # C(k-1)'s pages are done with (C0's serve every step, and the strata)
                _release(regions[k - 1])
            np.bitwise_or(ever, vs_first, out=ever)
            counts[k - 1] = (popcount(vs_first), vs_prev.n_updated, popcount(ever),
                             popcount(np.bitwise_and(vs_first, not_final)))
        strata = (np.zeros((2, BINS), dtype=np.int64), np.zeros((2, BINS), dtype=np.int64))
        if n:
            sfn = strata_fn(infos[0].dtype, "numba" if kernel.backend == "numba" else "numpy")
            for bits, out in zip((final, ever), strata, strict=True):
                sfn(regions[0].raw(), bits, n, out)
    finally:
        for r in regions:
            _release(r)
    return _Measured(counts, final, ever, strata)


def _release(region: Region) -> None:
    """Drop a tensor's pages from this process's memory: they stay in the page cache, and
    what a process holds stays a few tensors per thread, whatever the number of checkpoints."""
    region.file.release(region.begin, region.end - region.begin)


def _in_order(pool: ThreadPoolExecutor, items: Sequence[str], fn: Callable[[str], _Measured],
              ahead: int) -> Iterator[_Measured]:
    """``fn(item)`` of each item on ``pool``, yielded in order, at most ``ahead`` submitted
    beyond the one yielded (memory stays bounded however many items there are)."""
    pending: deque[Future[_Measured]] = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


def finish_stores(w_final: MaskWriter, w_ever: MaskWriter, ids: tuple[str, str], name: str,
                  n_final: int, n_ever: int, common: dict[str, Any]
                  ) -> tuple[MaskMetadata, MaskMetadata]:
    """Write the metadata of a trajectory's ``NAME-final`` and ``NAME-ever`` stores (``ids``
    in that order; ``common``: the fields both share) and return it."""
    meta_final = MaskMetadata(id=ids[0], name=f"{name}-final", n_updated=n_final,
                              operation="trajectory-final", **common)
    meta_ever = MaskMetadata(id=ids[1], name=f"{name}-ever", n_updated=n_ever,
                             operation="trajectory-ever", **common)
    w_final.finish(meta_final)
    w_ever.finish(meta_ever)
    return meta_final, meta_ever


#: A written, not yet registered store: ``(staging path, metadata, tensor stats, strata)``.
StagedMask = tuple[Any, MaskMetadata, list[TensorStats], list[tuple[str, int, int, int]]]


def register_trajectory(registry: Home, name: str, tol: float,
                        points: list[TrajectoryPoint], final: StagedMask, ever: StagedMask,
                        n_cancelled: int) -> TrajectoryResult:
    """Register a trajectory's final and ever-updated masks (written to staging) and its
    rows in one transaction: all of them commit, or none."""
    tmp_final, meta_final, final_stats, final_strata = final
    tmp_ever, meta_ever, ever_stats, ever_strata = ever
    n_params = sum(s.numel for s in final_stats)
    n_sub = sum(s.n_updated for s in final_stats)
    n_ever_total = sum(s.n_updated for s in ever_stats)
    try:
        with critical_section(), registry.index.connect():
            final_mask = registry.register_store(tmp_final, meta_final, final_stats,
                                                 strata=final_strata)
            ever_mask = registry.register_store(tmp_ever, meta_ever, ever_stats,
                                                strata=ever_strata)
            result = TrajectoryResult(
                id=uuid.uuid4().hex, name=name, tol=tol, n_params=n_params,
                points=points, n_never=n_params - n_ever_total, n_cancelled=n_cancelled,
                n_subnetwork=n_sub, final=final_mask, ever=ever_mask)
            record_trajectory(registry, result)
    except BaseException:
        remove_tree(tmp_ever)  # still staged when registering the final mask failed
        raise
    return result


def record_trajectory(registry: Home, r: TrajectoryResult) -> None:
    """Insert the ``trajectories`` row and the ``trajectory_points`` rows of ``r`` (inside
    the caller's transaction when one is open, as when its masks are registered)."""
    with registry.index.connect() as con:
        con.execute(
            "INSERT INTO trajectories VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [r.id, r.name, r.tol, len(r.points), r.n_params, r.n_never, r.n_cancelled,
             r.n_subnetwork, r.final.id, r.ever.id, timestamp()])
        # one statement for all the points (executemany runs one INSERT per row)
        for lo in range(0, len(r.points), _POINTS_PER_INSERT):
            chunk = r.points[lo:lo + _POINTS_PER_INSERT]
            con.execute(
                "INSERT INTO trajectory_points (trajectory_id, idx, step, checkpoint, "
                "revision, n_updated_vs_first, n_updated_vs_prev, n_ever, n_not_in_final) "
                "VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk)),
                [v for p in chunk for v in (r.id, p.index, p.step, p.checkpoint, p.revision,
                                            p.n_updated_vs_first, p.n_updated_vs_prev,
                                            p.n_ever, p.n_not_in_final)])


#: Rows of ``trajectory_points`` per INSERT statement (a bound on the statement's size).
_POINTS_PER_INSERT = 1000
