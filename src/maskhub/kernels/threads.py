"""How many threads the work may use: the CPUs this process can really run on, and torch's
intra-op pool sized to the work.

``os.cpu_count()`` (and torch's default pool) count every CPU of the host, not those a
container or ``taskset`` grants: on a 2-CPU slice of a 64-core node torch would start 64
OpenMP threads that spin against the pipeline's own. :func:`available_cpus` reads the
affinity mask and the cgroup CPU quota instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

#: Entries below which a torch op runs on one thread: splitting it costs more than it saves.
TORCH_PARALLEL_MIN = 1 << 22


def cgroup_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup under ``root`` (v2 ``cpu.max``, else the v1 CFS quota),
    ``None`` when unlimited or unknown."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = (f.read().split() + ["100000"])[:2]
    except OSError:
        try:
            with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
                quota = f.read().strip()
            with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
                period = f.read().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return max(1.0, int(quota) / int(period))
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_quota()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def torch_threads_for(numel: int) -> int:
    """Intra-op threads for a torch op over ``numel`` entries on this machine."""
    return 1 if numel < TORCH_PARALLEL_MIN else available_cpus()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch's intra-op pool at ``n`` threads (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
