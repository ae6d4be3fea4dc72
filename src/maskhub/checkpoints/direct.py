"""Reading a cold checkpoint file around the page cache (``O_DIRECT``), chunk by chunk.

On a cold cache, reading through the page cache costs CPU the diff needs: every page is
allocated, copied or mapped, and (once memory is full) reclaimed again. Measured on the
2-core machine of BENCHMARKS.md, two 4 GiB files read with 8 MiB ``pread`` calls took
0.6-1.0 CPU-s per GB through the page cache and 0.05-0.06 CPU-s per GB with ``O_DIRECT``
(the device writes into the process's buffers), against a diff that needs ~0.6 CPU-s per
GB of its own. So for a file that is not cached, one thread per file reads the byte range of
each chunk the diff will compute, in the order it computes them, straight into aligned
buffers, staying a bounded distance ahead; the chunk task takes its bytes from there instead
of the mapping (:meth:`DirectReader.take`).

This pays where the page cache cannot help: a pair larger than the memory available, which
the cache would only churn through (a 26 GB-per-side pair: 45 s and 49 CPU-s around the
cache, 59 s and 98 CPU-s through it). A pair that fits stays on the mapping: read through
the cache, it is there for the next command (a sweep diffs many targets against one base),
and on the VM measured, buffered reads of a cold 2 GB pair that fits were faster (1.0 GB/s
against 0.8 end to end). A file that is cached, small, or on a file system without
``O_DIRECT`` (tmpfs) keeps the mapping too.

``MASKHUB_DIRECT_IO``: ``0`` never reads around the cache, ``1`` does for every file that
allows it (tests, benchmarks); unset: when the pair is larger than the memory available,
files of at least :data:`DIRECT_MIN` bytes whose sampled pages are not cached.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Sequence

import numpy as np

from maskhub.checkpoints.reader import ReadWindow, cached

#: Alignment of offsets, lengths and buffers for ``O_DIRECT`` (a page covers every device).
ALIGN = mmap.PAGESIZE
#: Smallest file read around the cache when the choice is automatic.
DIRECT_MIN = 64 << 20
#: Bytes read ahead of the chunks handed to the kernel (all files together). Unlike pages
#: in the page cache these count in the process's memory, so the window is smaller than the
#: mapped path's: reads of a few MiB on each file's thread keep the device busy.
DIRECT_AHEAD = 8 << 20
#: Largest single read (several consecutive chunks of one tensor go in one read).
READ_MAX = 4 << 20
#: Pages sampled to tell whether a file is cached.
_SAMPLES = 8
_HAS_DIRECT = hasattr(os, "O_DIRECT")


def _mode() -> str:
    return os.environ.get("MASKHUB_DIRECT_IO", "").strip()


def memory_available() -> int | None:
    """Bytes of memory the kernel says are available (``MemAvailable``); ``None`` if unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pair_outgrows_cache(nbytes: int) -> bool:
    """Whether ``nbytes`` of input (both checkpoints) exceed the memory available, so that
    the page cache could not keep them (unknown: ``False``, the mapping)."""
    available = memory_available()
    return available is not None and nbytes > available


