"""Zero-copy access to the tensors of safetensors files through ``mmap``.

The diff reads each tensor's raw bytes straight from the page cache (no copy, no fresh
allocation), asks the kernel to read ahead (``posix_fadvise(WILLNEED)``) so that a cold disk
streams while the CPU works, and drops the pages it has finished with from the process
(``madvise(MADV_DONTNEED)``: they stay in the page cache but leave the resident set), so that
the memory of a diff does not grow with the model.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskhub.checkpoints.header import TensorInfo, read_header
from maskhub.checkpoints.sources import Checkpoint
from maskhub.errors import CheckpointError, UsageError

PAGE = mmap.PAGESIZE
#: Descriptors left for the rest of the process (the registry, stores, the interpreter).
_FD_MARGIN = 256
# Both are advice: where the platform lacks them (macOS has no posix_fadvise) they are skipped.
_FADVISE = hasattr(os, "posix_fadvise")
_DONTNEED = hasattr(mmap, "MADV_DONTNEED") and hasattr(mmap.mmap, "madvise")


def allow_open_files(n: int) -> None:
    """Make room for ``n`` more open files: the soft limit is raised (up to the hard limit)
    when ``n`` plus a margin for the rest of the process exceeds it; a one-line
    :class:`~maskhub.errors.UsageError` when even the hard limit is too low (a trajectory maps
    every file of every checkpoint at once)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return
    need = n + _FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):  # macOS caps the soft limit below an unlimited hard one
        want = soft
    if want < need:
        raise UsageError(f"this needs about {need} open files and the limit is {want}: raise "
                         f"it (`ulimit -n {need}`) or pass fewer checkpoints or shards")


class MappedFile:
    """One safetensors file mapped read-only, with the absolute byte range of each tensor."""

    def __init__(self, path: Path, tensors: Iterable[TensorInfo] | None = None) -> None:
        """Map ``path``; ``tensors``: its tensors as :func:`~maskhub.checkpoints.header.
        read_header` gave them (read here when not given)."""
        self.path = Path(path)
        infos = list(read_header(self.path) if tensors is None else tensors)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            self.mm = mmap.mmap(self.fd, size, access=mmap.ACCESS_READ) if size else None
        except OSError as exc:
            os.close(self.fd)
            raise CheckpointError(f"cannot map {self.path}: {exc}", str(self.path)) from exc
        self.buf = (np.frombuffer(self.mm, dtype=np.uint8) if self.mm is not None
                    else np.empty(0, np.uint8))
        self.ranges = {i.name: (i.offset, i.end) for i in infos}

    def raw(self, name: str) -> np.ndarray:
        """The raw bytes of one tensor (a read-only view into the mapping)."""
        begin, end = self.ranges[name]
        return self.buf[begin:end]

    def willneed(self, start: int, length: int) -> None:
        """Ask the kernel to start reading ``[start, start+length)`` into the page cache."""
        if length > 0 and _FADVISE:
            os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_WILLNEED)

    def release(self, start: int, length: int) -> None:
        """Drop the pages covering ``[start, start+length)`` from this process's memory.

        Only advice on a read-only file mapping: the pages stay in the page cache, and a
        neighbour still reading a shared edge page simply faults it in again. Rounding
        outwards matters: the kernel maps whole (large) folios on a fault, so edge pages
        would otherwise stay resident, a few per chunk.
        """
        if self.mm is None or length <= 0 or not _DONTNEED:
            return
        lo = max(0, start // PAGE * PAGE)
        hi = min(len(self.mm), -(-(start + length) // PAGE) * PAGE)
        if hi > lo:
            self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        """Unmap and close (the mapping stays alive while views into it exist)."""
        self.buf = np.empty(0, np.uint8)
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a view is still referenced; unmapped when it goes
                pass
        os.close(self.fd)


@dataclass(frozen=True)
class Region:
    """Where one tensor's bytes lie."""

    file: MappedFile
    begin: int
    end: int

    def raw(self) -> np.ndarray:
        """The bytes as a read-only uint8 view."""
        return self.file.buf[self.begin:self.end]


class MappedCheckpoint:
    """The files of a :class:`Checkpoint`, mapped; a context manager that unmaps on exit."""

    def __init__(self, ckpt: Checkpoint) -> None:
        """Map every file that holds a tensor of ``ckpt``."""
        self.ckpt = ckpt
        self.files: dict[Path, MappedFile] = {}
        try:
            by_file: dict[Path, list[TensorInfo]] = {}
            for info in ckpt.tensors.values():
                by_file.setdefault(info.file, []).append(info)
            for path, infos in by_file.items():
                self.files[path] = MappedFile(path, infos)
        except BaseException:
            self.close()
            raise

    def region(self, name: str) -> Region:
        """The byte range of tensor ``name``."""
        f = self.files[self.ckpt.tensors[name].file]
        begin, end = f.ranges[name]
        return Region(f, begin, end)

    def close(self) -> None:
        """Unmap every file."""
        for f in self.files.values():
            f.close()
        self.files.clear()

    def __enter__(self) -> MappedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
