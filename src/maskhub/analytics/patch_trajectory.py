"""``maskhub trajectory --patches BASE P1 ... Pn``: a trajectory from a chain of sparse patches.

The same measurement as :mod:`maskhub.analytics.trajectory` (per-step counts against the
base and the previous step, ever updated, Figure 6's ``n_not_in_final``, the never /
cancelled / subnetwork split, the ``NAME-final`` and ``NAME-ever`` masks, the
``trajectories`` and ``trajectory_points`` rows), for the weights ``base``, ``base + P1``,
..., ``base + P1 + ... + Pn``, without building any of them densely
(:mod:`maskhub.analytics.patch_replay`). The chain is checked before any count: every patch
must be a readable patch file (:mod:`maskhub.checkpoints.patches`) whose tensors are the
base's, with the base's dtypes and shapes and every index inside the tensor, and the steps
its metadata gives must follow one another (``base_step`` of a patch = ``target_step`` of
the one before; target steps increasing). A patch that fails is named in a one-line error,
and nothing is registered.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from maskhub.analytics.patch_replay import (
    COMPILED_DTYPES,
    replay_compiled,
    replay_numpy,
)
from maskhub.analytics.trajectory import (
    TrajectoryPoint,
    TrajectoryResult,
    _step_of,
    finish_stores,
    register_trajectory,
)
from maskhub.checkpoints.mapped import MappedCheckpoint
from maskhub.checkpoints.patch_checksum import verify_checksum
from maskhub.checkpoints.patches import PatchFile, open_patch
from maskhub.checkpoints.sources import Checkpoint, open_checkpoint
from maskhub.core.provenance import model_name, timestamp
from maskhub.errors import CheckpointError, UsageError
from maskhub.kernels.fastkernel import HAVE_NUMBA
from maskhub.kernels.kernel import DiffKernel, backend_for
from maskhub.kernels.strata import BINS, FORMATS, strata_fn, strata_rows
from maskhub.kernels.threads import available_cpus
from maskhub.schemas.dtypes import itemsize
from maskhub.schemas.metadata import BITORDER, TensorStats
from maskhub.schemas.names import mask_name_from, parse_tensor_name
from maskhub.storage.files import remove_tree
from maskhub.storage.store import MaskWriter

if TYPE_CHECKING:
    from maskhub.core.home import Home

#: Unsigned views of raw values by item size.
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def open_chain(base: Checkpoint, paths: Sequence[str]) -> list[PatchFile]:
    """Open and check the patches of a chain against ``base``: names, dtypes and declared
    shapes of every tensor, and the order of the steps their metadata gives. Indices are
    checked when each tensor is read."""
    patches: list[PatchFile] = []
    try:
        for p in paths:
            patches.append(open_patch(p))
        for pf in patches:
            check_against_base(pf, base)
        check_order(patches)
    except BaseException:
        for pf in patches:
            pf.close()
        raise
    return patches


def check_against_base(pf: PatchFile, base: Checkpoint) -> None:
    """Every tensor of ``pf`` is one of ``base``'s, with its dtype and (where the patch
    declares it) its shape."""
    for name in pf.entries:
        info = base.tensors.get(name)
        if info is None:
            raise CheckpointError(f"patch {pf.path}: tensor {name!r} is not in the base "
                                  f"{base.ref}", str(pf.path))
        dtype = pf.values_dtype(name)
        if dtype != info.dtype:
            raise CheckpointError(f"patch {pf.path}: tensor {name!r}: the patch's values are "
                                  f"{dtype}, the base tensor is {info.dtype}", str(pf.path))
        declared = pf.declared_shape(name)
        if declared is not None and declared != info.shape:
            raise CheckpointError(f"patch {pf.path}: tensor {name!r} has shape "
                                  f"{list(declared)} in the patch, {list(info.shape)} in the "
                                  "base", str(pf.path))


def check_order(patches: Sequence[PatchFile]) -> None:
    """The steps the patches' metadata gives follow one another: each ``base_step`` is the
    previous patch's ``target_step``, and target steps increase."""
    for prev, cur in zip(patches, patches[1:], strict=False):
        if cur.base_step is not None and prev.target_step is not None \
                and cur.base_step != prev.target_step:
            raise CheckpointError(
                f"patch {cur.path} is out of order: it starts from step {cur.base_step}, "
                f"the patch before it ({prev.label}) leads to step {prev.target_step}",
                str(cur.path))
        if cur.target_step is not None and prev.target_step is not None \
                and cur.target_step <= prev.target_step:
            raise CheckpointError(
                f"patch {cur.path} is out of order: it leads to step {cur.target_step}, "
                f"not after step {prev.target_step} of the patch before it ({prev.label})",
                str(cur.path))


