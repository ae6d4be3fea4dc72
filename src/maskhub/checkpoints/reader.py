"""Streaming a checkpoint's files into the page cache ahead of a diff, one stream per file.

The diff computes on ``mmap`` views (:mod:`maskhub.checkpoints.mapped`), which is the fastest
way to touch pages that are already cached. On a cold cache, faults on the mapping with
small read-ahead hints alternating between two files left the disk at half its speed: here
each file gets its own thread that reads its byte ranges in order with large ``pread`` calls
into one reused buffer (sequential I/O the device and the kernel stream at full speed),
staying a bounded distance ahead of the compute. A range already in the page cache is
skipped after a one-page probe (``preadv(..., RWF_NOWAIT)`` reads only cached data), so a
warm diff pays nothing for it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

#: Bytes per read.
READ_STEP = 8 << 20
#: Platform support: ``preadv`` with ``RWF_NOWAIT`` (Linux >= 4.14) for the residency probe.
_NOWAIT = hasattr(os, "preadv") and hasattr(os, "RWF_NOWAIT")
_FADVISE = hasattr(os, "posix_fadvise")


def cached(fd: int, offset: int, probe: memoryview) -> bool:
    """Whether the page at ``offset`` of ``fd`` is in the page cache (never blocks on I/O).

    Unknown (no ``RWF_NOWAIT``): ``False``, so the caller reads."""
    if not _NOWAIT:
        return False
    try:
        return os.preadv(fd, [probe], offset, os.RWF_NOWAIT) > 0
    except (BlockingIOError, OSError):
        return False


def fill(fd: int, offset: int, length: int, buf: bytearray) -> None:
    """Bring ``[offset, offset + length)`` of ``fd`` into the page cache: nothing when its
    last page is cached already, else sequential reads into ``buf`` (reused; empty: made
    here at the step's size, so that a warm diff never allocates it)."""
    if length <= 0:
        return
    if cached(fd, offset + length - 1, memoryview(bytearray(1))):
        return
    if not buf:
        buf.extend(bytes(READ_STEP))
    view = memoryview(buf)
    end = offset + length
    while offset < end:
        n = os.preadv(fd, [view[: min(len(buf), end - offset)]], offset)
        if n <= 0:  # the file is shorter than its header says: the mapping reports it
            return
        offset += n


class Stream:
    """The ranges of one file, in the order the compute consumes them, each with the global
    position (bytes of all files consumed before it) at which the compute reaches it."""

    def __init__(self, fd: int) -> None:
        """An empty stream for the open file ``fd``."""
        self.fd = fd
        self.ranges: list[tuple[int, int, int]] = []  # (global position, begin, end)

    def add(self, position: int, begin: int, end: int) -> None:
        """One more range, reached when the compute has consumed ``position`` bytes."""
        self.ranges.append((position, begin, end))


class ReadWindow:
    """Reader threads that stay at most ``ahead`` bytes (of all files together, in the order
    the compute consumes them) beyond what the compute has taken; subclasses say what each
    thread reads (:meth:`threads_to_start`)."""

    def __init__(self, ahead: int) -> None:
        """Nothing runs before :meth:`start`."""
        self.ahead = ahead
        self.consumed = 0
        self.stopped = False
        self.cond = threading.Condition()
        self.threads: list[threading.Thread] = []

    def threads_to_start(self) -> list[threading.Thread]:
        """The reader threads (made by :meth:`start`)."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the threads."""
        self.threads = self.threads_to_start()
        for t in self.threads:
            t.start()

    def advance(self, nbytes: int) -> None:
        """The compute took ``nbytes`` more bytes (of any file)."""
        with self.cond:
            self.consumed += nbytes
            self.cond.notify_all()

    def stop(self) -> None:
        """End the threads at their next step and wait for them."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for t in self.threads:
            if t.is_alive():
                t.join()

    def wait_turn(self, position: int) -> bool:
        """Block until the byte at global ``position`` is within the window; ``False`` once
        the reader is stopped. Called with :attr:`cond` held."""
        while not self.stopped and position - self.consumed > self.ahead:
            self.cond.wait()
        return not self.stopped


class StreamReader(ReadWindow):
    """One thread per file reading ahead of the compute into the page cache."""

    def __init__(self, streams: Sequence[Stream], ahead: int, step: int = READ_STEP) -> None:
        """``streams``: one per file; nothing runs before :meth:`start`."""
        super().__init__(ahead)
        self.streams = [s for s in streams if s.ranges]
        self.step = step

    def threads_to_start(self) -> list[threading.Thread]:
        """One thread per stream."""
        return [threading.Thread(target=self._run, args=(s,), daemon=True,
                                 name=f"maskhub-read-{i}")
                for i, s in enumerate(self.streams)]

    def _run(self, stream: Stream) -> None:
        buf = bytearray()  # made on the first read that is needed
        for position, begin, end in stream.ranges:
            for start in range(begin, end, self.step):
                length = min(self.step, end - start)
                with self.cond:
                    if not self.wait_turn(position + (start - begin)):
                        return
                try:
                    fill(stream.fd, start, length, buf)
                except OSError:  # read-ahead only: the mapping still reads on demand
                    if _FADVISE:
                        try:
                            os.posix_fadvise(stream.fd, start, length, os.POSIX_FADV_WILLNEED)
                        except OSError:
                            pass
