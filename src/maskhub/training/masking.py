"""Masked training: train only the parameters that a mask marks as updated.

:func:`apply_mask` puts two things on every parameter that a mask covers:

* a post-accumulate-grad hook that turns the gradient into ``m ⊙ ∇θL`` as soon as it is
  accumulated. It fires for plain modules, for DDP (before the gradient is copied into the
  all-reduce bucket) and for FSDP2 (on the reduce-scattered ``DTensor`` gradient, where the
  matching slice of the mask is applied to the local shard);
* in *exact* mode (the default), a global optimizer step post-hook that writes θ0 back into
  the frozen entries after every ``step()`` of any ``torch.optim`` optimizer holding the
  parameter. Gradient masking alone does not stop weight decay, or momentum from earlier
  steps, from moving frozen entries; the restore does, whatever the optimizer does.

The mask is kept on the parameter's device packed at one bit per parameter (uint8, little
bit order, as stored) and unpacked a chunk at a time inside the hooks. The exact mode keeps
a compact copy of only the frozen values of θ0: ``(1 - density) × numel × itemsize`` bytes
per parameter, on the parameter's device or in host memory (``snapshot_device="cpu"``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from maskhub.errors import MaskMismatchError, UsageError
from maskhub.schemas.metadata import BITORDER
from maskhub.schemas.modelfit import another_model
from maskhub.training.mask_sources import (  # noqa: F401  (re-exported: maskhub.torch)
    DictMask,
    MaskLike,
    StoreMask,
    listing,
    resolve_mask,
)

try:  # torch.distributed is optional in some torch builds
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

#: Entries unpacked at a time (multiples of 8, so that chunks start on whole bytes).
CPU_CHUNK = 1 << 20
DEVICE_CHUNK = 1 << 24
#: Name components that wrappers insert into ``named_parameters()`` and that masks never have.
WRAPPER_PARTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
POLICIES_MISSING = ("error", "freeze", "train")
POLICIES_EXTRA = ("error", "ignore")

NameMap = Callable[[str], "str | None"] | Mapping[str, str]
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# -- name matching ------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / ``torch.compile`` wrappers (names without
    their ``module.`` / ``_orig_mod.`` prefixes)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def canonical_name(name: str) -> str:
    """A parameter name without the components that wrappers insert (see WRAPPER_PARTS)."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _map_name(name: str, strip_prefix: str | None, add_prefix: str | None,
              name_map: NameMap | None) -> str | None:
    if strip_prefix and name.startswith(strip_prefix):
        name = name[len(strip_prefix):]
    if add_prefix:
        name = add_prefix + name
    if name_map is None:
        return name
    if isinstance(name_map, Mapping):
        return name_map.get(name, name)
    return name_map(name)


def _prefix_hint(extra: Sequence[str], missing: Sequence[str], targets: set[str]) -> str:
    """Suggest the strip_prefix/add_prefix option that maps most unmatched mask names."""
    candidates: set[tuple[str, str]] = set()
    for e in extra:
        if "." in e:
            candidates.add(("strip_prefix", e.split(".", 1)[0] + "."))
        for m in missing:
            if m.endswith("." + e):
                candidates.add(("add_prefix", m[: len(m) - len(e)]))
    best, best_n = None, 0
    for option, prefix in sorted(candidates):
        if option == "strip_prefix":
            n = sum(e.startswith(prefix) and e[len(prefix):] in targets for e in extra)
        else:
            n = sum(prefix + e in targets for e in extra)
        if n > best_n:
            best, best_n = (option, prefix), n
    if best is None:
        return ""
    return f"; hint: {best[0]}={best[1]!r} matches {best_n} of the {len(extra)}"


class _Match:
    """Which parameter each mask tensor maps to."""

    def __init__(self) -> None:
        self.params: dict[int, tuple[str, nn.Parameter, list[str]]] = {}
        self.missing: list[str] = []     # trainable parameters the mask lacks
        self.missing_params: list[nn.Parameter] = []
        self.extra: list[str] = []       # mask tensors the model lacks
        self.buffers: list[str] = []     # mask tensors that are buffers of the model
        self.untrainable: list[str] = []  # mask tensors of parameters with requires_grad=False


