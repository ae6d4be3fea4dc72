"""Overlap results: the counts of a pair of masks and every baseline derived from them.

Pure arithmetic on exact integer counts (no store, no SQL): o1/o2, Jaccard, the uniform and
stratified random baselines, the hypergeometric variance, z-score and p-value. See
:mod:`maskhub.analytics.overlap` for the definitions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from maskhub.core.provenance import timestamp

if TYPE_CHECKING:
    from maskhub.core.record import MaskRecord


@dataclass(frozen=True)
class TensorOverlap:
    """Exact counts of one tensor for one pair of masks."""

    tensor: str
    numel: int
    n_a: int
    n_b: int
    n_both: int
    layer: int | None = None
    module: str = ""

    @property
    def expected(self) -> float:
        """E|I1 ∩ I2| within this tensor under random placement (hypergeometric mean)."""
        return self.n_a * self.n_b / self.numel if self.numel else 0.0

    @property
    def variance(self) -> float:
        """Variance of |I1 ∩ I2| within this tensor under random placement."""
        n, a, b = self.numel, self.n_a, self.n_b
        if n < 2:
            return 0.0
        return a * b * (n - a) * (n - b) / (n * n * (n - 1))

    @property
    def o1(self) -> float | None:
        """|I1 ∩ I2| / |I1| within this tensor (None when I1 is empty here)."""
        return self.n_both / self.n_a if self.n_a else None

    @property
    def o2(self) -> float | None:
        """|I1 ∩ I2| / |I2| within this tensor (None when I2 is empty here)."""
        return self.n_both / self.n_b if self.n_b else None

    def swapped(self) -> TensorOverlap:
        """The same counts with the roles of the two masks exchanged."""
        return replace(self, n_a=self.n_b, n_b=self.n_a)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form with the derived overlaps."""
        return {"tensor": self.tensor, "layer": self.layer, "module": self.module,
                "numel": self.numel, "n_a": self.n_a, "n_b": self.n_b, "n_both": self.n_both,
                "o1": self.o1, "o2": self.o2,
                "o1_random": self.n_b / self.numel if self.numel else None,
                "o2_random": self.n_a / self.numel if self.numel else None}


