"""IEEE float formats as bit patterns: the magnitude above which one step exceeds a tolerance.

The fast diff kernel decides most entries from bit patterns alone. Two entries with different
bit patterns differ in value by at least the spacing of the format at the smaller magnitude,
so once both magnitudes are large enough, the spacing already exceeds ``tol`` and no
subtraction is needed. :meth:`FloatFormat.decisive_bits` gives that magnitude as a bit
pattern: ``T``, the smallest power of two such that every magnitude ``>= T`` has a spacing
``> tol`` (proof in ``docs/performance.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class FloatFormat:
    """A binary IEEE-style float format with ``mant`` explicit mantissa bits."""

    name: str
    width: int  # total bits
    mant: int  # explicit mantissa bits

    @property
    def bias(self) -> int:
        """Exponent bias."""
        return (1 << (self.width - 2 - self.mant)) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def inf_bits(self) -> int:
        """Bit pattern of +inf (also the largest magnitude that is not NaN)."""
        return ((1 << (self.width - 1 - self.mant)) - 1) << self.mant

    @property
    def mag_mask(self) -> int:
        """Mask that clears the sign bit."""
        return (1 << (self.width - 1)) - 1

    def pow2_bits(self, e: int) -> int:
        """Bit pattern of ``2**e``; ``inf_bits + 1`` when it overflows the format."""
        if e > self.bias:
            return self.inf_bits + 1
        if e >= self.emin:
            return (e + self.bias) << self.mant
        sub = e - (self.emin - self.mant)
        if sub < 0:
            raise ValueError(f"2**{e} is below the smallest {self.name} subnormal")
        return 1 << sub

    def decisive_bits(self, tol_max: float) -> int:
        """Magnitude bit pattern of ``T``: a pair whose patterns differ and whose magnitudes
        both lie in ``[T, inf]`` is updated at every tolerance ``<= tol_max``.

        ``T = 2**e`` is the smallest power of two such that every magnitude ``>= T`` has a
        spacing ``> tol_max`` (subnormals included). ``inf_bits + 1`` (nothing qualifies)
        when ``T`` overflows the format.
        """
        if not (math.isfinite(tol_max) and tol_max >= 0):
            raise ValueError(f"tolerance must be finite and >= 0, not {tol_max!r}")
        lowest = self.emin - self.mant  # exponent of the smallest subnormal (its spacing)
        if tol_max == 0:
            return self.pow2_bits(lowest)
        k = math.frexp(tol_max)[1]  # 2**(k-1) <= tol_max < 2**k
        if k <= lowest:  # even the subnormal spacing 2**lowest exceeds tol_max
            return self.pow2_bits(lowest)
        return self.pow2_bits(k + self.mant)  # binade [2**(k+m), ...) has spacing >= 2**k


BF16 = FloatFormat("bfloat16", 16, 7)
FP16 = FloatFormat("float16", 16, 10)
FP32 = FloatFormat("float32", 32, 23)
FORMATS = {f.name: f for f in (BF16, FP16, FP32)}


def value_table(fmt: FloatFormat) -> np.ndarray:
    """float64 value of every 16-bit pattern of ``fmt`` (65536 entries)."""
    import numpy as np

    bits = np.arange(1 << 16, dtype=np.uint32)
    with np.errstate(invalid="ignore"):
        if fmt is BF16:
            return (bits << 16).view(np.float32).astype(np.float64)
        if fmt is FP16:
            return bits.astype(np.uint16).view(np.float16).astype(np.float64)
    raise ValueError(f"no 16-bit value table for {fmt.name}")