def run_patch_trajectory(registry: Home, base_spec: str, patch_paths: Sequence[str], *,
                         name: str | None = None, tol: float = 1e-5,
                         algorithm: str | None = None, seed: int | None = None,
                         dataset: str | None = None, tags: Sequence[str] = (),
                         progress: Callable[[int, int, int, int, str], None] | None = None
                         ) -> TrajectoryResult:
    """Measure the chain ``base_spec, patch_paths...`` like a dense trajectory and register
    its final and ever-updated masks (``masks.operation``: ``trajectory-final`` /
    ``trajectory-ever``; ``extra.patches`` lists the patch files)."""
    if not patch_paths:
        raise UsageError("a patch trajectory needs a base and at least one patch")
    base = open_checkpoint(base_spec)
    patches: list[PatchFile] = []
    try:
        patches = open_chain(base, patch_paths)
        verify_checksum(base, patches)  # the last patch's checksum_sha256 (TRL #5417)
        names = list(base.tensors)
        labels = [model_name(base.ref)] + [str(pf.path.resolve()) for pf in patches]
        points = [TrajectoryPoint(0, _step_of(base_spec, 0), labels[0], base.revision)]
        for k, pf in enumerate(patches, start=1):
            step = pf.target_step if pf.target_step is not None else _step_of(str(pf.path), k)
            points.append(TrajectoryPoint(k, step, labels[k], None))
        name = name or mask_name_from(Path(patch_paths[-1]).stem)
        with registry.index.connect(write=False):  # one connection for both names
            for suffix in ("-final", "-ever"):
                registry.check_new_name(name + suffix)
        final_id, ever_id = uuid.uuid4().hex, uuid.uuid4().hex
        tmp_final = registry.new_store_location(final_id)
        tmp_ever = registry.new_store_location(ever_id)
        patch_bytes = sum(pf.nbytes for pf in patches)
        kernel = DiffKernel(tol=tol, backend=backend_for(patch_bytes))
        try:
            w_final, w_ever = MaskWriter(tmp_final), MaskWriter(tmp_ever)
            final_stats: list[TensorStats] = []
            ever_stats: list[TensorStats] = []
            final_strata: list[tuple[str, int, int, int]] = []
            ever_strata: list[tuple[str, int, int, int]] = []
            n_cancelled = 0
            done = 0
            # the tensors' strata are counted on the pool (compiled, without the GIL) while
            # this thread compresses and writes the masks of the ones before them
            with MappedCheckpoint(base) as mapped, \
                    ThreadPoolExecutor(available_cpus(), thread_name_prefix="maskhub-strata"
                                       ) as pool:
                for group in _groups(base, names):
                    views = [mapped.region(t).raw() for t in group]
                    finals, evers = _replay_group(base, group, views, patches, points,
                                                  kernel)
                    strata = [pool.submit(_strata, raw, base.tensors[t].dtype,
                                          base.tensors[t].numel, final, ever)
                              if base.tensors[t].numel else None
                              for t, raw, final, ever in zip(group, views, finals, evers,
                                                             strict=True)]
                    for tname, final, ever, counted in zip(group, finals, evers, strata,
                                                           strict=True):
                        info = base.tensors[tname]
                        n_final = int(np.bitwise_count(final).sum(dtype=np.int64))
                        n_ever = int(np.bitwise_count(ever).sum(dtype=np.int64))
                        n_cancelled += n_ever - n_final
                        layer, module = parse_tensor_name(tname)
                        common = dict(shape=info.shape, numel=info.numel, layer=layer,
                                      module=module, base_dtype=info.dtype,
                                      target_dtype=info.dtype)
                        fs = TensorStats(tname, n_updated=n_final, **common)
                        es = TensorStats(tname, n_updated=n_ever, **common)
                        if counted is not None:  # magnitude strata from the base's exponents
                            for counts, rows in zip(counted.result(),
                                                    (final_strata, ever_strata), strict=True):
                                rows.extend(strata_rows(tname, info.dtype, counts))
                        w_final.add(fs, final)
                        w_ever.add(es, ever)
                        final_stats.append(fs)
                        ever_stats.append(es)
                        done += 1
                        if progress:
                            progress(done, len(names), done, len(names), tname)
            n_params = sum(s.numel for s in final_stats)
            n_sub = sum(s.n_updated for s in final_stats)
            n_ever_total = sum(s.n_updated for s in ever_stats)
            common_meta = dict(base_model=labels[0], base_revision=base.revision,
                               target_model=labels[-1], target_revision=None,
                               n_params=n_params, tol=float(tol), created_at=timestamp(),
                               dtype=base.tensors[names[0]].dtype if names else "",
                               algorithm=algorithm, seed=seed, dataset=dataset,
                               tags=tuple(tags),
                               extra={"patches": [pf.label for pf in patches],
                                      "patch_layouts": sorted({pf.layout for pf in patches})})
            meta_final, meta_ever = finish_stores(w_final, w_ever, (final_id, ever_id), name,
                                                  n_sub, n_ever_total, common_meta)
        except BaseException:
            remove_tree(tmp_final)
            remove_tree(tmp_ever)
            raise
    finally:
        for pf in patches:
            pf.close()
        base.close()
    return register_trajectory(registry, name, float(tol), points,
                               (tmp_final, meta_final, final_stats, final_strata),
                               (tmp_ever, meta_ever, ever_stats, ever_strata), n_cancelled)