@dataclass(frozen=True)
class OverlapResult:
    """Overlap of mask ``a`` (I1) with mask ``b`` (I2), with both random baselines."""

    mask_a: str
    mask_b: str
    name_a: str
    name_b: str
    n_params: int
    n_tensors: int
    n_a: int
    n_b: int
    n_both: int
    expected_stratified: float
    var_stratified: float
    tensors: tuple[TensorOverlap, ...] = ()
    cached: bool = False
    computed_at: str = ""
    #: E|I1 ∩ I2| and its variance with each mask's count kept per tensor *and* per exponent
    #: of |θ0| (:func:`magnitude_null`); None when a mask has no strata recorded.
    expected_magnitude: float | None = None
    var_magnitude: float | None = None

    @classmethod
    def from_tensors(cls, a: MaskRecord, b: MaskRecord, tensors: Sequence[TensorOverlap],
                     magnitude: tuple[float, float] | None = None) -> OverlapResult:
        """Aggregate per-tensor counts into the pair's result (sums of exact integers);
        ``magnitude``: ``(expected, variance)`` of the magnitude-stratified null."""
        return cls(
            mask_a=a.id, mask_b=b.id, name_a=a.name, name_b=b.name,
            n_params=sum(t.numel for t in tensors), n_tensors=len(tensors),
            n_a=sum(t.n_a for t in tensors), n_b=sum(t.n_b for t in tensors),
            n_both=sum(t.n_both for t in tensors),
            expected_stratified=math.fsum(t.expected for t in tensors),
            var_stratified=math.fsum(t.variance for t in tensors),
            tensors=tuple(tensors), computed_at=timestamp(),
            expected_magnitude=magnitude[0] if magnitude else None,
            var_magnitude=magnitude[1] if magnitude else None)

    # overlaps ----------------------------------------------------------------------------
    @property
    def o1(self) -> float | None:
        """|I1 ∩ I2| / |I1|: the share of a's updates that b also updated."""
        return self.n_both / self.n_a if self.n_a else None

    @property
    def o2(self) -> float | None:
        """|I1 ∩ I2| / |I2|: the share of b's updates that a also updated."""
        return self.n_both / self.n_b if self.n_b else None

    @property
    def jaccard(self) -> float | None:
        """|I1 ∩ I2| / |I1 ∪ I2| (None when both masks are empty)."""
        union = self.n_a + self.n_b - self.n_both
        return self.n_both / union if union else None

    # baselines ---------------------------------------------------------------------------
    @property
    def expected_random(self) -> float:
        """E|I1 ∩ I2| for uniformly random masks of the same sizes: n_a n_b / N."""
        return self.n_a * self.n_b / self.n_params if self.n_params else 0.0

    @property
    def o1_random(self) -> float | None:
        """Uniform baseline of o1 (Appendix E): the density of b."""
        return self.n_b / self.n_params if self.n_params and self.n_a else None

    @property
    def o2_random(self) -> float | None:
        """Uniform baseline of o2 (Appendix E): the density of a."""
        return self.n_a / self.n_params if self.n_params and self.n_b else None

    @property
    def o1_stratified(self) -> float | None:
        """Stratified baseline of o1: Σ_t n1_t n2_t / N_t divided by |I1|."""
        return self.expected_stratified / self.n_a if self.n_a else None

    @property
    def o2_stratified(self) -> float | None:
        """Stratified baseline of o2: Σ_t n1_t n2_t / N_t divided by |I2|."""
        return self.expected_stratified / self.n_b if self.n_b else None

    @property
    def o1_magnitude(self) -> float | None:
        """Magnitude-stratified baseline of o1: Σ_(t,s) n1 n2 / N over tensors and exponent
        strata of θ0, divided by |I1| (the strictest of the three nulls)."""
        e = self.expected_magnitude
        return e / self.n_a if e is not None and self.n_a else None

    @property
    def o2_magnitude(self) -> float | None:
        """Magnitude-stratified baseline of o2."""
        e = self.expected_magnitude
        return e / self.n_b if e is not None and self.n_b else None

    @property
    def lift_random(self) -> float | None:
        """|I1 ∩ I2| over its uniform expectation (also o1 / o1_random)."""
        e = self.expected_random
        return self.n_both / e if e else None

    @property
    def lift_stratified(self) -> float | None:
        """|I1 ∩ I2| over its stratified expectation (also o1 / o1_stratified)."""
        e = self.expected_stratified
        return self.n_both / e if e else None

    @property
    def lift_magnitude(self) -> float | None:
        """|I1 ∩ I2| over its magnitude-stratified expectation: how far above chance the
        masks overlap once small weights' greater mobility in bf16 is accounted for."""
        e = self.expected_magnitude
        return self.n_both / e if e else None

    @property
    def lift(self) -> float | None:
        """The "above random" figure to report: :attr:`lift_magnitude` where strata were
        recorded, else :attr:`lift_stratified`."""
        return self.lift_magnitude if self.expected_magnitude is not None \
            else self.lift_stratified

    # significance ------------------------------------------------------------------------
    @property
    def z_score(self) -> float | None:
        """(|I1 ∩ I2| - E) / sqrt(Var) under the stratified null; None when Var = 0."""
        if self.var_stratified <= 0:
            return None
        return (self.n_both - self.expected_stratified) / math.sqrt(self.var_stratified)

    @property
    def p_value(self) -> float | None:
        """One-sided normal tail P(Z >= z) (0.0 once below the smallest double)."""
        z = self.z_score
        return None if z is None else 0.5 * math.erfc(z / math.sqrt(2))

    @property
    def log10_p_value(self) -> float | None:
        """log10 of :attr:`p_value`, finite even where the p-value itself underflows."""
        z = self.z_score
        return None if z is None else log10_normal_tail(z)

    @property
    def z_magnitude(self) -> float | None:
        """z-score under the magnitude-stratified null; None when unknown or Var = 0."""
        e, v = self.expected_magnitude, self.var_magnitude
        if e is None or v is None or v <= 0:
            return None
        return (self.n_both - e) / math.sqrt(v)

    @property
    def log10_p_magnitude(self) -> float | None:
        """log10 of the one-sided p-value under the magnitude-stratified null."""
        z = self.z_magnitude
        return None if z is None else log10_normal_tail(z)

    # conversions -------------------------------------------------------------------------
    def swapped(self) -> OverlapResult:
        """The same result with a and b exchanged (o1 and o2 trade places)."""
        return replace(self, mask_a=self.mask_b, mask_b=self.mask_a, name_a=self.name_b,
                       name_b=self.name_a, n_a=self.n_b, n_b=self.n_a,
                       tensors=tuple(t.swapped() for t in self.tensors))

    def to_row(self) -> dict[str, Any]:
        """The row of the ``overlaps`` table."""
        return {
            "mask_a": self.mask_a, "mask_b": self.mask_b, "n_params": self.n_params,
            "n_tensors": self.n_tensors, "n_a": self.n_a, "n_b": self.n_b,
            "n_both": self.n_both, "o1": self.o1, "o2": self.o2, "o1_random": self.o1_random,
            "o2_random": self.o2_random, "o1_stratified": self.o1_stratified,
            "o2_stratified": self.o2_stratified, "jaccard": self.jaccard,
            "expected_random": self.expected_random,
            "expected_stratified": self.expected_stratified,
            "var_stratified": self.var_stratified, "z_score": self.z_score,
            "p_value": self.p_value, "log10_p_value": self.log10_p_value,
            "computed_at": self.computed_at or timestamp(),
            "expected_magnitude": self.expected_magnitude, "var_magnitude": self.var_magnitude,
            "o1_magnitude": self.o1_magnitude, "o2_magnitude": self.o2_magnitude,
            "z_magnitude": self.z_magnitude, "log10_p_magnitude": self.log10_p_magnitude,
        }

    def to_dict(self, with_tensors: bool = True) -> dict[str, Any]:
        """Plain-JSON form: names, the overlaps row and (optionally) the per-tensor rows."""
        d = {"name_a": self.name_a, "name_b": self.name_b, **self.to_row(),
             "lift_random": self.lift_random, "lift_stratified": self.lift_stratified,
             "lift_magnitude": self.lift_magnitude, "cached": self.cached}
        if with_tensors:
            d["tensors"] = [t.to_dict() for t in self.tensors]
        return d


