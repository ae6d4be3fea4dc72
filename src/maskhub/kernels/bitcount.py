"""Counting the set bits of packed masks (little bit order, 8 entries per byte): the one
popcount every part of maskhub uses."""

from __future__ import annotations

import numpy as np


def popcount(buf: np.ndarray) -> int:
    """Number of set bits of a contiguous uint8 array, as an exact int (64 bits at a time)."""
    n8 = buf.size // 8 * 8
    total = 0
    if n8:
        total += int(np.bitwise_count(buf[:n8].view(np.uint64)).sum(dtype=np.int64))
    if n8 < buf.size:
        total += int(np.bitwise_count(buf[n8:]).sum(dtype=np.int64))
    return total


def count_entries(packed: np.ndarray, numel: int) -> int:
    """Set bits among the first ``numel`` entries of a packed mask: the padding bits of the
    last byte, which are not entries, are left out (``packed`` is not modified)."""
    if not packed.size:
        return 0
    tail = numel % 8
    if not tail:
        return popcount(np.ascontiguousarray(packed))
    last = int(packed[-1]) & ((1 << tail) - 1)
    return popcount(np.ascontiguousarray(packed[:-1])) + bin(last).count("1")
