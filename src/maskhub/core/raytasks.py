"""Ray plumbing shared by the features that run as Ray tasks (``diff --ray``,
``overlap --all --ray``): connecting, cutting work into balanced groups, gathering results.
Ray is imported on first use only."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from bisect import bisect_left
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

from maskhub.errors import MaskhubError, UsageError

#: Groups of tensors per task slot (CPU, or GPU when the tasks use GPUs): a little more than
#: one, so that a slow group does not leave the other slots idle at the end.
TASKS_PER_SLOT = 2
#: Times a failed task is started again (worker crash, node loss, I/O or runtime error).
MAX_RETRIES = 3
#: Seconds to wait for cancelled tasks to stop before the store is removed.
CANCEL_WAIT_S = 30.0



def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'maskhub[ray]'") from None
    return ray


def connect(address: str | None) -> Any:
    """Ray, connected: an already initialised Ray is reused; ``"auto"`` or ``None`` calls
    ``ray.init()`` (the cluster of ``RAY_ADDRESS``, else a new local Ray); anything else is
    the address of a running cluster (``ray://host:10001``, ``host:6379``)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    addr = None if address in (None, "", "auto") else address
    # issue 26: Ray's own lines (its INFO/WARNING log, the workers' output forwarded as
    # "(task pid=...)") do not reach maskhub's terminal; errors still do, and a task's error
    # comes back as the command's one error line
    kwargs: dict[str, Any] = {"address": addr, "log_to_driver": False,
                              "logging_level": logging.ERROR}
    if addr is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False  # a local Ray for this process only
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Ray's tips about its next versions
            ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
        text = str(exc).strip().splitlines()
        raise UsageError(f"cannot start or reach Ray at {address or 'auto'}: "
                         f"{text[0] if text else type(exc).__name__}") from None
    return ray


def plan_groups(sizes: Sequence[int], n_groups: int) -> list[tuple[int, int]]:
    """Cut ``len(sizes)`` items into ``min(n_groups, len(sizes))`` contiguous, non-empty
    ``[start, stop)`` ranges of about equal total size."""
    n = len(sizes)
    g = max(1, min(n_groups, n))
    total = sum(sizes)
    scaled = list(accumulate(s * g for s in sizes))  # prefix sums, times g: exact integers
    bounds = [0]
    for k in range(1, g):
        cut = bisect_left(scaled, total * k) + 1  # just after the item reaching k/g of the bytes
        bounds.append(max(bounds[-1] + 1, min(cut, n - (g - k))))
    bounds.append(n)
    return [(bounds[j], bounds[j + 1]) for j in range(g)]


def gather(ray: Any, refs: Sequence[Any], collect: Callable[[int, Any], None]) -> None:
    """Wait for the tasks ``refs``, handing each result to ``collect(position, value)`` as it
    comes. A task's maskhub error is raised as itself; on any failure (or Ctrl-C) the other
    tasks are cancelled and waited for, so that none writes after the caller cleans up."""
    index = {ref: k for k, ref in enumerate(refs)}
    pending = list(refs)
    # Ray prints task failures and retries on stdout: keep stdout for the command's output.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    try:
                        value = ray.get(ref)
                    except Exception as exc:
                        raise _cause(exc) from None
                    collect(index[ref], value)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            if pending:
                ray.wait(pending, num_returns=len(pending), timeout=CANCEL_WAIT_S)
            raise


def _cause(exc: BaseException) -> BaseException:
    """The task's own exception inside a ``RayTaskError``, when it is a maskhub error."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, MaskhubError) else exc
