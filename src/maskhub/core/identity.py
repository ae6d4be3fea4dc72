"""Is this the base a mask was made from? Content identity checks shared by the features that
hold a mask and a checkpoint (``verify``; ``apply`` of another change calls it too).

A mask made by ``diff`` records ``base_fingerprint`` (:mod:`maskhub.checkpoints.
fingerprint`): the fingerprint of the base's compared tensors. A checkpoint whose
fingerprint over the same tensors differs is not that base, whatever its path or name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from maskhub.errors import MaskMismatchError


def recorded_base_fingerprint(mask: Any) -> str | None:
    """The base fingerprint a mask recorded (its index row, else its store's metadata), or
    ``None`` (made before fingerprints, imported, combined, or an in-memory mask)."""
    row = getattr(mask, "row", None)
    if isinstance(row, dict) and row.get("base_fingerprint"):
        return str(row["base_fingerprint"])
    return None


def base_mismatch(mask: Any, fingerprint: str, where: str) -> str | None:
    """The one line saying that ``where`` (whose fingerprint over the mask's tensors is
    ``fingerprint``) is not the base ``mask`` was made from; ``None`` when it is, or when
    the mask recorded no fingerprint."""
    recorded = recorded_base_fingerprint(mask)
    if recorded is None or recorded == fingerprint:
        return None
    label = getattr(mask, "name", None) or "the mask"
    return (f"mask {label!r} is a mask of another model: {where} is not the base it was made "
            f"from (its tensors hash to {fingerprint}, the mask's base to {recorded})")


def check_base(mask: Any, checkpoint: str | os.PathLike[str],
               names: Sequence[str] | None = None) -> str | None:
    """Raise :class:`MaskMismatchError` (one line) unless ``checkpoint`` holds the bytes of
    the base ``mask`` was made from; reads every byte of ``names`` (default: the mask's
    tensors) once. Returns the checkpoint's fingerprint, or ``None`` without reading when the
    mask recorded no fingerprint (nothing to compare with)."""
    from maskhub.checkpoints.fingerprint import checkpoint_fingerprint

    if recorded_base_fingerprint(mask) is None:
        return None
    wanted = list(names) if names is not None else list(mask.tensor_names())
    if not same_dtypes(mask, checkpoint, wanted):
        return None  # the same values stored in another dtype are other bytes: not compared
    try:
        fingerprint = checkpoint_fingerprint(checkpoint, wanted)
    except KeyError as exc:
        label = getattr(mask, "name", None) or "the mask"
        raise MaskMismatchError(f"mask {label!r} is a mask of another model: {checkpoint} "
                                f"has no tensor {exc.args[0]!r}") from None
    line = base_mismatch(mask, fingerprint, str(checkpoint))
    if line is not None:
        raise MaskMismatchError(line)
    return fingerprint


def same_dtypes(mask: Any, checkpoint: str | os.PathLike[str], names: Sequence[str]) -> bool:
    """Whether ``checkpoint`` stores ``names`` in the dtypes the mask's base had (headers
    only; a tensor it lacks is a :class:`MaskMismatchError`). Fingerprints are of bytes:
    an fp32 copy of a bf16 base has other bytes and the same values, so it is compared by
    names and shapes only."""
    from maskhub.checkpoints.sources import open_checkpoint

    recorded = {s.tensor: s.base_dtype for s in mask.tensor_stats()}
    ck = open_checkpoint(checkpoint)
    try:
        missing = next((n for n in names if n not in ck.tensors), None)
        if missing is not None:
            label = getattr(mask, "name", None) or "the mask"
            raise MaskMismatchError(f"mask {label!r} is a mask of another model: {checkpoint} "
                                    f"has no tensor {missing!r}")
        return all(ck.tensors[n].dtype == recorded.get(n) for n in names)
    finally:
        ck.close()
