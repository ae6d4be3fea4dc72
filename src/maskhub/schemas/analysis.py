"""Per-tensor analysis of an update beyond its mask (``diff --rank/--stats``): the
``tensor_analysis`` rows, also carried in a Hub repo's ``tensors.parquet``."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TensorAnalysis:
    """Extra statistics of one tensor's update (``None`` where not computed)."""

    tensor: str
    rank: int | None = None
    max_rank: int | None = None
    rank_rtol: float | None = None
    sign_flips: int | None = None
    mean_abs_delta: float | None = None
    max_abs_delta: float | None = None
    mean_rel_delta: float | None = None
    max_rel_delta: float | None = None
    n_sub_bf16_step: int | None = None

    @property
    def rank_fraction(self) -> float | None:
        """rank / max_rank."""
        if self.rank is None or not self.max_rank:
            return None
        return self.rank / self.max_rank

    def to_row(self) -> dict:
        """Row for the ``tensor_analysis`` table."""
        d = asdict(self)
        d["rank_fraction"] = self.rank_fraction
        return d