def match_parameters(model: nn.Module, mask: MaskLike, *, strip_prefix: str | None = None,
                     add_prefix: str | None = None, name_map: NameMap | None = None,
                     missing: str = "error", extra: str = "error") -> _Match:
    """Map mask tensor names onto ``model.named_parameters()`` (tied aliases included).

    Raises one :class:`MaskMismatchError` listing the mask tensors the model lacks, the
    trainable parameters the mask lacks and any shape difference, unless ``missing`` /
    ``extra`` say to go on.
    """
    root = unwrap_model(model)
    by_name: dict[str, nn.Parameter] = {}
    for n, p in root.named_parameters(remove_duplicate=False):
        by_name[canonical_name(n)] = p
    buffers = {canonical_name(n) for n, _ in root.named_buffers(remove_duplicate=False)}
    primary = {id(p): canonical_name(n) for n, p in root.named_parameters()}
    shapes = {s.tensor: tuple(s.shape) for s in mask.tensor_stats()}
    match = _Match()
    bad_shapes: list[str] = []
    unmapped: list[str] = []
    for mask_name in mask.tensor_names():
        target = _map_name(mask_name, strip_prefix, add_prefix, name_map)
        if target is None:
            continue
        param = by_name.get(target)
        if param is None:
            (match.buffers if target in buffers else unmapped).append(mask_name)
            continue
        if tuple(param.shape) != shapes[mask_name]:
            bad_shapes.append(f"{mask_name} {list(shapes[mask_name])} in the mask vs "
                              f"{list(param.shape)} in the model")
            continue
        if not param.requires_grad:
            match.untrainable.append(mask_name)
            continue
        entry = match.params.setdefault(id(param), (primary[id(param)], param, []))
        entry[2].append(mask_name)
    seen: set[int] = set()
    for n, p in by_name.items():
        if p.requires_grad and id(p) not in match.params and id(p) not in seen:
            seen.add(id(p))
            match.missing.append(n)
            match.missing_params.append(p)
    match.extra = unmapped
    label = getattr(mask, "name", None)
    # (tensors the name mapping skips do not count; buffers count as the model's tensors)
    buffer_shapes = {canonical_name(n): tuple(b.shape)
                     for n, b in root.named_buffers(remove_duplicate=False)}
    considered: dict[str, tuple[int, ...]] = {}
    model_shapes: dict[str, tuple[int, ...]] = {}
    for mask_name, shape in shapes.items():
        target = _map_name(mask_name, strip_prefix, add_prefix, name_map)
        if target is None:
            continue
        considered[mask_name] = shape
        if target in by_name:
            model_shapes[mask_name] = tuple(by_name[target].shape)
        elif target in buffer_shapes:
            model_shapes[mask_name] = buffer_shapes[target]
    why = another_model(considered, model_shapes)
    if why is not None and not _prefix_hint(unmapped, match.missing, set(by_name)):
        raise MaskMismatchError(
            (f"mask {label!r}" if label else "the mask") + f" is a mask of another model: {why}",
            unmapped, match.missing, bad_shapes)
    fail_extra = bool(unmapped) and extra == "error"
    fail_missing = bool(match.missing) and missing == "error"
    if fail_extra or fail_missing or bad_shapes:
        parts = [f"mask {label!r} does not match the model" if label else
                 "the mask does not match the model"]
        if unmapped:
            parts.append(f"{len(unmapped)} mask tensor(s) have no parameter in the model: "
                         + listing(unmapped))
        if match.missing:
            parts.append(f"{len(match.missing)} trainable parameter(s) have no tensor in the "
                         "mask: " + listing(match.missing))
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} shape(s) differ: " + listing(bad_shapes, 3))
        message = "; ".join(parts) + _prefix_hint(unmapped, match.missing, set(by_name))
        message += (" (map names with strip_prefix/add_prefix/name_map; missing='freeze' or "
                    "'train' and extra='ignore' accept the difference)")
        raise MaskMismatchError(message, unmapped, match.missing, bad_shapes)
    return match


