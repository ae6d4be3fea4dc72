"""The precision null of a mask: entries that could not have changed at the run's movement
budget.

A checkpoint stored in bf16 (or fp16) records a change of an entry only when the change is at
least the smallest step its format can make from θ0, and that step depends on the exponent of
|θ0| alone. For θ0 in the binade ``[2^e, 2^(e+1))`` of a format with ``m`` mantissa bits the
neighbours lie ``2^(e-m)`` away, except below an exact power of two, where the neighbour lies
``2^(e-m-1)`` away: the smallest change any entry of that binade can record is therefore half
a step, ``2^(e-m-1)`` (:func:`min_change`). At the smallest normal binade the step below is the
subnormal spacing, ``2^(e-m)``; zero and the subnormals (exponent field 0) can move by one
subnormal spacing; inf/NaN (the top exponent field) count as always movable.

So, given a budget ``B`` (by default the largest ``|θ1 − θ0|`` among the mask's updated
entries, i.e. how far the run moved any entry at all), every entry whose exponent's smallest
change exceeds ``B`` could not have changed: that is the **null**. Because the rule depends
only on the exponent field, the null is settled exactly at the end of a diff from the
per-exponent counts the pass already keeps (:mod:`maskhub.kernels.strata`): no second pass.

The step is taken in the target's format when it holds every value of the base's (same
dtype, or bf16/fp16 -> fp32); for other pairs (fp32 -> bf16, integers...) no null is defined
(``None``): a rounded target can differ from an unrounded base by any amount.

:func:`delta_max_fn` gives, per chunk, the largest ``|Δ|`` over the chunk's updated entries
(walking the set bits of the packed mask, as the strata count does).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from maskhub.errors import UsageError
from maskhub.kernels.floatbits import FORMATS as FLOAT_FORMATS
from maskhub.schemas.metadata import BITORDER, TensorStats

if TYPE_CHECKING:
    import numpy as np

#: ``fn(a_raw, b_raw, packed, n)``: the largest finite-or-infinite ``|b − a|`` over the
#: entries set in ``packed`` (0.0 when none; NaN differences are ignored).
DeltaMaxFn = Callable[["np.ndarray", "np.ndarray", "np.ndarray", int], float]

_KIND = {"bfloat16": 0, "float16": 1, "float32": 2}
#: (numpy dtype names: this module imports numpy only where it computes, so that settling
#: the null of a pulled mask imports none)
_VIEW = {"bfloat16": "uint16", "float16": "uint16", "float32": "uint32"}
#: The dtypes with a ``|Δ|``: their kind in the numba kernels' ``_value`` and their view.
DELTA_KINDS = _KIND
DELTA_VIEWS = _VIEW


def _values(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values of raw bit patterns of a float format."""
    import numpy as np

    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    if dtype == "float16":
        return raw.view(np.float16).astype(np.float64)
    return raw.view(np.float32).astype(np.float64)


def delta_max_fn(a_dtype: str, b_dtype: str, backend: str) -> DeltaMaxFn | None:
    """The per-chunk ``max |Δ|`` function for a pair of dtypes, or None when either is not
    bf16/fp16/fp32 (``backend``: numba or numpy; same result)."""
    if a_dtype not in _KIND or b_dtype not in _KIND:
        return None
    va, vb = _VIEW[a_dtype], _VIEW[b_dtype]
    if backend == "numba":
        from maskhub.kernels import fastkernel

        nk = fastkernel.numba_kernels()
        ka, kb = _KIND[a_dtype], _KIND[b_dtype]

        def fast(a_raw: np.ndarray, b_raw: np.ndarray, packed: np.ndarray, n: int) -> float:
            return float(nk.max_abs_delta(a_raw.view(va), b_raw.view(vb), ka, kb, packed, n))
        return fast

    def plain(a_raw: np.ndarray, b_raw: np.ndarray, packed: np.ndarray, n: int) -> float:
        import numpy as np

        bits = np.unpackbits(packed, count=n, bitorder=BITORDER).view(bool)
        if not bits.any():
            return 0.0
        with np.errstate(invalid="ignore"):
            d = np.abs(_values(b_raw.view(vb)[bits], b_dtype)
                       - _values(a_raw.view(va)[bits], a_dtype))
        d = d[~np.isnan(d)]
        return float(d.max()) if d.size else 0.0
    return plain


def step_format(base_dtype: str, target_dtype: str) -> str | None:
    """The format whose steps bound a recorded change of a ``base -> target`` pair, or None
    when the pair has no precision null (see the module docstring)."""
    if base_dtype not in _KIND or target_dtype not in _KIND:
        return None
    if base_dtype == target_dtype:
        return base_dtype
    if target_dtype == "float32":  # bf16/fp16 values are all fp32 values
        return "float32"
    return None


def binade(stratum: int, dtype: str) -> int | None:
    """``e`` such that a normal θ0 of ``dtype`` with exponent field ``stratum`` lies in
    ``[2^e, 2^(e+1))``; None for zero/subnormals, inf/NaN and other dtypes."""
    fmt = FLOAT_FORMATS.get(dtype)
    if fmt is None:
        return None
    top = (1 << (fmt.width - 1 - fmt.mant)) - 1
    return stratum - fmt.bias if 0 < stratum < top else None


def min_change(stratum: int, base_dtype: str, target_dtype: str) -> float | None:
    """The smallest non-zero ``|θ1 − θ0|`` that an entry whose θ0 has exponent field
    ``stratum`` (base dtype) can record in the target dtype; ``0.0`` for inf/NaN; None when
    the pair has no precision null."""
    fmt_name = step_format(base_dtype, target_dtype)
    if fmt_name is None:
        return None
    base, step = FLOAT_FORMATS[base_dtype], FLOAT_FORMATS[fmt_name]
    top = (1 << (base.width - 1 - base.mant)) - 1
    if stratum >= top:
        return 0.0
    if stratum == 0:  # zero or a base subnormal: one smallest subnormal of the step format
        return math.ldexp(1.0, step.emin - step.mant)
    e = stratum - base.bias  # θ0 in [2^e, 2^(e+1))
    if e > step.emin:
        return math.ldexp(1.0, e - step.mant - 1)
    return math.ldexp(1.0, e - step.mant)


def null_counts(rows: Iterable[tuple[int, int, int]], base_dtype: str, target_dtype: str,
                budget: float) -> tuple[int, int] | None:
    """``(n_null, n_null_updated)`` of one tensor from its strata rows ``(stratum, numel,
    n_updated)``: the entries whose exponent's :func:`min_change` exceeds ``budget``, and how
    many of them are updated anyway (possible only with a budget below the observed one).
    None when the pair has no precision null."""
    if step_format(base_dtype, target_dtype) is None:
        return None
    n_null = n_null_updated = 0
    for stratum, numel, n_updated in rows:
        step = min_change(stratum, base_dtype, target_dtype)
        if step is not None and step > budget:
            n_null += numel
            n_null_updated += n_updated
    return n_null, n_null_updated

# -- settling the null at the end of a diff (the budget is known only then) -----------


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