def open_direct(path: str | os.PathLike[str], size: int, fd: int,
                outgrows_cache: bool = True) -> int | None:
    """A second descriptor of ``path`` opened with ``O_DIRECT``, when this file should be
    read around the page cache (see the module's docstring); ``None`` otherwise. ``fd``: the
    buffered descriptor already open, used to sample the cache; ``outgrows_cache``: whether
    the whole pair is larger than the memory available (:func:`pair_outgrows_cache`)."""
    mode = _mode()
    if not _HAS_DIRECT or mode == "0" or size == 0:
        return None
    if mode != "1":
        if size < DIRECT_MIN or not outgrows_cache:
            return None
        probe = memoryview(bytearray(1))
        hits = sum(cached(fd, size * k // _SAMPLES, probe) for k in range(_SAMPLES))
        if hits * 2 >= _SAMPLES:  # mostly cached: the mapping is faster
            return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:  # EINVAL: the file system does not support it
        return None


class _Group:
    """Consecutive chunks of one file read together into one pooled buffer, which goes back
    to the pool once every chunk was handed back (:meth:`DirectReader.release`)."""

    __slots__ = ("buf", "remaining")

    def __init__(self, n: int) -> None:
        self.buf: mmap.mmap | None = None
        self.remaining = n


class _Piece:
    """The bytes of one chunk of one side, once read (or the reason they could not be)."""

    __slots__ = ("data", "error", "group", "ready")

    def __init__(self) -> None:
        self.data: np.ndarray | None = None
        self.error: BaseException | None = None
        self.group: _Group | None = None
        self.ready = False


class DirectReader(ReadWindow):
    """One thread per file reading the chunks of its tensors in the order the diff computes
    them, at most ``ahead`` bytes (of all files together) beyond what it has handed out."""

    def __init__(self, ahead: int) -> None:
        """An empty reader; :meth:`add` the chunks, then :meth:`start`."""
        super().__init__(ahead)
        #: Per direct descriptor: ``[(global position, [(begin, end), ...]), ...]``, each
        #: group of chunks read together.
        self.plans: dict[int, list[tuple[int, list[tuple[int, int]]]]] = {}
        self.pieces: dict[tuple[int, int], _Piece] = {}
        # Reused buffers: a fresh mapping per read costs its page faults and zeroing again
        # (measured: 1.04 CPU-s per GB read, against 0.065 into a reused buffer).
        self.pool: list[mmap.mmap] = []

    def add(self, dfd: int, position: int, begin: int, end: int, step: int) -> None:
        """The range ``[begin, end)`` of the file open as ``dfd``, consumed in chunks of
        ``step`` bytes from global position ``position`` on."""
        groups = self.plans.setdefault(dfd, [])
        group: list[tuple[int, int]] = []
        gpos = position
        for start in range(begin, end, step):
            stop = min(end, start + step)
            if group and stop - group[0][0] > READ_MAX:
                groups.append((gpos, group))
                group, gpos = [], position + (start - begin)
            group.append((start, stop))
            self.pieces[(dfd, start)] = _Piece()
        if group:
            groups.append((gpos, group))

    def threads_to_start(self) -> list[threading.Thread]:
        """One thread per file."""
        return [threading.Thread(target=self._run, args=(dfd, groups), daemon=True,
                                 name=f"maskhub-direct-{i}")
                for i, (dfd, groups) in enumerate(self.plans.items())]

    def take(self, dfd: int, begin: int) -> np.ndarray | None:
        """The bytes of the chunk starting at ``begin`` (waits for its read); ``None`` when it
        could not be read here (a short file, an I/O error), so that the caller reads it
        through the mapping, which reports the problem as it does for every file."""
        piece = self.pieces[(dfd, begin)]
        with self.cond:
            while not piece.ready and not self.stopped:
                self.cond.wait()
        return piece.data if piece.error is None else None

    def release(self, dfd: int, begin: int) -> None:
        """The chunk :meth:`take` gave is no longer used: its buffer may be read into again
        once the other chunks of its read are released too."""
        with self.cond:
            piece = self.pieces.pop((dfd, begin), None)
            group = piece.group if piece is not None else None
            if piece is not None:
                piece.data = None
            if group is not None:
                group.remaining -= 1
                if group.remaining == 0 and group.buf is not None:
                    self.pool.append(group.buf)
                    group.buf = None

    def _run(self, dfd: int, groups: Sequence[tuple[int, list[tuple[int, int]]]]) -> None:
        for position, group in groups:
            with self.cond:
                if not self.wait_turn(position):
                    return
                buf = self.pool.pop() if self.pool else None
            if buf is None:
                buf = mmap.mmap(-1, BUFFER)
            data: np.ndarray | None = None
            error: BaseException | None = None
            try:
                data = _read_aligned(dfd, group[0][0], group[-1][1], buf)
            except OSError as exc:
                error = exc
            g = _Group(len(group))
            g.buf = buf
            with self.cond:
                lo = group[0][0] // ALIGN * ALIGN
                for start, stop in group:
                    piece = self.pieces[(dfd, start)]
                    if data is not None:
                        piece.data = data[start - lo:stop - lo]
                    piece.error = error
                    piece.group = g
                    piece.ready = True
                self.cond.notify_all()

    def close(self) -> None:
        """Stop, then close the direct descriptors (the buffers go with the last views)."""
        self.stop()
        for dfd in self.plans:
            os.close(dfd)
        self.plans.clear()
        self.pool.clear()


#: Size of a pooled buffer: the largest read, rounded out to :data:`ALIGN` at both ends.
BUFFER = READ_MAX + 2 * ALIGN


def _read_aligned(dfd: int, begin: int, end: int, buf: mmap.mmap) -> np.ndarray:
    """``[begin, end)`` rounded out to :data:`ALIGN`, read with ``O_DIRECT`` into ``buf``
    (page-aligned, at least that long); the bytes from the rounded-down ``begin`` on.
    Raises ``OSError`` when the file ends before ``end``."""
    lo = begin // ALIGN * ALIGN
    hi = -(-end // ALIGN) * ALIGN
    view = memoryview(buf)[:hi - lo]
    got = 0
    while got < end - lo:
        n = os.preadv(dfd, [view[got:]], lo + got)
        if n <= 0:
            raise OSError(f"short read at byte {lo + got}")
        got += n
        if got % ALIGN and got < end - lo:  # O_DIRECT continues only at aligned offsets
            raise OSError(f"unaligned short read at byte {lo + got}")
    view.release()
    return np.frombuffer(buf, dtype=np.uint8, count=end - lo)
