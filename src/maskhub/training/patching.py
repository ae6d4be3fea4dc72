"""Apply a patch (a mask with the target's values) to a loaded torch model, in place.

:func:`apply_patch` is what :meth:`maskhub.Mask.apply_to` runs: for every tensor of the
patch, the parameter (or buffer) it maps to, with the same name mapping as
:func:`~maskhub.training.masking.apply_mask` (wrappers unwrapped, ``strip_prefix``,
``add_prefix``, ``name_map``), gets the patch's values written at the set bits, on whatever
device it lives. The model must hold the patch's base; the result is then the target, bit
for bit where the parameter has the target's dtype (a wider dtype gets the exact widening).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from maskhub.core.record import MaskRecord
from maskhub.errors import MaskMismatchError, PatchError, UsageError
from maskhub.schemas.metadata import BITORDER
from maskhub.training.mask_sources import listing
from maskhub.training.masking import (
    DTensor,
    NameMap,
    _map_name,
    canonical_name,
    unwrap_model,
)

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float32": torch.float32, "float64": torch.float64, "int8": torch.int8,
                 "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32,
                 "int64": torch.int64, "bool": torch.bool}
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def values_tensor(mask: MaskRecord, name: str) -> torch.Tensor:
    """The patch's values of tensor ``name`` as a CPU torch tensor of the target's dtype."""
    raw = mask.store.values(name)
    dtype = _TORCH_DTYPES.get(mask.store.values_dtype(name))
    if dtype is None:
        raise UsageError(f"{name!r}: a {mask.store.values_dtype(name)} patch cannot be applied "
                         "to a torch model")
    if raw.dtype.kind == "u" and raw.dtype.itemsize > 1:  # bf16 bits: torch views signed
        raw = raw.view(_SIGNED[raw.dtype.itemsize])
    t = torch.from_numpy(np.ascontiguousarray(raw))
    return t if t.dtype == dtype else t.view(dtype)


def apply_patch(model: nn.Module, mask: MaskRecord, *, strip_prefix: str | None = None,
                add_prefix: str | None = None, name_map: NameMap | None = None,
                extra: str = "error") -> int:
    """Write the values of patch ``mask`` into ``model`` in place; return how many entries
    were written. ``extra="ignore"`` skips patch tensors the model lacks (default: one
    :class:`MaskMismatchError` listing them, before anything is written)."""
    if not mask.store.has_values:
        raise PatchError(f"mask {mask.name!r} holds no values, so it cannot rebuild its target: "
                         "make a patch with `maskhub diff BASE TARGET --patch`", mask.name)
    if extra not in ("error", "ignore"):
        raise UsageError(f"extra must be one of error, ignore, not {extra!r}")
    root = unwrap_model(model)
    tensors: dict[str, torch.Tensor] = {}
    for n, b in root.named_buffers(remove_duplicate=False):
        tensors[canonical_name(n)] = b
    for n, p in root.named_parameters(remove_duplicate=False):
        tensors[canonical_name(n)] = p
    plan: list[tuple[str, torch.Tensor, Any]] = []
    unmapped: list[str] = []
    bad: list[str] = []
    for st in mask.tensor_stats():
        target = _map_name(st.tensor, strip_prefix, add_prefix, name_map)
        if target is None:
            continue
        t = tensors.get(target)
        if t is None:
            unmapped.append(st.tensor)
        elif tuple(t.shape) != tuple(st.shape):
            bad.append(f"{st.tensor} {list(st.shape)} in the patch vs {list(t.shape)} in the "
                       "model")
        else:
            plan.append((target, t, st))
    if (unmapped and extra == "error") or bad:
        parts = [f"patch {mask.name!r} does not match the model"]
        if unmapped and extra == "error":
            parts.append(f"{len(unmapped)} patch tensor(s) have no parameter in the model: "
                         + listing(unmapped))
        if bad:
            parts.append(f"{len(bad)} shape(s) differ: " + listing(bad, 3))
        raise MaskMismatchError("; ".join(parts), unmapped, [], bad)
    written = 0
    with torch.no_grad():
        for target, t, st in plan:
            if DTensor is not None and isinstance(t, DTensor):
                raise UsageError(f"{target} is sharded (DTensor): apply the patch before "
                                 "sharding the model")
            if not st.n_updated:
                continue
            values = values_tensor(mask, st.tensor)
            bits = np.unpackbits(mask.store.packed(st.tensor), count=st.numel,
                                 bitorder=BITORDER)
            index = torch.from_numpy(np.flatnonzero(bits)).to(t.device)
            del bits
            flat = t.data.view(-1) if t.is_contiguous() else None
            if flat is None:
                full = t.data.contiguous().view(-1)
                full[index] = values.to(t.device).to(t.dtype)
                t.data.copy_(full.view(t.shape))
            else:
                flat[index] = values.to(t.device).to(t.dtype)
            written += int(index.numel())
    return written
