"""Pairing the tensors of two checkpoints: which to compare, which one side lacks."""

from __future__ import annotations

from collections.abc import Callable

from maskhub.checkpoints.sources import Checkpoint
from maskhub.errors import CheckpointMismatchError
from maskhub.schemas.modelfit import another_model


def match_tensors(base: Checkpoint, target: Checkpoint, allow_missing: bool,
                  warn: Callable[[str], None] | None = None,
                  sides: tuple[str, str] = ("base", "target")) -> tuple[list[str], list[str]]:
    """Names to diff (base order) and names skipped; errors on any mismatch.

    ``sides``: what the messages call the two checkpoints (``verify`` says ``trained``).
    """
    a_shapes = {n: t.shape for n, t in base.tensors.items()}
    b_shapes = {n: t.shape for n, t in target.tensors.items()}
    why = (another_model(a_shapes, b_shapes, f"the {sides[0]}", f"the {sides[1]}")
           or another_model(b_shapes, a_shapes, f"the {sides[1]}", f"the {sides[0]}"))
    if why is not None:  # not a case of a few missing tensors: --allow-missing is no help
        raise CheckpointMismatchError(
            f"the {sides[0]} and {sides[1]} checkpoints are of different models: {why}")
    only_base = [n for n in base.tensors if n not in target.tensors]
    only_target = [n for n in target.tensors if n not in base.tensors]
    if (only_base or only_target) and not allow_missing:
        name, side = (only_base[0], sides[0]) if only_base else (only_target[0], sides[1])
        more = len(only_base) + len(only_target) - 1
        extra = f" (and {more} more)" if more else ""
        raise CheckpointMismatchError(
            f"tensor {name!r} exists only in the {side} checkpoint{extra}; "
            "use --allow-missing to skip such tensors", name)
    skipped = only_base + only_target
    if skipped and warn:
        warn(f"skipping {len(skipped)} tensor(s) present on one side only: "
             + ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    names = [n for n in base.tensors if n in target.tensors]
    for n in names:
        a, b = base.tensors[n], target.tensors[n]
        if a.shape != b.shape:
            raise CheckpointMismatchError(
                f"tensor {n!r} has shape {list(a.shape)} in the {sides[0]} checkpoint and "
                f"{list(b.shape)} in the {sides[1]} checkpoint", n)
    if not names:
        raise CheckpointMismatchError("the two checkpoints have no tensor in common")
    return names, skipped
