"""Record the update mask of a run while it trains: no checkpoint written, no dense diff later.

A :class:`Recorder` keeps θ0, the parameters when it is built (``keep="cpu"``: a copy in host
memory, pinned when the parameters live on a GPU, 2 bytes per parameter for bf16;
``keep="disk"``: a safetensors file it writes under the home's ``tmp/`` or the base checkpoint
the run started from, ``base=``, read back one tensor at a time, so host memory stays bounded
whatever the model size). On :meth:`Recorder.record` it diffs every parameter against θ0 **on
the device the parameter lives on** (float64 reference formula on a GPU, the CPU diff kernel on
the CPU: the same bits as ``maskhub diff`` of the same weights), packs the bits there and
brings back only the packed bits. Each record registers a mask ``RUN-step-N``;
:meth:`Recorder.finish` registers ``RUN-ever`` and the trajectory rows that
``maskhub trajectory`` writes (final mask = the last ``RUN-step-N``), so the trajectory SQL,
``overlap``, ``push`` and the Figure 2 / 5-7 plots work on a live run as on checkpoints.

``per_step=True`` also keeps the previous record's values (another copy of the parameters)
and counts the entries changed since the previous record (what weight sync sees); it can
register those masks too (``RUN-delta-N``). Without it the trajectory's "vs previous" column
is NULL.

Distributed: under DDP every rank holds the whole model and rank 0 records alone (the other
ranks' calls return at once). Under FSDP2 (``fully_shard``: parameters are DTensors sharded
on dim 0) every rank diffs its own shard against its own θ0 shard, and only the packed bits
(1/16 of a bf16 shard) are gathered to rank 0, which registers; no rank materialises a full
parameter. Every rank must then call :meth:`record` and :meth:`finish` (they are collective).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maskhub.analytics.trajectory import TrajectoryPoint, TrajectoryResult, record_trajectory
from maskhub.checkpoints.mapped import MappedFile
from maskhub.checkpoints.sources import open_checkpoint
from maskhub.checkpoints.writer import SafetensorsWriter
from maskhub.core.home import PARTIAL_SUFFIX, Home
from maskhub.core.interrupts import critical_section
from maskhub.core.provenance import timestamp
from maskhub.core.record import MaskRecord
from maskhub.errors import UsageError
from maskhub.kernels.bitcount import popcount
from maskhub.kernels.gpukernel import pack_on_device
from maskhub.kernels.kernel import DiffKernel, check_tolerance, updated
from maskhub.schemas.dtypes import itemsize
from maskhub.schemas.metadata import BITORDER, MaskMetadata, TensorStats
from maskhub.schemas.names import invalid_mask_name_message, parse_tensor_name, valid_mask_name
from maskhub.storage.files import remove_tree
from maskhub.storage.store import MaskWriter
from maskhub.storage.values import bits_dtype
from maskhub.training.masking import (
    _INT_OF_SIZE,
    NameMap,
    _map_name,
    canonical_name,
    unwrap_model,
)

try:  # torch.distributed is optional in some torch builds
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    dist = None  # type: ignore[assignment]
    DTensor = None  # type: ignore[assignment,misc]

KEEP = ("cpu", "disk")
KERNELS = ("auto", "cpu", "torch")
#: Entries diffed at a time on the device path (bounds the float64 temporaries, and with
#: ``keep="disk"`` the host bytes in flight).
DEVICE_CHUNK = 1 << 22


@dataclass
class _Tracked:
    """One parameter being recorded, and what this rank holds of it."""

    name: str
    param: nn.Parameter
    shape: tuple[int, ...]
    numel: int
    dtype: str
    start: int = 0            # first flat index of this rank's part
    local_numel: int = 0
    sharded: bool = False
    group: Any = None
    ranges: tuple[tuple[int, int], ...] = ()  # (start, numel) of every rank, sharded only
    snapshot: torch.Tensor | None = None       # keep="cpu": θ0 (this rank's part)
    prev: torch.Tensor | None = None            # per_step: the previous record's values
    ever: np.ndarray | None = None              # rank 0: packed ever-updated bits


def _local(p: torch.Tensor) -> torch.Tensor:
    if DTensor is not None and isinstance(p, DTensor):
        return p.to_local()
    return p


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _place_bits(full: np.ndarray, start: int, n: int, packed: np.ndarray) -> None:
    """OR ``n`` packed bits into ``full`` at bit offset ``start``."""
    if n == 0:
        return
    nb = (n + 7) // 8
    if start % 8 == 0:
        full[start // 8:start // 8 + nb] |= packed[:nb]
        return
    bits = np.unpackbits(packed[:nb], count=n, bitorder=BITORDER)
    shifted = np.packbits(np.concatenate([np.zeros(start % 8, np.uint8), bits]),
                          bitorder=BITORDER)
    full[start // 8:start // 8 + shifted.shape[0]] |= shifted


class Recorder:
    """Records the update masks of a training run as it trains (see the module docstring).

    ``model``: the model being trained (wrapped or not: DDP, ``torch.compile``, FSDP2).
    ``run``: the run's name; masks are registered as ``RUN-step-N`` and ``RUN-ever``.
    ``home``: a :class:`~maskhub.core.home.Home` (a :class:`maskhub.Registry`), a home path,
    or ``None`` for ``$MASKHUB_HOME``. ``tol``: updated iff ``|θ - θ0| > tol``.
    ``keep``: ``"cpu"`` or ``"disk"``; ``base``: with ``keep="disk"``, the checkpoint the run
    started from (safetensors directory or file), read instead of writing θ0 aside.
    ``values``: record patches (the mask of every entry whose bits changed, at tol 0, plus
    its values: ``maskhub apply RUN-step-N BASE OUT`` rebuilds the model at step N).
    ``per_step``: also count (and with ``delta_masks=True`` register) the entries changed
    since the previous record. ``step``: the step of θ0. ``kernel``: ``"auto"`` (the CPU diff
    kernel for CPU parameters, the device path elsewhere), ``"cpu"`` or ``"torch"`` (the device
    path on whatever device, also the CPU: what the tests use to cover the GPU code).
    ``strip_prefix``/``add_prefix``/``name_map``: parameter name -> checkpoint name, as in
    :func:`~maskhub.training.masking.apply_mask`. ``algorithm``, ``seed``, ``dataset``,
    ``tags``, ``base_model``, ``notes``: recorded on every mask, as ``diff`` records them.
    """

    def __init__(self, model: nn.Module, run: str, *,
                 home: Home | str | Path | None = None, tol: float | None = None,
                 keep: str = "cpu", base: str | Path | None = None, values: bool = False,
                 per_step: bool = False,
                 delta_masks: bool = False, step: int = 0, kernel: str = "auto",
                 strip_prefix: str | None = None, add_prefix: str | None = None,
                 name_map: NameMap | None = None, algorithm: str | None = None,
                 seed: int | None = None, dataset: str | None = None,
                 tags: Sequence[str] = (), base_model: str | None = None,
                 notes: str | None = None) -> None:
        """Snapshot θ0 (or check ``base``) and check the run's mask names are free."""
        if tol is None:
            tol = 0.0 if values else 1e-5
        check_tolerance(tol)
        if values and tol != 0:
            raise UsageError("values=True records a lossless patch: every entry whose bits "
                             "changed, at tol 0; drop tol or values")
        if keep not in KEEP:
            raise UsageError(f"keep must be one of {', '.join(KEEP)}, not {keep!r}")
        if kernel not in KERNELS:
            raise UsageError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
        if base is not None and keep != "disk":
            raise UsageError("base= is read back from disk: use it with keep='disk'")
        if not valid_mask_name(f"{run}-ever"):
            raise UsageError(invalid_mask_name_message(run))
        self.run, self.tol, self.keep, self.kernel = run, float(tol), keep, kernel
        self.values = values
        self.per_step, self.delta_masks = per_step or delta_masks, delta_masks
        self.meta = dict(algorithm=algorithm, seed=seed, dataset=dataset, tags=tuple(tags),
                         notes=notes)
        self.base_model = base_model or f"{run}@step-{step}"
        distributed = dist is not None and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        root = unwrap_model(model)
        params = []
        for pname, p in root.named_parameters():
            name = _map_name(canonical_name(pname), strip_prefix, add_prefix, name_map)
            if name is not None:
                params.append((name, p))
        if not params:
            raise UsageError("the model has no parameters to record")
        sharded = DTensor is not None and any(isinstance(p, DTensor) for _, p in params)
        #: Under DDP (no sharded parameter) only rank 0 records; under FSDP2 every rank does.
        self.active = self.rank == 0 or sharded
        self.home: Home | None = None
        self._home_arg = home
        if self.rank == 0:
            self.home = home if isinstance(home, Home) else Home(home)
            self.home.check_writable()
            self.home.check_new_name(f"{run}-ever")
        self.tracked: list[_Tracked] = []
        self.points: list[TrajectoryPoint] = [
            TrajectoryPoint(0, step, self.base_model, None, 0, 0, 0, 0)]
        self.records: list[MaskRecord] = []
        self.deltas: list[MaskRecord] = []
        self.last_step = step
        self.finished = False
        self._files: list[MappedFile] = []
        self._own_files: list[Path] = []
        self._base_offsets: dict[str, tuple[MappedFile, int]] = {}
        if not self.active:
            return
        with torch.no_grad():
            for name, p in params:
                self.tracked.append(self._track(name, p))
            if keep == "disk":
                self._open_disk(base)

    # -- set-up ------------------------------------------------------------------------

    def _track(self, name: str, p: nn.Parameter) -> _Tracked:
        shape = tuple(p.shape)
        t = _Tracked(name, p, shape, math.prod(shape), _dtype_name(p))
        local = _local(p).detach()
        t.local_numel = local.numel()
        if DTensor is not None and isinstance(p, DTensor):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            local_shape, offset = compute_local_shape_and_global_offset(
                p.shape, p.device_mesh, p.placements)
            if p.device_mesh.ndim != 1 or tuple(local_shape[1:]) != shape[1:]:
                raise UsageError(f"{name}: only parameters sharded on their first dimension "
                                 "over one mesh dimension (FSDP2's fully_shard) can be "
                                 "recorded")
            t.sharded = True
            t.group = p.device_mesh.get_group()
            t.start = (offset[0] if shape else 0) * math.prod(shape[1:])
            t.ranges = self._all_ranges(t)
        if self.keep == "cpu":
            snap = local.reshape(-1).to("cpu", copy=True)
            if local.device.type == "cuda":
                snap = snap.pin_memory()
            t.snapshot = snap
        if self.per_step:
            t.prev = local.reshape(-1).clone()
        if self.rank == 0:
            t.ever = np.zeros((t.numel + 7) // 8, dtype=np.uint8)
        return t

    def _all_ranges(self, t: _Tracked) -> tuple[tuple[int, int], ...]:
        dev = self._comm_device(t)
        mine = torch.tensor([t.start, t.local_numel], dtype=torch.int64, device=dev)
        world = dist.get_world_size(t.group)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=t.group)
        return tuple((int(x[0]), int(x[1])) for x in every)

    @staticmethod
    def _comm_device(t: _Tracked) -> torch.device:
        if dist.get_backend(t.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _open_disk(self, base: str | Path | None) -> None:
        """θ0 on disk: the given base checkpoint, or a file of this rank's parts written now."""
        if base is not None:
            ck = open_checkpoint(base)
            wrong = []
            for t in self.tracked:
                info = ck.tensors.get(t.name)
                if info is None or tuple(info.shape) != t.shape:
                    wrong.append(t.name if info is None else
                                 f"{t.name} {list(info.shape)} vs {list(t.shape)}")
            if wrong:
                raise UsageError(f"{base} is not this model's base: {len(wrong)} parameter(s) "
                                 f"missing or of another shape, e.g. {wrong[0]}")
            other = [t for t in self.tracked if ck.tensors[t.name].dtype != t.dtype]
            if self.values and other:
                raise UsageError(f"values=True needs θ0 in the parameters' own dtype: "
                                 f"{other[0].name} is {ck.tensors[other[0].name].dtype} in "
                                 f"{base}, {other[0].dtype} in the model")
            files: dict[Path, MappedFile] = {}
            for t in self.tracked:
                info = ck.tensors[t.name]
                if info.file not in files:
                    files[info.file] = MappedFile(info.file)
                    self._files.append(files[info.file])
                self._base_offsets[t.name] = (files[info.file], info.offset)
                t.dtype_base = info.dtype  # type: ignore[attr-defined]
            return
        path = self._snapshot_path()
        writer = SafetensorsWriter(path, [(t.name, t.dtype, (t.local_numel,))
                                          for t in self.tracked], atomic=False)
        try:
            for t in self.tracked:
                local = _local(t.param).detach().reshape(-1)
                for s in range(0, t.local_numel, DEVICE_CHUNK):
                    piece = local[s:s + DEVICE_CHUNK].to("cpu")
                    writer.write(t.name, _host_bytes(piece))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        self._own_files.append(path)
        mf = MappedFile(path)
        self._files.append(mf)
        for t in self.tracked:
            begin, _ = mf.ranges[t.name]
            self._base_offsets[t.name] = (mf, begin - t.start * itemsize(t.dtype))
            t.dtype_base = t.dtype  # type: ignore[attr-defined]

    def _snapshot_path(self) -> Path:
        """Where this rank writes θ0: a staging name in the home's ``tmp/``
        (``<id>.<pid>.partial``), which the recovery at open deletes once this process is
        gone (a run killed mid-training leaves nothing behind for long)."""
        if self.home is not None:
            directory = self.home.tmp_dir
        else:  # another FSDP rank: the home given, or $MASKHUB_HOME
            from maskhub.config import home_dir

            root = Path(self._home_arg) if isinstance(self._home_arg, (str, Path)) \
                else Path(home_dir())
            directory = root / "tmp"
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{uuid.uuid4().hex}.{os.getpid()}{PARTIAL_SUFFIX}"

    # -- diffing -----------------------------------------------------------------------

    def _base_raw(self, t: _Tracked, start: int, stop: int) -> np.ndarray:
        """Raw bytes of θ0 at this rank's local entries ``[start, stop)`` (keep="disk")."""
        mf, offset = self._base_offsets[t.name]
        size = itemsize(t.dtype_base)  # type: ignore[attr-defined]
        begin = offset + (t.start + start) * size
        return mf.buf[begin:begin + (stop - start) * size]

    def _diff(self, t: _Tracked, cur: torch.Tensor, against: torch.Tensor | None
              ) -> np.ndarray:
        """Packed bits of this rank's part of ``t`` (``cur``, flat) vs ``against`` (a flat
        tensor) or θ0 on disk (``None``)."""
        n = t.local_numel
        use_cpu = self.kernel == "cpu" or (self.kernel == "auto" and cur.device.type == "cpu")
        if use_cpu:
            kernel = self._cpu_kernel()
            b_raw = _host_bytes(cur.to("cpu") if cur.device.type != "cpu" else cur)
            if against is not None:
                a = against.to("cpu") if against.device.type != "cpu" else against
                return kernel.run_raw(_host_bytes(a), b_raw, _dtype_name(a), t.dtype, n).packed
            out = np.empty((n + 7) // 8, dtype=np.uint8)
            size_b = itemsize(t.dtype)
            fn = kernel.chunk_fn(t.dtype_base, t.dtype)  # type: ignore[attr-defined]
            counts = np.zeros(kernel.tols.shape[0], dtype=np.int64)
            for s in range(0, n, DEVICE_CHUNK):
                e = min(n, s + DEVICE_CHUNK)
                fn(self._base_raw(t, s, e), b_raw[s * size_b:e * size_b],
                   out[s // 8:(e + 7) // 8], counts)
            return out
        pieces = []
        for s in range(0, n, DEVICE_CHUNK):
            e = min(n, s + DEVICE_CHUNK)
            if against is not None:
                a = against[s:e].to(cur.device, non_blocking=True)
            else:
                a = _from_raw(self._base_raw(t, s, e),
                              t.dtype_base).to(cur.device)  # type: ignore[attr-defined]
            pieces.append(pack_on_device(updated(a, cur[s:e], self.tol)))
        if not pieces:
            return np.empty(0, dtype=np.uint8)
        return torch.cat(pieces).cpu().numpy()

    def _patch(self, t: _Tracked, cur: torch.Tensor, against: torch.Tensor | None
               ) -> tuple[np.ndarray, np.ndarray]:
        """A lossless patch of this rank's part of ``t``: the packed bits of every entry whose
        bits differ from θ0, and the current values there (raw bits, flat order)."""
        n = t.local_numel
        ubits = bits_dtype(t.dtype)
        size = itemsize(t.dtype)
        if self.kernel == "cpu" or (self.kernel == "auto" and cur.device.type == "cpu"):
            b = _host_bytes(cur.to("cpu") if cur.device.type != "cpu" else cur).view(ubits)
            packed = np.empty((n + 7) // 8, dtype=np.uint8)
            parts = []
            for s in range(0, n, DEVICE_CHUNK):
                e = min(n, s + DEVICE_CHUNK)
                if against is not None:
                    a = _host_bytes(against[s:e].to("cpu")).view(ubits)
                else:
                    a = self._base_raw(t, s, e).view(ubits)
                differs = a != b[s:e]
                packed[s // 8:(e + 7) // 8] = np.packbits(differs, bitorder=BITORDER)
                parts.append(b[s:e][differs])
            vals = np.concatenate(parts) if parts else np.empty(0, dtype=ubits)
            return packed, vals
        as_int = _INT_OF_SIZE[size]
        pieces, picked = [], []
        for s in range(0, n, DEVICE_CHUNK):
            e = min(n, s + DEVICE_CHUNK)
            if against is not None:
                a = against[s:e].to(cur.device, non_blocking=True)
            else:
                a = _from_raw(self._base_raw(t, s, e), t.dtype).to(cur.device)
            b = cur[s:e].view(as_int)
            differs = a.view(as_int) != b
            pieces.append(pack_on_device(differs))
            picked.append(b[differs])
        if not pieces:
            return np.empty(0, dtype=np.uint8), np.empty(0, dtype=ubits)
        packed = torch.cat(pieces).cpu().numpy()
        vals = torch.cat(picked).cpu().numpy().view(ubits)
        return packed, vals

    def _full_values(self, t: _Tracked, local: np.ndarray) -> np.ndarray | None:
        """The whole parameter's patch values on rank 0, in flat order (``None`` elsewhere):
        each rank's values, gathered as raw bytes and joined in rank order (FSDP2's dim-0
        shards follow one another in flat order)."""
        if not t.sharded:
            return local if self.rank == 0 else None
        dev = self._comm_device(t)
        mine = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
        counts = [torch.empty_like(mine) for _ in t.ranges]
        dist.all_gather(counts, mine, group=t.group)
        size = local.dtype.itemsize
        width = max(1, max(int(c) for c in counts) * size)
        buf = torch.zeros(width, dtype=torch.uint8, device=dev)
        raw = local.view(np.uint8)
        if raw.shape[0]:
            buf[:raw.shape[0]] = torch.from_numpy(raw.copy()).to(dev)
        root = dist.get_global_rank(t.group, 0)
        gathered = [torch.empty_like(buf) for _ in t.ranges] if dist.get_rank() == root \
            else None
        dist.gather(buf, gathered, dst=root, group=t.group)
        if gathered is None:
            return None
        order = sorted(range(len(t.ranges)), key=lambda r: t.ranges[r][0])
        joined = np.concatenate([gathered[r].cpu().numpy()[:int(counts[r]) * size]
                                 for r in order])
        return joined.view(local.dtype)

    def _cpu_kernel(self) -> DiffKernel:
        if not hasattr(self, "_kernel"):
            self._kernel = DiffKernel(tol=self.tol)
        return self._kernel

    def _full_bits(self, t: _Tracked, local_bits: np.ndarray) -> np.ndarray | None:
        """The whole parameter's packed bits on rank 0 (``None`` on the other ranks)."""
        if not t.sharded:
            return local_bits if self.rank == 0 else None
        dev = self._comm_device(t)
        width = max(1, max((n + 7) // 8 for _, n in t.ranges))
        buf = torch.zeros(width, dtype=torch.uint8, device=dev)
        if local_bits.shape[0]:
            buf[:local_bits.shape[0]] = torch.from_numpy(local_bits).to(dev)
        root = dist.get_global_rank(t.group, 0)
        is_root = dist.get_rank() == root
        gathered = [torch.empty_like(buf) for _ in t.ranges] if is_root else None
        dist.gather(buf, gathered, dst=root, group=t.group)
        if not is_root:
            return None
        full = np.zeros((t.numel + 7) // 8, dtype=np.uint8)
        for (start, n), g in zip(t.ranges, gathered, strict=True):
            _place_bits(full, start, n, g.cpu().numpy())
        return full

    # -- recording ---------------------------------------------------------------------

    def record(self, step: int) -> MaskRecord | None:
        """Diff the model against θ0 now and register ``RUN-step-STEP`` (on rank 0; other
        ranks return ``None``). Steps must increase."""
        if self.finished:
            raise UsageError(f"recorder of {self.run!r} is finished")
        if step <= self.last_step:
            raise UsageError(f"step {step} recorded after step {self.last_step}: the steps "
                             "of a recording must increase")
        if not self.active:
            self.last_step = step
            return None
        name = f"{self.run}-step-{step}"
        delta_name = f"{self.run}-delta-{step}"
        writer = delta_writer = None
        tmp = delta_tmp = None
        if self.home is not None:
            self.home.check_new_name(name)
            if self.delta_masks:
                self.home.check_new_name(delta_name)
            mask_id = uuid.uuid4().hex
            tmp = self.home.new_store_location(mask_id)
            writer = MaskWriter(tmp)
            if self.delta_masks:
                delta_id = uuid.uuid4().hex
                delta_tmp = self.home.new_store_location(delta_id)
                delta_writer = MaskWriter(delta_tmp)
        try:
            stats, delta_stats = [], []
            n_first = n_prev = n_ever = 0
            dtypes: set[str] = set()
            with torch.no_grad():
                for t in self.tracked:
                    cur = _local(t.param).detach().reshape(-1)
                    vals = None
                    if self.values:
                        local_bits, local_vals = self._patch(t, cur, t.snapshot)
                        bits = self._full_bits(t, local_bits)
                        vals = self._full_values(t, local_vals)
                    else:
                        bits = self._full_bits(t, self._diff(t, cur, t.snapshot))
                    prev_bits = None
                    if self.per_step:
                        prev_bits = self._full_bits(t, self._diff(t, cur, t.prev))
                        t.prev.copy_(cur)
                    if bits is None:
                        continue
                    layer, module = parse_tensor_name(t.name)
                    common = dict(shape=t.shape, numel=t.numel, layer=layer, module=module,
                                  base_dtype=getattr(t, "dtype_base", t.dtype),
                                  target_dtype=t.dtype)
                    n = popcount(bits)
                    s = TensorStats(t.name, n_updated=n, **common)
                    writer.add(s, bits, values=vals)
                    stats.append(s)
                    np.bitwise_or(t.ever, bits, out=t.ever)
                    n_first += n
                    n_ever += popcount(t.ever)
                    dtypes.add(t.dtype)
                    if prev_bits is not None:
                        n_p = popcount(prev_bits)
                        n_prev += n_p
                        if delta_writer is not None:
                            ds = TensorStats(t.name, n_updated=n_p, **common)
                            delta_writer.add(ds, prev_bits)
                            delta_stats.append(ds)
            if self.home is None:
                self.last_step = step
                return None
            n_params = sum(s.numel for s in stats)
            meta = self._metadata(mask_id, name, step, n_params, n_first, dtypes)
            writer.finish(meta)
            delta_meta = None
            if delta_writer is not None:
                delta_meta = self._metadata(delta_id, delta_name, step, n_params, n_prev,
                                            dtypes, base=self.points[-1].checkpoint,
                                            operation="record-delta")
                delta_writer.finish(delta_meta)
        except BaseException:
            for path in (tmp, delta_tmp):
                if path is not None:
                    remove_tree(path)
            raise
        with critical_section(), self.home.index.connect():
            try:
                mask = self.home.register_store(tmp, meta, stats)
            except BaseException:
                if delta_tmp is not None:
                    remove_tree(delta_tmp)
                raise
            if delta_meta is not None:
                self.deltas.append(self.home.register_store(delta_tmp, delta_meta,
                                                            delta_stats))
        self.records.append(mask)
        self.points.append(TrajectoryPoint(len(self.points), step, meta.target_model, None,
                                           n_first, n_prev if self.per_step else None,
                                           n_ever, 0))
        self.last_step = step
        return mask

    def _metadata(self, mask_id: str, name: str, step: int, n_params: int, n_updated: int,
                  dtypes: set[str], *, base: str | None = None,
                  operation: str = "record") -> MaskMetadata:
        return MaskMetadata(
            id=mask_id, name=name, base_model=base or self.base_model,
            target_model=f"{self.run}@step-{step}", n_params=n_params, n_updated=n_updated,
            tol=self.tol, dtype="+".join(sorted(dtypes)), created_at=timestamp(),
            operation=operation, extra={"run": self.run, "step": step, "keep": self.keep},
            has_values=self.values and operation == "record", **self.meta)

    def finish(self) -> TrajectoryResult | None:
        """Register ``RUN-ever`` and the trajectory rows (rank 0; ``None`` elsewhere), and
        free θ0. The final subnetwork is the last record's mask."""
        if self.finished:
            raise UsageError(f"recorder of {self.run!r} is already finished")
        self.finished = True
        try:
            if self.home is None:
                return None
            if not self.records:
                raise UsageError(f"nothing was recorded for {self.run!r}: call record(step) "
                                 "at least once before finish()")
            return self._finish()
        finally:
            self.close()

    def _finish(self) -> TrajectoryResult:
        final = self.records[-1]
        # Figure 6: updated at record k but not in the final subnetwork, read back from the
        # registered masks one tensor at a time.
        for t in self.tracked:
            not_final = np.invert(final.packed(t.name))
            for point, rec in zip(self.points[1:-1], self.records[:-1], strict=True):
                point.n_not_in_final += popcount(np.bitwise_and(rec.packed(t.name), not_final))
        ever_id = uuid.uuid4().hex
        tmp = self.home.new_store_location(ever_id)
        try:
            writer = MaskWriter(tmp)
            stats = []
            for t, fs in zip(self.tracked, final.tensor_stats(), strict=True):
                s = TensorStats(t.name, fs.shape, fs.numel, popcount(t.ever), fs.layer,
                                fs.module, fs.base_dtype, fs.target_dtype)
                writer.add(s, t.ever)
                stats.append(s)
            n_ever = sum(s.n_updated for s in stats)
            meta = MaskMetadata(
                id=ever_id, name=f"{self.run}-ever", base_model=self.base_model,
                target_model=final.row["target_model"], n_params=final.n_params,
                n_updated=n_ever, tol=self.tol, dtype=final.row["dtype"] or "",
                created_at=timestamp(), operation="trajectory-ever",
                extra={"run": self.run}, **self.meta)
            writer.finish(meta)
        except BaseException:
            remove_tree(tmp)
            raise
        with critical_section(), self.home.index.connect():
            ever = self.home.register_store(tmp, meta, stats)
            result = TrajectoryResult(
                id=uuid.uuid4().hex, name=self.run, tol=self.tol, n_params=final.n_params,
                points=self.points, n_never=final.n_params - n_ever,
                n_cancelled=n_ever - final.n_updated, n_subnetwork=final.n_updated,
                final=final, ever=ever, extra={"source": "live"})
            record_trajectory(self.home, result)
        return result

    def close(self) -> None:
        """Free θ0: drop the host copies, unmap and delete the snapshot file written here."""
        for t in self.tracked:
            t.snapshot = t.prev = None
        for f in self._files:
            f.close()
        self._files.clear()
        for path in self._own_files:
            path.unlink(missing_ok=True)
        self._own_files.clear()

    def host_bytes(self) -> dict[str, int]:
        """Host memory this recorder holds: θ0 copies, previous values, packed bits."""
        snap = sum(t.snapshot.numel() * t.snapshot.element_size() for t in self.tracked
                   if t.snapshot is not None)
        prev = sum(t.prev.numel() * t.prev.element_size() for t in self.tracked
                   if t.prev is not None and t.prev.device.type == "cpu")
        bits = sum(t.ever.nbytes for t in self.tracked if t.ever is not None)
        return {"snapshot": snap, "previous": prev, "packed_bits": bits}

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.finished:
            if exc[0] is None:
                self.finish()
            else:
                self.finished = True
                self.close()


def _host_bytes(t: torch.Tensor) -> np.ndarray:
    """Raw bytes of a contiguous CPU tensor as a uint8 view."""
    flat = t.reshape(-1).contiguous()
    if flat.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return flat.view(torch.uint8).numpy()


def _from_raw(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """A CPU tensor of ``dtype`` over a copy of raw bytes (the mapping is read-only)."""
    if raw.shape[0] == 0:
        return torch.empty(0, dtype=getattr(torch, dtype))
    return torch.from_numpy(np.array(raw, copy=True)).view(getattr(torch, dtype))