#: Patched entries (all steps of one group) from which the group's chain is replayed compiled
#: (:func:`~maskhub.analytics.patch_replay.replay_compiled`; numba: ~0.2 s to load, then
#: several times faster than the numpy passes per entry).
COMPILED_MIN_ENTRIES = 1 << 21
#: Entries replayed together: consecutive tensors of one dtype are laid end to end up to
#: this many entries (the compiled replay's state: 4 bytes per entry of a 16-bit dtype, 8 of
#: fp32, so 256-512 MiB), so that a step costs a few numpy calls per group, not per tensor.
GROUP_ENTRIES = 1 << 26


#: Entries of a tensor from which its strata are counted by the compiled kernels (one pass
#: over the base and the packed bits) rather than numpy; any size once numba is loaded.
COMPILED_STRATA_MIN = 1 << 22


def _strata(raw: np.ndarray, dtype: str, numel: int, *masks: np.ndarray) -> list[np.ndarray]:
    """Magnitude strata (:mod:`maskhub.kernels.strata`) of each of ``masks`` (packed bits,
    little bit order, bits past ``numel`` zero) over the base tensor ``raw``: the entries'
    histogram is counted once for all."""
    out = [np.zeros((2, BINS), dtype=np.int64) for _ in masks]
    fmt = FORMATS.get(dtype)
    if fmt is None:  # one stratum: the whole tensor
        for counts, packed in zip(out, masks, strict=True):
            counts[0, 0] = numel
            counts[1, 0] = int(np.bitwise_count(packed).sum(dtype=np.int64))
        return out
    if HAVE_NUMBA and (numel >= COMPILED_STRATA_MIN or "numba" in sys.modules):
        for k, (counts, packed) in enumerate(zip(out, masks, strict=True)):
            if k:
                counts[0] = out[0][0]
            strata_fn(dtype, "numba", entries=not k)(raw, packed, numel, counts)
        return out
    view, shift, emask = fmt
    exp = (raw.view(view) >> view(shift)) & view(emask)
    entries = np.bincount(exp, minlength=BINS)
    for counts, packed in zip(out, masks, strict=True):
        m = np.unpackbits(packed, count=numel, bitorder=BITORDER).view(bool)
        counts[0] = entries
        counts[1] = np.bincount(exp[m], minlength=BINS)
    return out