@dataclass
class OverlapMatrix:
    """Every pair among a set of masks (the result of an all-pairs pass)."""

    masks: list[MaskRecord]
    results: dict[tuple[int, int], OverlapResult] = field(default_factory=dict)

    def pair(self, i: int, j: int) -> OverlapResult:
        """Result with mask i as ``a`` and mask j as ``b`` (i != j)."""
        if (i, j) in self.results:
            return self.results[(i, j)]
        return self.results[(j, i)].swapped()

    def matrix(self, metric: str = "o1") -> list[list[float | None]]:
        """N x N values of ``metric`` (an :class:`OverlapResult` attribute) with row i as ``a``.

        For ``o1`` cell (i, j) is the share of mask i's updates also updated by mask j; the
        diagonal is that of a mask with itself.
        """
        n = len(self.masks)
        out: list[list[float | None]] = []
        for i in range(n):
            row: list[float | None] = []
            for j in range(n):
                if i == j:
                    row.append(_self_value(self.masks[i], metric))
                else:
                    row.append(getattr(self.pair(i, j), metric))
            out.append(row)
        return out

    @property
    def cached(self) -> int:
        """How many pairs came from the SQL cache."""
        return sum(r.cached for r in self.results.values())

    def to_dict(self, metric: str = "o1") -> dict[str, Any]:
        """Plain-JSON form: the masks, the ``metric`` matrix and every pair."""
        return {"masks": [{"id": m.id, "name": m.name, "n_params": m.n_params,
                           "n_updated": m.n_updated, "sparsity": m.sparsity}
                          for m in self.masks],
                "metric": metric, "matrix": self.matrix(metric),
                "pairs": [r.to_dict(with_tensors=False) for _, r in sorted(self.results.items())]}


#: ``{tensor: {stratum: (numel, n_updated)}}``: one mask's ``tensor_strata`` rows.
Strata = dict[str, dict[int, tuple[int, int]]]


def magnitude_null(a: Strata, b: Strata) -> tuple[float, float] | None:
    """``(E, Var)`` of |I1 ∩ I2| when each mask's updates are placed at random within each
    (tensor, exponent stratum of θ0) cell, keeping their counts there: per cell the
    intersection is hypergeometric (mean n1 n2 / N, variance n1 n2 (N-n1)(N-n2) /
    (N² (N-1))), and cells are independent, so means and variances add.

    None when either mask lacks strata for a tensor or the two disagree on a cell's size
    (not the same base weights): then no magnitude baseline is claimed.
    """
    if not a or not b or a.keys() != b.keys():
        return None
    mean: list[float] = []
    var: list[float] = []
    for tensor, cells_a in a.items():
        cells_b = b[tensor]
        if cells_a.keys() != cells_b.keys():
            return None
        for stratum, (n, n1) in cells_a.items():
            m, n2 = cells_b[stratum]
            if m != n:
                return None
            if n and n1 and n2:
                mean.append(n1 * n2 / n)
                if n > 1:
                    var.append(n1 * n2 * (n - n1) * (n - n2) / (n * n * (n - 1)))
    return math.fsum(mean), math.fsum(var)


def _self_value(mask: MaskRecord, metric: str) -> float | None:
    n, d = mask.n_updated, mask.density
    values: dict[str, float | None] = {
        "o1": 1.0 if n else None, "o2": 1.0 if n else None, "jaccard": 1.0 if n else None,
        "o1_random": d, "o2_random": d, "n_both": float(n),
    }
    return values.get(metric)


def log10_normal_tail(z: float) -> float:
    """log10 P(Z >= z) for a standard normal Z, accurate where erfc underflows."""
    if z < 30:
        return math.log10(0.5 * math.erfc(z / math.sqrt(2)))
    # Mills-ratio expansion: P(Z >= z) = phi(z)/z * (1 - 1/z^2 + 3/z^4 - 15/z^6 ...)
    ln_p = (-z * z / 2 - math.log(z) - 0.5 * math.log(2 * math.pi)
            + math.log1p(-1 / z**2 + 3 / z**4 - 15 / z**6))
    return ln_p / math.log(10)
