"""``maskhub import PATCH.safetensors --base BASE``: register a trainer's sparse patch as a
patch of maskhub's own (a mask plus the target's values, :mod:`maskhub.storage.values`).

The patch (:mod:`maskhub.checkpoints.patches`: TRL delta sync, vLLM checkpoint patches, the
generic ``NAME.indices`` + ``NAME.values``) is read against BASE, the checkpoint it patches,
one tensor at a time: BASE's values are read only at the patch's positions (``mmap``).
Call TARGET the patched weights. The registered mask is what ``maskhub diff --patch BASE
TARGET`` gives, with the values of TARGET at its entries:

* ``--tol 0`` (the default): lossless. An entry is in the mask iff the patch sets it to
  other *bits* than BASE's (a value change, and also +0 <-> -0 and a NaN payload change),
  so ``maskhub apply`` rebuilds TARGET bit for bit. An entry the patch lists with BASE's own
  bits is not in the mask.
* ``--tol t > 0``: an entry is in the mask iff ``|v − θ0| > t`` (the kernel's exact
  definition, as ``maskhub diff --tol t``); entries that moved by at most ``t`` are left
  out, so the rebuilt tensor is not TARGET (a warning says so).

Entries the patch does not list are BASE's and never in the mask. The mask gets magnitude
strata (from BASE's exponents: one read of BASE), ``operation`` ``import`` and
``extra.import`` = ``{"format": "patch:<layout>", "source": <file name>,
"base_step"/"target_step": <steps from the patch's metadata>}``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from maskhub.analytics.patch_replay import diff_entries, pack_positions
from maskhub.analytics.patch_trajectory import check_against_base
from maskhub.checkpoints.mapped import MappedCheckpoint
from maskhub.checkpoints.patch_checksum import verify_checksum
from maskhub.checkpoints.patches import SUFFIXES, open_patch
from maskhub.checkpoints.sources import open_checkpoint
from maskhub.core.provenance import model_name, timestamp
from maskhub.kernels.kernel import DiffKernel, backend_for, check_tolerance
from maskhub.kernels.strata import BINS, strata_fn, strata_rows
from maskhub.schemas.dtypes import itemsize
from maskhub.schemas.metadata import MaskMetadata, TensorStats
from maskhub.schemas.names import mask_name_from, parse_tensor_name
from maskhub.schemas.progress import ProgressFn
from maskhub.storage.files import remove_tree
from maskhub.storage.store import MaskWriter
from maskhub.storage.values import storage_dtype

if TYPE_CHECKING:
    from maskhub.core.home import Home
    from maskhub.core.record import MaskRecord

_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def looks_like_patch(source: object) -> bool:
    """Whether ``source`` is a ``.safetensors`` file holding ``NAME.indices``/``NAME.idx``
    arrays (a sparse patch, not a file of masks). Reads the header only."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        pf = open_patch(path)
    except Exception:  # not readable as a patch: the mask importer says why
        return False
    try:
        idx_suffixes = tuple(i for i, _ in SUFFIXES)
        return any(k and k.endswith(idx_suffixes) for k, _ in pf.entries.values())
    finally:
        pf.close()


def import_patch(registry: Home, source: str | os.PathLike[str], base_spec: str, *,
                 name: str | None = None, base_model: str | None = None,
                 target_model: str | None = None, base_revision: str | None = None,
                 target_revision: str | None = None, tol: float | None = None,
                 algorithm: str | None = None, seed: int | None = None,
                 dataset: str | None = None, tags: Sequence[str] = (),
                 notes: str | None = None, progress: ProgressFn | None = None,
                 warn: Callable[[str], None] | None = None) -> MaskRecord:
    """Register the patch ``source`` of the checkpoint ``base_spec`` (mask and values, see
    the module); nothing is registered if the patch does not fit the base."""
    tol = 0.0 if tol is None else tol
    check_tolerance(tol)
    if tol > 0 and warn is not None:
        warn(f"at --tol {tol:g} the entries the patch moves by at most {tol:g} are left out, "
             "so `maskhub apply` will not rebuild the patched weights exactly; --tol 0 (the "
             "default) is lossless")
    base = open_checkpoint(base_spec)
    pf = None
    try:
        pf = open_patch(source)
        check_against_base(pf, base)
        verify_checksum(base, [pf])  # TRL #5417's checksum_sha256, when the patch has one
        if name is not None:
            registry.check_new_name(name)
        else:
            name = registry.free_name(mask_name_from(pf.path.stem, "imported"))
        mask_id = uuid.uuid4().hex
        tmp = registry.new_store_location(mask_id)
        kernel = DiffKernel(tol=tol, backend=backend_for(pf.nbytes))
        try:
            writer = MaskWriter(tmp)
            stats: list[TensorStats] = []
            strata: list[tuple[str, int, int, int]] = []
            names = list(base.tensors)
            with MappedCheckpoint(base) as mapped:
                for i, tname in enumerate(names):
                    info = base.tensors[tname]
                    raw = mapped.region(tname).raw()
                    if tname in pf.entries:
                        pt = pf.read(tname, info.shape, info.dtype)
                        at_base = raw.view(_RAW[itemsize(info.dtype)])[pt.indices]
                        if tol == 0:  # lossless: every entry whose bits change
                            upd = at_base != pt.values
                        else:
                            upd = diff_entries(kernel, at_base, pt.values, info.dtype)
                        positions = pt.indices[upd]
                        values = pt.values[upd]
                    else:
                        positions = np.zeros(0, np.int64)
                        values = np.zeros(0, _RAW[itemsize(info.dtype)])
                    packed = pack_positions(positions, info.numel)
                    layer, module = parse_tensor_name(tname)
                    st = TensorStats(tname, info.shape, info.numel, int(positions.shape[0]),
                                     layer, module, base_dtype=info.dtype,
                                     target_dtype=info.dtype)
                    if info.numel:
                        sfn = strata_fn(info.dtype, "numba" if kernel.backend == "numba"
                                        else "numpy")
                        counts = np.zeros((2, BINS), dtype=np.int64)
                        sfn(raw, packed, info.numel, counts)
                        strata.extend(strata_rows(tname, info.dtype, counts))
                    writer.add(st, packed, values.view(storage_dtype(info.dtype)))
                    stats.append(st)
                    if progress is not None:
                        progress(i + 1, len(names), i + 1, len(names), tname)
            steps = {k: v for k, v in (("base_step", pf.base_step),
                                       ("target_step", pf.target_step)) if v is not None}
            meta = MaskMetadata(
                id=mask_id, name=name, base_model=base_model or model_name(base.ref),
                base_revision=base_revision or base.revision,
                target_model=target_model or name, target_revision=target_revision,
                n_params=sum(s.numel for s in stats),
                n_updated=sum(s.n_updated for s in stats), tol=float(tol),
                dtype=base.tensors[names[0]].dtype if names else "", algorithm=algorithm,
                seed=seed, dataset=dataset, created_at=timestamp(), tags=tuple(tags),
                operation="import", notes=notes, has_values=True,
                extra={"import": {"format": f"patch:{pf.layout}", "source": pf.label,
                                  **steps}})
            writer.finish(meta)
        except BaseException:
            remove_tree(tmp)
            raise
    finally:
        if pf is not None:
            pf.close()
        base.close()
    return registry.register_store(tmp, meta, stats, strata=strata)