def _groups(base: Checkpoint, names: Sequence[str]) -> list[list[str]]:
    """Consecutive tensors of one dtype, at most :data:`GROUP_ENTRIES` entries together
    (a larger tensor alone)."""
    groups: list[list[str]] = []
    size, dtype = 0, None
    for n in names:
        info = base.tensors[n]
        if groups and info.dtype == dtype and size + info.numel <= GROUP_ENTRIES:
            groups[-1].append(n)
            size += info.numel
        else:
            groups.append([n])
            size, dtype = info.numel, info.dtype
    return groups


def _replay_group(base: Checkpoint, group: Sequence[str], views: Sequence[np.ndarray],
                  patches: Sequence[PatchFile], points: list[TrajectoryPoint],
                  kernel: DiffKernel) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Replay the chain over the tensors ``group`` (one dtype) laid end to end; add each
    step's counts to ``points``; return each tensor's final and ever-updated masks
    (packed, little bit order)."""
    infos = [base.tensors[t] for t in group]
    dtype = infos[0].dtype
    raw_dt = _RAW[itemsize(dtype)]
    typed = [v.view(raw_dt) for v in views]
    offsets = np.zeros(len(group) + 1, dtype=np.int64)
    np.cumsum([i.numel for i in infos], out=offsets[1:])

    steps: list[list[tuple[np.ndarray, int, np.ndarray]]] = []
    for pf in patches:  # each patch's arrays where they lie in its file
        read = [(pf.read(t, i.shape, i.dtype), int(off)) for t, i, off in
                zip(group, infos, offsets[:-1], strict=True) if t in pf.entries]
        steps.append([(pt.indices, off, pt.values) for pt, off in read if pt.nnz])
    touched = sum(p.shape[0] for step in steps for p, _, _ in step)
    numel = int(offsets[-1])
    if HAVE_NUMBA and touched >= COMPILED_MIN_ENTRIES and dtype in COMPILED_DTYPES:
        chain = replay_compiled(typed, numel, dtype, steps, float(kernel.tols[0]))
    else:
        chain = replay_numpy(typed, numel, dtype, steps, kernel)
    for k, row in enumerate(chain.counts.tolist(), start=1):
        points[k].n_updated_vs_first += row[0]
        points[k].n_updated_vs_prev += row[1]
        points[k].n_ever += row[2]
        points[k].n_not_in_final += row[3]
    bounds_of = list(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True))
    return ([slice_bits(chain.final, lo, hi) for lo, hi in bounds_of],
            [slice_bits(chain.ever, lo, hi) for lo, hi in bounds_of])


def slice_bits(packed: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Bits ``lo:hi`` of ``packed`` (little bit order) as packed bits of their own, bits past
    ``hi - lo`` zero."""
    n = hi - lo
    if lo % 8 == 0:
        out = packed[lo // 8:(hi + 7) // 8].copy()
        if n % 8:
            out[-1] &= (1 << (n % 8)) - 1
        return out
    bits = np.unpackbits(packed[lo // 8:(hi + 7) // 8], bitorder=BITORDER)
    return np.packbits(bits[lo % 8:lo % 8 + n], bitorder=BITORDER)
