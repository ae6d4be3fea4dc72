"""``diff``: two checkpoints in, one registered mask out.

Opens both checkpoints (headers only), pairs their tensors, runs the pipeline
(:mod:`maskhub.diff.pipeline`, or Ray tasks: :mod:`maskhub.diff.ray`) into a new store,
optionally the ``--rank/--stats`` pass (:mod:`maskhub.diff.analysis`, the only part that
imports torch on the CPU), writes the metadata and registers the store through the home's
commit protocol. Ctrl-C is acted on between tensors only.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from maskhub.checkpoints.pairing import match_tensors
from maskhub.checkpoints.sources import Checkpoint, open_checkpoint
from maskhub.core.home import Home
from maskhub.core.interrupts import check_interrupt, interruptible, safe_interrupts
from maskhub.core.provenance import model_name, timestamp
from maskhub.core.record import MaskRecord
from maskhub.diff.pipeline import run_diff
from maskhub.errors import UsageError
from maskhub.kernels.device import resolve_device, resolve_stream_device
from maskhub.kernels.kernel import DiffKernel, backend_for, check_tolerance
from maskhub.kernels.patchbits import can_convert
from maskhub.kernels.precision import check_budget, settle_null
from maskhub.kernels.strata import StrataCache
from maskhub.schemas.metadata import MaskMetadata
from maskhub.schemas.progress import ProgressFn
from maskhub.storage.files import remove_tree
from maskhub.storage.store import MaskWriter

#: The tolerance of a diff without ``--patch`` (the paper's bf16 tolerance).
DEFAULT_TOL = 1e-5
#: Local input (both sides, bytes) below which a diff opens the registry once, for writing,
#: and keeps that one connection from the name check to the registration (a DuckDB
#: connection costs about what the diff of a few MB does); above it the exclusive lock is
#: taken only to register, so that a long diff never blocks other commands.
ONE_CONNECTION_BYTES = 64 << 20


def diff(
    home: Home,
    base: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    name: str | None = None,
    algorithm: str | None = None,
    seed: int | None = None,
    dataset: str | None = None,
    tol: float | None = None,
    sweep: Sequence[float] = (),
    device: str = "auto",
    allow_missing: bool = False,
    base_model: str | None = None,
    target_model: str | None = None,
    tags: Sequence[str] = (),
    notes: str | None = None,
    rank: bool = False,
    stats: bool = False,
    ray: str | None = None,
    budget: float | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    warn: Callable[[str], None] | None = None,
    patch: bool = False,
) -> MaskRecord:
    """Diff ``target`` against ``base`` and register the mask of updated parameters in
    ``home`` (the arguments: see :meth:`maskhub.Registry.diff`).

    A diff whose base and target fingerprints, tolerance and sweep equal those of a registered
    mask (and, with ``rank``/``stats``, one that has its analysis) registers nothing unless
    ``name`` or ``force`` is given: the registered mask is returned, with ``reused = True``.
    """
    if tol is None:
        tol = 0.0 if patch else DEFAULT_TOL
    check_tolerance(tol)
    if patch and tol > 0 and warn is not None:
        warn(f"a patch at --tol {tol:g} leaves out entries that moved by at most {tol:g}, so "
             "`maskhub apply` will not rebuild the target exactly; --tol 0 (the default with "
             "--patch) is lossless")
    check_budget(budget)
    if any(not (math.isfinite(t) and t >= 0) for t in sweep):
        raise UsageError("sweep tolerances must be finite numbers >= 0")
    if ray is not None:
        from maskhub.diff.ray import driver_device

        dev = driver_device(device)  # "cuda" is checked on the workers' nodes
    else:
        dev = resolve_stream_device(device)
    with ExitStack() as session:
        if ray is None and not (rank or stats) and home.index.writable and \
                _small(base, target):
            session.enter_context(home.index.connect(write=True))  # one connection for all
        return _diff(home, base, target, name=name, algorithm=algorithm, seed=seed,
                     dataset=dataset, tol=tol, sweep=sweep, device=device, dev=dev,
                     allow_missing=allow_missing, base_model=base_model,
                     target_model=target_model, tags=tags, notes=notes, rank=rank,
                     stats=stats, ray=ray, budget=budget, force=force, progress=progress,
                     warn=warn, patch=patch)


def _small(base: str | os.PathLike[str], target: str | os.PathLike[str]) -> bool:
    """Whether both sides are local and hold less than :data:`ONE_CONNECTION_BYTES`."""
    total = 0
    for spec in (base, target):
        path = Path(spec)
        try:
            if path.is_file():
                total += path.stat().st_size
            elif path.is_dir():
                total += sum(f.stat().st_size for f in path.glob("*.safetensors"))
            else:
                return False  # a Hub repo id
        except OSError:
            return False
    return total < ONE_CONNECTION_BYTES


def _diff(home: Home, base: str | os.PathLike[str], target: str | os.PathLike[str], *,
          name: str | None, algorithm: str | None, seed: int | None, dataset: str | None,
          tol: float, sweep: Sequence[float], device: str, dev: str, allow_missing: bool,
          base_model: str | None, target_model: str | None, tags: Sequence[str],
          notes: str | None, rank: bool, stats: bool, ray: str | None, budget: float | None,
          force: bool, progress: ProgressFn | None, warn: Callable[[str], None] | None,
          patch: bool) -> MaskRecord:
    if name is not None:
        home.check_new_name(name)
    checked = interruptible(progress)
    with safe_interrupts():  # Ctrl-C acts between tensors, never mid-commit
        base_ck = open_checkpoint(base)
        target_ck = open_checkpoint(target)
        names, skipped = match_tensors(base_ck, target_ck, allow_missing, warn)
        if patch:
            _check_patchable(base_ck, target_ck, names)
        base_name = base_model or model_name(base_ck.ref)
        target_name = target_model or model_name(target_ck.ref)
        mask_id = uuid.uuid4().hex
        tmp = home.new_store_location(mask_id)
        try:
            writer = MaskWriter(tmp)
            kernel = DiffKernel(tol=tol, sweep=sorted(set(sweep)), device=dev,
                                backend=backend_for(_input_bytes(base_ck, target_ck, names)))
            if ray is not None:
                from maskhub.diff.ray import ray_diff

                outcome = ray_diff(ray, base_ck, target_ck, names, writer, tol=tol,
                                   sweep=kernel.sweep, device=device, progress=checked,
                                   patch=patch)
            else:
                cache = StrataCache(home.home / "cache" / "strata") if home.index.writable \
                    else None
                outcome = run_diff(base_ck, target_ck, names, kernel, writer, checked, cache,
                                   patch=patch)
            same = None
            if name is None:
                with home.index.connect(write=False):  # one connection for both questions
                    if not (force or patch):  # a patch is never a rerun of a plain mask
                        same = _same_diff(home, outcome.base_fingerprint,
                                          outcome.target_fingerprint, float(tol), kernel.sweep,
                                          rank or stats)
                    name = home.default_name(target_name)
            if same is not None:
                remove_tree(tmp)
                mask = home.get(same)
                mask.reused = True
                return mask
            tensors, null = settle_null(outcome.tensors, outcome.strata, budget)
            extra: dict = {"skipped_tensors": skipped} if skipped else {}
            if null is not None:
                extra["precision_null"] = null
            analysis = []
            if rank or stats:
                from maskhub.diff.analysis import analyze_checkpoints  # imports torch

                # SVDs are compute-bound: under auto they take the GPU when there is one
                analysis_dev = resolve_device(device) if device == "auto" else dev
                analysis = analyze_checkpoints(base_ck, target_ck, names, rank=rank,
                                               stats=stats, device=analysis_dev,
                                               progress=checked)
            meta = MaskMetadata(
                id=mask_id, name=name, base_model=base_name, target_model=target_name,
                base_revision=base_ck.revision, target_revision=target_ck.revision,
                n_params=outcome.n_params, n_updated=outcome.n_updated, tol=float(tol),
                algorithm=algorithm, seed=seed, dataset=dataset,
                dtype=outcome.dtype_summary(), created_at=timestamp(), tags=tuple(tags),
                sweep=tuple(kernel.sweep), notes=notes,
                base_fingerprint=outcome.base_fingerprint,
                target_fingerprint=outcome.target_fingerprint,
                extra=extra, has_values=patch,
            )
            writer.finish(meta)
            check_interrupt()  # the last point where Ctrl-C stops the diff
        except BaseException:
            remove_tree(tmp)
            raise
        finally:
            base_ck.close()
            target_ck.close()
        return home.register_store(tmp, meta, tensors, outcome.sweep, analysis,
                                   outcome.strata)


def _check_patchable(base: Checkpoint, target: Checkpoint, names: Sequence[str]) -> None:
    for n in names:
        a, b = base.tensors[n].dtype, target.tensors[n].dtype
        if not can_convert(a, b):
            raise UsageError(f"--patch cannot rebuild tensor {n!r}: its base is {a} and its "
                             f"target {b} (a patch converts between float dtypes only)")


def _input_bytes(base: Checkpoint, target: Checkpoint, names: Sequence[str]) -> int:
    return sum(base.tensors[n].nbytes + target.tensors[n].nbytes for n in names)


def _same_diff(home: Home, base_fp: str | None, target_fp: str | None, tol: float,
               sweep: Sequence[float], analysis: bool) -> str | None:
    """The id of a registered mask made by the same diff (same content on both sides, same
    tol and sweep; with ``analysis``, one that has ``tensor_analysis`` rows), else ``None``."""
    if base_fp is None or target_fp is None:
        return None
    with home.index.connect(write=False) as con:
        rows = con.execute(
            "SELECT id, list_sort(coalesce(list_distinct((SELECT list(s.tol) FROM "
            "tensor_sweep s WHERE s.mask_id = m.id)), [])), "
            "EXISTS (SELECT 1 FROM tensor_analysis a WHERE a.mask_id = m.id) "
            "FROM masks m WHERE base_fingerprint = ? AND target_fingerprint = ? AND tol = ? "
            "AND operation IS NULL ORDER BY created_at",
            [base_fp, target_fp, tol]).fetchall()
    for mask_id, tols, has_analysis in rows:
        if [float(t) for t in tols] == sorted(float(t) for t in sweep) and \
                (has_analysis or not analysis):
            return str(mask_id)
    return None
