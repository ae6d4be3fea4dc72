"""Settle the precision null of a diff (:mod:`maskhub.kernels.precision`) once the whole pass
is done: the budget (the largest ``|Δ|`` seen, or the user's) is known only then, and the
null follows exactly from each tensor's per-exponent counts."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from maskhub.errors import UsageError
from maskhub.kernels.precision import null_counts
from maskhub.schemas.metadata import TensorStats


def check_budget(budget: float | None) -> None:
    """Raise :class:`UsageError` unless ``budget`` is None or a finite number >= 0."""
    if budget is None:
        return
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 0):
        raise UsageError(f"budget must be a finite number >= 0, not {budget!r}")


def observed_budget(tensors: Sequence[TensorStats]) -> float | None:
    """The largest ``|Δ|`` over the updated entries of every tensor (None: none measured)."""
    seen = [t.max_abs_delta for t in tensors if t.max_abs_delta is not None]
    return max(seen) if seen else None


def settle_null(tensors: Sequence[TensorStats], strata: Sequence[tuple[str, int, int, int]],
                budget: float | None = None) -> tuple[list[TensorStats], dict[str, Any] | None]:
    """The tensors with their ``n_null``/``n_null_updated`` filled in, and the mask's summary
    (``budget``, ``budget_source``, ``max_abs_delta``, ``n_null``, ``n_null_updated``,
    ``n_movable``, ``null_share``, ``sparsity_movable``; None when no tensor has a null: no
    float pair, or no strata). ``budget``: the user's movement budget; default the largest
    ``|Δ|`` observed. Tensors without a null count as movable in the totals."""
    observed = observed_budget(tensors)
    use = budget if budget is not None else observed
    by_tensor: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for name, stratum, numel, n_upd in strata:
        by_tensor[name].append((stratum, numel, n_upd))
    out: list[TensorStats] = []
    covered = False
    n_null = n_null_updated = 0
    for t in tensors:
        counts = None
        if use is not None and (t.tensor in by_tensor or not t.numel):
            counts = null_counts(by_tensor.get(t.tensor, ()), t.base_dtype, t.target_dtype, use)
        if counts is None:
            out.append(t)
            continue
        covered = True
        n_null += counts[0]
        n_null_updated += counts[1]
        out.append(dataclasses.replace(t, n_null=counts[0], n_null_updated=counts[1]))
    if not covered or use is None:
        return out, None
    n_params = sum(t.numel for t in tensors)
    n_updated = sum(t.n_updated for t in tensors)
    movable = n_params - n_null
    return out, {
        "budget": float(use),
        "budget_source": "given" if budget is not None else "observed",
        "max_abs_delta": observed,
        "n_null": n_null,
        "n_null_updated": n_null_updated,
        "n_movable": movable,
        "null_share": n_null / n_params if n_params else 0.0,
        "sparsity_movable": (1.0 - (n_updated - n_null_updated) / movable) if movable else None,
    }
