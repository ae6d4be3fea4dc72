"""Ctrl-C at safe points only.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be when SIGINT
arrives: inside a DuckDB commit, half-way through a store rename, inside zarr's event-loop
wait. Any of these can leave a registered mask without its store, a store without its row,
or a pipeline thread waiting forever. While a :func:`safe_interrupts` block runs, SIGINT only
sets a flag; :func:`check_interrupt` (called between tensors) turns it into a
``KeyboardInterrupt`` at a point where cleanup is known to work, and inside
:func:`critical_section` (the registration itself) it is not acted on at all: the few
milliseconds of the commit finish, and the command completes truthfully. A second Ctrl-C
outside a critical section stops at once, for users who really mean it.

Only the main thread can own signal handlers, and a handler someone else installed (a
notebook, a training framework) is left alone: there the functions do nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

_state = {"depth": 0, "critical": 0, "requested": False}
_previous: list[object] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state["requested"] and not _state["critical"]:
        raise KeyboardInterrupt  # the second Ctrl-C: stop now
    _state["requested"] = True


@contextmanager
def safe_interrupts() -> Iterator[None]:
    """Within the block, SIGINT is deferred to :func:`check_interrupt` (nestable)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state["depth"] == 0:
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield  # someone else's handler: leave it in charge
            return
        _previous.append(signal.signal(signal.SIGINT, _handler))
        _state["requested"] = False
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0:
            signal.signal(signal.SIGINT, _previous.pop())  # type: ignore[arg-type]
            _state["requested"] = False


def check_interrupt() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed since the block began (outside a
    critical section)."""
    if _state["requested"] and not _state["critical"]:
        _state["requested"] = False
        raise KeyboardInterrupt


@contextmanager
def critical_section() -> Iterator[None]:
    """Ctrl-C is neither raised nor acted on inside: what starts here finishes."""
    with safe_interrupts():
        _state["critical"] += 1
        try:
            yield
        finally:
            _state["critical"] -= 1


def interruptible(progress: Callable[[int, int, int, int, str], None] | None
                  ) -> Callable[[int, int, int, int, str], None]:
    """``progress`` preceded by :func:`check_interrupt`: a deferred Ctrl-C stops the work
    after the item (tensor) that just finished."""
    def fn(done: int, total: int, bytes_done: int, bytes_total: int, name: str) -> None:
        check_interrupt()
        if progress is not None:
            progress(done, total, bytes_done, bytes_total, name)
    return fn