# -- packed-bit kernels -------------------------------------------------------------------

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _use_numpy(device: torch.device) -> bool:
    """Host tensors go through numpy (``unpackbits`` is ~8x faster than torch ops on CPU)."""
    return device.type == "cpu"


def _unpack(packed: torch.Tensor, start: int, stop: int, invert: bool = False) -> torch.Tensor:
    """Bits ``[start, stop)`` of ``packed`` as a uint8 tensor of 0/1 on its device
    (``start % 8 == 0``; ``.view(torch.bool)`` for a boolean mask); ``invert``: the
    complement (1 = frozen)."""
    chunk = packed[start // 8: (stop + 7) // 8]
    count = stop - start
    if _use_numpy(chunk.device):
        raw = chunk.numpy()
        if invert:
            raw = np.invert(raw)
        return torch.from_numpy(np.unpackbits(raw, count=count, bitorder=BITORDER))
    if invert:
        chunk = torch.bitwise_not(chunk)
    shifts = _SHIFTS.get(chunk.device)
    if shifts is None:
        shifts = _SHIFTS[chunk.device] = torch.arange(8, dtype=torch.uint8, device=chunk.device)
    bits = torch.bitwise_right_shift(chunk.unsqueeze(1), shifts).bitwise_and_(1)
    return bits.view(-1)[:count]


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """Same memory as an integer tensor (bit-exact copies and compares; bf16 has no numpy)."""
    size = t.element_size()
    return t.view(_INT_OF_SIZE[size]) if size in _INT_OF_SIZE and t.dtype.is_floating_point \
        else t


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, else the tensor itself."""
    if DTensor is not None and isinstance(t, DTensor):
        with torch.no_grad():
            return t.to_local()
    return t


def _local_bits(full: np.ndarray, shape: tuple[int, ...], param: torch.Tensor) -> np.ndarray:
    """The packed bits of the part of a (possibly sharded) parameter held by this rank."""
    if DTensor is None or not isinstance(param, DTensor):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements)
    numel = math.prod(local_shape)
    if tuple(local_shape[1:]) == tuple(shape[1:]):  # whole rows: a contiguous range of bits
        start = (offset[0] if shape else 0) * math.prod(shape[1:])
        bits = np.unpackbits(full[start // 8: (start + numel + 7) // 8], bitorder=BITORDER)
        bits = bits[start % 8: start % 8 + numel]
    else:
        dense = np.unpackbits(full, count=math.prod(shape), bitorder=BITORDER).reshape(shape)
        bits = dense[tuple(slice(o, o + n) for o, n in zip(offset, local_shape, strict=True))]
    return np.packbits(bits.reshape(-1), bitorder=BITORDER)


class MaskedParameter:
    """One parameter under a mask: its packed bits, hooks and frozen-value snapshot."""

    def __init__(self, name: str, param: nn.Parameter, bits: np.ndarray, exact: bool,
                 snapshot_device: torch.device | None) -> None:
        """``bits``: packed trainable bits of the local part of ``param``."""
        self.name = name
        self.param = param
        local = _local(param)
        self.numel = local.numel()
        bits = bits.copy()
        if self.numel % 8 and bits.size:
            bits[-1] &= (1 << (self.numel % 8)) - 1
        device = local.device
        self.chunk = CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK
        byte_counts = np.bitwise_count(bits).astype(np.int64)
        trainable = np.add.reduceat(byte_counts, np.arange(0, bits.size, self.chunk // 8)) \
            if bits.size else np.zeros(0, np.int64)
        lengths = np.minimum(self.chunk, self.numel - np.arange(trainable.size) * self.chunk)
        self.n_trainable = int(trainable.sum())
        self.n_frozen = self.numel - self.n_trainable
        # Start of each chunk's frozen values in the compact snapshot.
        self.offsets = [0, *np.cumsum(lengths - trainable).tolist()]
        self.packed = torch.from_numpy(bits).to(device)
        self.snapshot: torch.Tensor | None = None
        self._snapshot_follows = snapshot_device is None
        self.hook = None
        if exact and self.n_frozen:
            self.snapshot = self._gather(local, snapshot_device or device)

    def _chunks(self) -> Iterator[tuple[int, int, int, int]]:
        for i, start in enumerate(range(0, self.numel, self.chunk)):
            yield start, min(self.numel, start + self.chunk), self.offsets[i], self.offsets[i + 1]

    def _follow(self, local: torch.Tensor) -> None:
        """Keep the bits (and the snapshot, unless placed by the user) on the parameter's
        device if the model was moved after the mask was applied."""
        if self.packed.device != local.device:
            self.packed = self.packed.to(local.device)
            if self.snapshot is not None and self._snapshot_follows:
                self.snapshot = self.snapshot.to(local.device)

    def _gather(self, local: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The frozen values of ``local``, in order, on ``device``."""
        pin = device.type == "cpu" and local.device.type == "cuda"
        out = torch.empty(self.n_frozen, dtype=local.dtype, device=device, pin_memory=pin)
        flat = local.detach().reshape(-1)
        for start, stop, a, b in self._chunks():
            frozen = _unpack(self.packed, start, stop, invert=True).view(torch.bool)
            if _use_numpy(flat.device) and device.type == "cpu":
                np.compress(frozen.numpy(), _as_bits(flat[start:stop]).numpy(),
                            out=_as_bits(out[a:b]).numpy())
            else:
                out[a:b].copy_(torch.masked_select(flat[start:stop], frozen))
        return out

    def mask_grad(self, grad: torch.Tensor) -> None:
        """``grad = m ⊙ grad`` in place (``grad``: the local gradient of the parameter);
        frozen entries become exactly 0, even where the gradient was NaN or inf."""
        if self.n_frozen == 0:
            return
        if self.n_frozen == self.numel:
            grad.zero_()
            return
        self._follow(grad)
        if not grad.is_contiguous():  # rare: mask through a contiguous copy
            fixed = grad.contiguous()
            self.mask_grad(fixed)
            grad.copy_(fixed)
            return
        flat = grad.detach().view(-1)
        # On the host: an AND of the bit patterns with 0 / all-ones in numpy, which runs no
        # OpenMP region (torch ops here stall on a busy machine) and supports bf16.
        host = _use_numpy(flat.device) and flat.dtype.is_floating_point \
            and flat.element_size() in _INT_OF_SIZE
        for start, stop, _, _ in self._chunks():
            if host:
                keep = _unpack(self.packed, start, stop).numpy().view(np.int8)
                np.negative(keep, out=keep)  # 1 -> -1: all bits set
                ints = _as_bits(flat[start:stop]).numpy()
                np.bitwise_and(ints, keep, out=ints)
            else:
                frozen = _unpack(self.packed, start, stop, invert=True).view(torch.bool)
                flat[start:stop].masked_fill_(frozen, 0)

    def restore(self) -> None:
        """Write the snapshot of θ0 back into the frozen entries."""
        if self.snapshot is None:
            return
        local = _local(self.param).detach()
        self._follow(local)
        if local.dtype != self.snapshot.dtype:
            raise UsageError(f"parameter {self.name} changed dtype after the mask was applied; "
                             "apply the mask after moving and casting the model")
        if not local.is_contiguous():  # rare: restore through a contiguous copy
            fixed = local.contiguous()
            self._restore_flat(fixed.view(-1))
            local.copy_(fixed)
            return
        self._restore_flat(local.view(-1))

    def _restore_flat(self, flat: torch.Tensor) -> None:
        assert self.snapshot is not None
        if self.n_frozen == self.numel:  # a wholly frozen tensor (layer norms, in the paper)
            flat.copy_(self.snapshot, non_blocking=True)
            return
        host = _use_numpy(flat.device) and self.snapshot.device.type == "cpu"
        for start, stop, a, b in self._chunks():
            frozen = _unpack(self.packed, start, stop, invert=True).view(torch.bool)
            src = self.snapshot[a:b]
            if host:  # index arrays beat boolean-mask assignment ~1.5x in numpy
                idx = np.flatnonzero(frozen.numpy())
                _as_bits(flat[start:stop]).numpy()[idx] = _as_bits(src).numpy()
            else:
                flat[start:stop].masked_scatter_(frozen, src.to(flat.device, non_blocking=True))

    def drift(self) -> int:
        """Frozen entries whose bits differ from θ0 now (exact mode only)."""
        if self.snapshot is None:
            return 0
        local = _local(self.param).detach()
        self._follow(local)
        now = self._gather(local, self.snapshot.device)
        return int((_as_bits(now) != _as_bits(self.snapshot)).sum())

    @property
    def nbytes(self) -> tuple[int, int]:
        """Bytes of the packed mask and of the snapshot."""
        snap = self.snapshot.numel() * self.snapshot.element_size() if self.snapshot is not None \
            else 0
        return self.packed.numel(), snap


# -- the handle ---------------------------------------------------------------------------


class MaskHandle:
    """What :func:`apply_mask` returns: the masked parameters and ``remove()``.

    Also a context manager: the mask is removed on exit.
    """

    def __init__(self, mask_name: str | None, exact: bool) -> None:
        """Empty handle; :func:`apply_mask` fills it."""
        self.mask_name = mask_name
        self.exact = exact
        self.masked: dict[str, MaskedParameter] = {}
        self.unmasked: list[str] = []      # trainable parameters left alone (missing="train")
        self.ignored: list[str] = []       # mask tensors not applied (buffers, extra, frozen)
        self._by_id: dict[int, MaskedParameter] = {}
        self._step_hook: Any = None
        self._removed = False

    def _add(self, mp: MaskedParameter) -> None:
        self.masked[mp.name] = mp
        self._by_id[id(mp.param)] = mp
        if mp.n_frozen:
            mp.hook = mp.param.register_post_accumulate_grad_hook(self._grad_hook)
        mp.param._maskhub_masked = True  # type: ignore[attr-defined]
        if self.exact and self._step_hook is None:
            self._step_hook = register_optimizer_step_post_hook(self._after_step)

    def _grad_hook(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            with torch.no_grad():
                self._by_id[id(param)].mask_grad(_local(param.grad))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    mp = self._by_id.get(id(p))
                    if mp is not None:
                        mp.restore()

    @property
    def n_params(self) -> int:
        """Entries of the masked parameters (this rank's shards under FSDP2)."""
        return sum(mp.numel for mp in self.masked.values())

    @property
    def n_trainable(self) -> int:
        """Entries of the masked parameters that train."""
        return sum(mp.n_trainable for mp in self.masked.values())

    @property
    def n_frozen(self) -> int:
        """Entries held at θ0."""
        return sum(mp.n_frozen for mp in self.masked.values())

    def memory(self) -> dict[str, int]:
        """Bytes held: ``mask`` (1 bit per entry) and ``snapshot`` (frozen values, exact mode)."""
        mask = snap = 0
        for mp in self.masked.values():
            m, s = mp.nbytes
            mask, snap = mask + m, snap + s
        return {"mask": mask, "snapshot": snap}

    def restore(self) -> None:
        """Restore every frozen entry to θ0 now (exact mode); the step hook does this after
        each optimizer step, call it after updates made outside ``torch.optim``."""
        with torch.no_grad():
            for mp in self.masked.values():
                mp.restore()

    def drift(self) -> dict[str, int]:
        """Per parameter, frozen entries whose bits differ from θ0 now (exact mode only)."""
        if not self.exact:
            raise UsageError("drift() needs the θ0 snapshot of exact mode (exact=True)")
        with torch.no_grad():
            return {n: d for n, mp in self.masked.items() if (d := mp.drift())}

    def remove(self) -> None:
        """Remove the hooks and free the mask and snapshot; training is unmasked again."""
        if self._removed:
            return
        self._removed = True
        if self._step_hook is not None:
            self._step_hook.remove()
        for mp in self.masked.values():
            if mp.hook is not None:
                mp.hook.remove()
            if hasattr(mp.param, "_maskhub_masked"):
                del mp.param._maskhub_masked
        self._by_id.clear()

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        mem = self.memory()
        return (f"MaskHandle(mask={self.mask_name!r}, tensors={len(self.masked)}, "
                f"trainable={self.n_trainable}/{self.n_params}, exact={self.exact}, "
                f"mask_bytes={mem['mask']}, snapshot_bytes={mem['snapshot']})")


def apply_mask(model: nn.Module, mask: Any, *, exact: bool = True,
               snapshot_device: str | torch.device | None = None,
               strip_prefix: str | None = None, add_prefix: str | None = None,
               name_map: NameMap | None = None, missing: str = "error", extra: str = "error",
               home: str | os.PathLike[str] | None = None) -> MaskHandle:
    """Train only the entries of ``model`` that ``mask`` marks as updated.

    Call it after wrapping the model (DDP, ``fully_shard``) and moving/casting it, before
    training. ``mask``: a :class:`~maskhub.Mask`, a registry name, a Hub repo id, a mask store
    path or ``{name: bool array}`` (see :func:`resolve_mask`).

    * ``exact`` (default True): after every optimizer step, frozen entries are restored to
      θ0 bit for bit from a compact snapshot of the frozen values; False: gradient masking
      only (weight decay and stale momentum can then move frozen entries).
    * ``snapshot_device``: where the snapshot lives (default: with each parameter; ``"cpu"``
      keeps it in host memory, off the accelerator).
    * ``strip_prefix`` / ``add_prefix`` / ``name_map`` (a mapping or a callable returning the
      parameter name, or None to skip the tensor): map mask names onto parameter names,
      applied in this order.
    * ``missing``: trainable parameters the mask lacks: ``"error"``, ``"freeze"`` (hold at
      θ0) or ``"train"`` (leave unmasked). ``extra``: mask tensors the model lacks:
      ``"error"`` or ``"ignore"``.
    """
    if missing not in POLICIES_MISSING:
        raise UsageError(f"missing must be one of {', '.join(POLICIES_MISSING)}, not {missing!r}")
    if extra not in POLICIES_EXTRA:
        raise UsageError(f"extra must be one of {', '.join(POLICIES_EXTRA)}, not {extra!r}")
    snap_dev = torch.device(snapshot_device) if snapshot_device is not None else None
    source = resolve_mask(mask, home)
    match = match_parameters(model, source, strip_prefix=strip_prefix, add_prefix=add_prefix,
                             name_map=name_map, missing=missing, extra=extra)
    handle = MaskHandle(getattr(source, "name", None), exact)
    handle.ignored = match.buffers + match.extra + match.untrainable
    shapes = {s.tensor: tuple(s.shape) for s in source.tensor_stats()}
    try:
        for target, param, mask_names in match.params.values():
            if getattr(param, "_maskhub_masked", False):
                raise UsageError(f"parameter {target} already has a mask applied; call "
                                 ".remove() on its handle first")
            bits = source.packed(mask_names[0])
            for alias in mask_names[1:]:  # tied weights: trainable if any alias says so
                bits = np.bitwise_or(bits, source.packed(alias))
            local_bits = _local_bits(bits, shapes[mask_names[0]], param)
            del bits
            handle._add(MaskedParameter(target, param, local_bits, exact, snap_dev))
        if missing == "freeze":
            for name, param in zip(match.missing, match.missing_params, strict=True):
                zeros = np.zeros((_local(param).numel() + 7) // 8, dtype=np.uint8)
                handle._add(MaskedParameter(name, param, zeros, exact, snap_dev))
        elif missing == "train":
            handle.unmasked = list(match.missing)
    except BaseException:
        handle.remove()
        raise
    return handle
