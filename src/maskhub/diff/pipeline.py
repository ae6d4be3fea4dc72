"""Diff two checkpoints tensor by tensor into a mask store, as a pipeline.

Three stages run at once, so the slowest one (the disk on a cold cache) sets the pace:

* **read**: both checkpoints are memory-mapped (:mod:`maskhub.checkpoints.mapped`); one
  reader thread per file streams it into the page cache with large sequential reads up to
  :data:`READ_AHEAD` bytes beyond the chunks being computed, skipping what is cached
  already (:mod:`maskhub.checkpoints.reader`); on the CPU, when the pair is larger than the
  memory available, a large file that is not cached is instead read around the page cache
  into the chunks' own buffers (:mod:`maskhub.checkpoints.direct`), which spares the CPU the
  page cache's work;
* **compute**: a thread pool runs the kernel on fixed-size chunks straight from the mapping
  (the kernel releases the GIL), each chunk writing its slice of the tensor's packed bits;
  pages a chunk has finished with are dropped from the process (they stay in the page cache);
* **write**: a writer thread compresses and stores each finished tensor while the next ones
  are computed.

Memory stays bounded whatever the model size: a window of chunks in flight, the packed bits
of the tensors not yet written (1/16 of a bf16 pair), and a bounded queue to the writer.
On CUDA the compute stage is :class:`~maskhub.kernels.gpukernel.CudaDiffer`.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from maskhub.checkpoints import fingerprint as fp
from maskhub.checkpoints.direct import (
    DIRECT_AHEAD,
    DirectReader,
    open_direct,
    pair_outgrows_cache,
)
from maskhub.checkpoints.header import TensorInfo
from maskhub.checkpoints.mapped import MappedCheckpoint, Region
from maskhub.checkpoints.reader import Stream, StreamReader
from maskhub.checkpoints.sources import Checkpoint
from maskhub.kernels.chunkstats import ChunkStatsFn, chunk_stats_fn, has_delta
from maskhub.kernels.kernel import CHUNK, ChunkFn, DiffKernel
from maskhub.kernels.patchbits import bits_view, patch_chunk
from maskhub.kernels.precision import DeltaMaxFn, delta_max_fn
from maskhub.kernels.strata import BINS, StrataCache, StrataFn, strata_fn, strata_rows
from maskhub.kernels.strata import FORMATS as STRATA_FORMATS
from maskhub.kernels.threads import available_cpus
from maskhub.schemas.dtypes import itemsize
from maskhub.schemas.metadata import TensorStats
from maskhub.schemas.names import parse_tensor_name
from maskhub.schemas.progress import ProgressFn
from maskhub.storage.store import MaskWriter

#: Bytes the readers may read ahead of the chunks handed to the kernel (all files together).
READ_AHEAD = 256 << 20
#: Finished tensors that may wait for the writer.
WRITE_QUEUE = 8



@dataclass
class DiffOutcome:
    """What a diff found, before it is registered."""

    tensors: list[TensorStats] = field(default_factory=list)
    sweep: list[tuple[str, float, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: ``(tensor, stratum, numel, n_updated)``: the magnitude strata (:mod:`maskhub.kernels.
    #: strata`), the ``tensor_strata`` rows.
    strata: list[tuple[str, int, int, int]] = field(default_factory=list)
    #: Per-tensor content digests of each side (:mod:`maskhub.checkpoints.fingerprint`).
    base_digests: dict[str, bytes] = field(default_factory=dict)
    target_digests: dict[str, bytes] = field(default_factory=dict)

    @property
    def base_fingerprint(self) -> str | None:
        """Content fingerprint of the base's compared tensors (``None`` if not hashed)."""
        return fp.combine(self.base_digests) if self.base_digests or not self.tensors else None

    @property
    def target_fingerprint(self) -> str | None:
        """Content fingerprint of the target's compared tensors."""
        return fp.combine(self.target_digests) if self.target_digests or not self.tensors \
            else None

    @property
    def n_params(self) -> int:
        """Parameters compared."""
        return sum(t.numel for t in self.tensors)

    @property
    def n_updated(self) -> int:
        """Parameters updated."""
        return sum(t.n_updated for t in self.tensors)

    def dtype_summary(self) -> str:
        """``"bfloat16"`` when both sides share one dtype, else ``"base->target"`` or lists."""
        base = sorted({t.base_dtype for t in self.tensors})
        target = sorted({t.target_dtype for t in self.tensors})
        b, t = ",".join(base), ",".join(target)
        return b if b == t else f"{b}->{t}"


def compute_threads() -> int:
    """Threads for the compute stage: the CPUs this process may use."""
    return available_cpus()


#: Bytes behind a finished tensor released again (folios faulted back across its start).
RELEASE_SLACK = 8 << 20


@dataclass
class _Job:
    """One tensor pair going through the pipeline."""

    name: str
    a_info: TensorInfo
    b_info: TensorInfo
    a: Region
    b: Region
    packed: np.ndarray
    counts: np.ndarray
    strata: np.ndarray  # int64 [2, BINS]: entries and updated entries per exponent of θ0
    known: np.ndarray | None = None  # the entries' histogram, from the strata cache
    remaining: int = 0
    #: A patch: the target's values (raw bits) at the set bits, per chunk start.
    values: dict[int, np.ndarray] | None = None

    def patch_values(self) -> np.ndarray:
        """The values of every chunk, in flat order."""
        assert self.values is not None
        parts = [self.values[s] for s in sorted(self.values)]
        if not parts:
            return bits_view(np.empty(0, dtype=np.uint8), self.b_info.dtype).copy()
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    #: The largest |Δ| over the updated entries so far; None for dtypes without a null.
    dmax: float | None = None
    #: Per side: the direct descriptor its chunks are read from (-1: the mapping).
    a_dfd: int = -1
    b_dfd: int = -1
    a_chunks: list[bytes] = field(default_factory=list)  # chunk digests, by chunk index
    b_chunks: list[bytes] = field(default_factory=list)

    def digests(self) -> tuple[bytes, bytes]:
        """The tensor digests of both sides, once every chunk was hashed."""
        return (fp.tensor_digest(self.name, self.a_info.dtype, self.a_info.shape, self.a_chunks),
                fp.tensor_digest(self.name, self.b_info.dtype, self.b_info.shape, self.b_chunks))


class _Prefetcher:
    """The read stage: page-cache streams for mapped files, a :class:`DirectReader` for the
    files read around the cache; the compute loops tell both what they consumed."""

    def __init__(self, streams: StreamReader, direct: DirectReader,
                 dfds: dict[int, int]) -> None:
        self.streams = streams
        self.direct = direct
        #: ``id(MappedFile)`` -> its direct descriptor, for the files read around the cache.
        self.dfds = dfds

    def start(self) -> None:
        """Start the reader threads."""
        self.streams.start()
        self.direct.start()

    def advance(self, nbytes: int) -> None:
        """The compute took ``nbytes`` more bytes (of any file)."""
        self.streams.advance(nbytes)
        if self.dfds:  # no lock taken per chunk where nothing is read around the cache
            self.direct.advance(nbytes)

    def stop(self) -> None:
        """End the reader threads and close the direct descriptors."""
        self.streams.stop()
        self.direct.close()


def _reader(mb: MappedCheckpoint, mt: MappedCheckpoint, names: Sequence[str],
            direct_ok: bool) -> _Prefetcher:
    """One read-ahead stream per file of both checkpoints, in the order the jobs consume
    them (:mod:`maskhub.checkpoints.reader`); ``direct_ok``: files that should be read
    around the page cache are (:mod:`maskhub.checkpoints.direct`)."""
    streams: dict[int, Stream] = {}
    direct = DirectReader(DIRECT_AHEAD)
    dfds: dict[int, int] = {}
    checked: set[int] = set()
    outgrows = direct_ok and pair_outgrows_cache(
        sum(len(f.buf) for m in (mb, mt) for f in m.files.values()))
    position = 0
    try:
        for name in names:
            ra, rb = mb.region(name), mt.region(name)
            sides = ((ra, mb.ckpt.tensors[name].dtype), (rb, mt.ckpt.tensors[name].dtype))
            for r, dtype in sides:  # both sides of a tensor are consumed together
                key = id(r.file)
                if direct_ok and key not in checked:
                    checked.add(key)
                    dfd = open_direct(r.file.path, len(r.file.buf), r.file.fd, outgrows)
                    if dfd is not None:
                        dfds[key] = dfd
                if key in dfds:
                    direct.add(dfds[key], position, r.begin, r.end, CHUNK * itemsize(dtype))
                else:
                    streams.setdefault(key, Stream(r.file.fd)).add(position, r.begin, r.end)
            position += (ra.end - ra.begin) + (rb.end - rb.begin)
    except BaseException:
        direct.close()
        raise
    return _Prefetcher(StreamReader(list(streams.values()), READ_AHEAD), direct, dfds)


class _WriterThread(threading.Thread):
    """Compresses and stores finished tensors in order."""

    def __init__(self, writer: MaskWriter) -> None:
        super().__init__(name="maskhub-writer", daemon=True)
        self.writer = writer
        self.queue: queue.Queue[tuple[TensorStats, np.ndarray, np.ndarray | None] | None] = \
            queue.Queue(WRITE_QUEUE)
        self.error: BaseException | None = None
        self.cancelled = False

    def put(self, stats: TensorStats, packed: np.ndarray,
            values: np.ndarray | None = None) -> None:
        """Queue one tensor (blocks while the queue is full); re-raises a writer failure."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put((stats, packed, values), timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait until everything queued is written; re-raises a writer failure."""
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None and not self.cancelled:
                try:
                    self.writer.add(*item)
                except BaseException as exc:  # handed to the main thread
                    self.error = exc


def _side(region: Region, dfd: int, direct: DirectReader, lo: int, hi: int) -> np.ndarray:
    """Bytes ``[lo, hi)`` of one side: its direct read, else the mapping."""
    if dfd >= 0:
        data = direct.take(dfd, lo)
        if data is not None:
            return data
    return region.file.buf[lo:hi]


def _chunk_task(fn: ChunkFn, cfn: ChunkStatsFn, job: _Job, start: int, stop: int,
                counts: np.ndarray, strata: np.ndarray, dmax: np.ndarray,
                lossless: bool, direct: DirectReader) -> None:
    sa, sb = itemsize(job.a_info.dtype), itemsize(job.b_info.dtype)
    a0, a1 = job.a.begin + start * sa, job.a.begin + stop * sa
    b0, b1 = job.b.begin + start * sb, job.b.begin + stop * sb
    a = _side(job.a, job.a_dfd, direct, a0, a1)
    b = _side(job.b, job.b_dfd, direct, b0, b1)
    packed = job.packed[start // 8:(stop + 7) // 8]
    fn(a, b, packed, counts)
    if job.values is not None:  # a patch: widen the bits, keep the target's values
        job.values[start] = patch_chunk(a, b, job.a_info.dtype, job.b_info.dtype, packed,
                                        lossless)
    d = cfn(a, b, packed, stop - start, strata)  # strata and |Δ|: the chunk is in cache now
    if d is not None:
        dmax[0] = d
    if job.a_chunks:  # content identity, hashed while the chunk is in cache
        k = start // CHUNK
        job.a_chunks[k] = fp.chunk_digest(a)
        job.b_chunks[k] = fp.chunk_digest(b)
    del a, b  # views into the direct reader's buffers, handed back now
    for dfd, f, lo, hi in ((job.a_dfd, job.a.file, a0, a1), (job.b_dfd, job.b.file, b0, b1)):
        if dfd >= 0:
            direct.release(dfd, lo)
        else:
            f.release(lo, hi - lo)


assert CHUNK == fp.CHUNK, "the fingerprint's chunks are the diff's chunks"


def run_diff(base: Checkpoint, target: Checkpoint, names: Sequence[str], kernel: DiffKernel,
             writer: MaskWriter, progress: ProgressFn | None = None,
             strata_cache: StrataCache | None = None, patch: bool = False,
             fingerprint: bool = True) -> DiffOutcome:
    """Diff every named tensor pair with ``kernel`` and write its bits with ``writer``.

    ``progress(tensors_done, tensors_total, bytes_done, bytes_total, name)`` is called from
    this thread after each tensor, in order. ``strata_cache``: where the base tensors'
    exponent histograms are kept between diffs (see :class:`~maskhub.kernels.strata.
    StrataCache`). ``patch``: also store the target's values at the set bits; at
    ``kernel.tol == 0`` the mask is widened to every entry whose bits differ
    (:mod:`maskhub.kernels.patchbits`), so that the patch rebuilds the target exactly.
    StrataCache`). ``fingerprint``: also hash every chunk of both sides into the content
    fingerprints (:mod:`maskhub.checkpoints.fingerprint`; False only to measure its cost).
    """
    lossless = patch and kernel.tol == 0
    outcome = DiffOutcome()
    total_bytes = sum(base.tensors[n].nbytes + target.tensors[n].nbytes for n in names)
    with MappedCheckpoint(base) as mb, MappedCheckpoint(target) as mt:
        prefetch = _reader(mb, mt, names, direct_ok=not kernel.on_cuda)
        wthread = _WriterThread(writer)
        done_bytes = 0

        def jobs() -> Iterator[_Job]:
            for name in names:  # made one by one: packed bits live only until written
                a_info, b_info = base.tensors[name], target.tensors[name]
                n_chunks = -(-a_info.numel // CHUNK) if fingerprint else 0
                ra, rb = mb.region(name), mt.region(name)
                yield _Job(name, a_info, b_info, ra, rb,
                           np.empty((a_info.numel + 7) // 8, dtype=np.uint8),
                           np.zeros(len(kernel.tols), dtype=np.int64),
                           np.zeros((2, BINS), dtype=np.int64),
                           strata_cache.load(a_info) if strata_cache else None,
                           values={} if patch else None,
                           a_chunks=[b""] * n_chunks, b_chunks=[b""] * n_chunks,
                           a_dfd=prefetch.dfds.get(id(ra.file), -1),
                           b_dfd=prefetch.dfds.get(id(rb.file), -1))

        def finish_job(i: int, job: _Job) -> None:
            nonlocal done_bytes
            for r in (job.a, job.b):  # whatever large folios left mapped around it
                r.file.release(r.begin - RELEASE_SLACK, r.end - r.begin + RELEASE_SLACK)
            values = job.patch_values() if patch else None
            stats = _stats(job, None if values is None else values.shape[0])
            if fingerprint:
                outcome.base_digests[job.name], outcome.target_digests[job.name] = \
                    job.digests()
            wthread.put(stats, job.packed, values)
            outcome.tensors.append(stats)
            outcome.sweep.extend((job.name, t, int(c)) for t, c in
                                 zip(kernel.sweep, job.counts[1:], strict=True))
            if job.known is not None:
                job.strata[0] = job.known
            elif strata_cache is not None and job.a_info.dtype in STRATA_FORMATS:
                strata_cache.save(job.a_info, job.strata[0])
            if job.a_info.numel:
                outcome.strata.extend(strata_rows(job.name, job.a_info.dtype, job.strata))
            done_bytes += job.a_info.nbytes + job.b_info.nbytes
            if progress:
                progress(i + 1, len(names), done_bytes, total_bytes, job.name)

        wthread.start()
        try:
            prefetch.start()
            if kernel.on_cuda:
                _run_cuda(jobs(), kernel, prefetch, finish_job, lossless)
            else:
                _run_cpu(jobs(), kernel, prefetch, finish_job, lossless)
            wthread.finish()
        finally:
            prefetch.stop()  # joins, before the files it reads are closed
            if wthread.is_alive():  # an error elsewhere: drop what is still queued
                wthread.cancelled = True
                wthread.queue.put(None)
                wthread.join()
    return outcome


def _stats(job: _Job, n_updated: int | None = None) -> TensorStats:
    layer, module = parse_tensor_name(job.name)
    n = int(job.counts[0]) if n_updated is None else n_updated
    return TensorStats(job.name, job.a_info.shape, job.a_info.numel, n, layer,
                       module, job.a_info.dtype, job.b_info.dtype, max_abs_delta=job.dmax)


def _strata_fn(kernel: DiffKernel, dtype: str, entries: bool = True) -> StrataFn:
    return strata_fn(dtype, "numba" if kernel.backend == "numba" else "numpy", entries)


def _delta_fn(kernel: DiffKernel, a_dtype: str, b_dtype: str) -> DeltaMaxFn | None:
    return delta_max_fn(a_dtype, b_dtype, "numba" if kernel.backend == "numba" else "numpy")


def _stats_fn(kernel: DiffKernel, a_dtype: str, b_dtype: str, entries: bool) -> ChunkStatsFn:
    return chunk_stats_fn(a_dtype, b_dtype, "numba" if kernel.backend == "numba" else "numpy",
                          entries)


def _run_cpu(jobs: Iterator[_Job], kernel: DiffKernel, prefetch: _Prefetcher,
             finish_job: Callable[[int, _Job], None], lossless: bool = False) -> None:
    threads = compute_threads()
    window = 4 * threads
    fns: dict[tuple[str, str], ChunkFn] = {}
    cfns: dict[tuple[str, str, bool], ChunkStatsFn] = {}
    # (job index, job, future, the job's per-chunk counts, strata and |Δ|: one allocation
    # per tensor, not three per chunk, summed once the tensor's last chunk is done)
    inflight: deque[tuple[int, _Job, Future[None] | None,
                          tuple[np.ndarray, np.ndarray, np.ndarray] | None]] = deque()

    def pop_oldest() -> None:
        i, job, fut, acc = inflight.popleft()
        if fut is not None:
            fut.result()
            job.remaining -= 1
        if job.remaining == 0:
            if acc is not None:
                counts, strata, dmax = acc
                job.counts += counts.sum(axis=0)
                job.strata += strata.sum(axis=0)
                if job.dmax is not None:
                    job.dmax = max(job.dmax, float(dmax.max()))
            finish_job(i, job)

    with ThreadPoolExecutor(threads, thread_name_prefix="maskhub-diff") as pool:
        try:
            for i, job in enumerate(jobs):
                key = (job.a_info.dtype, job.b_info.dtype)
                fn = fns.get(key) or fns.setdefault(key, kernel.chunk_fn(*key))
                ckey = (*key, job.known is None)
                cfn = cfns.get(ckey) or cfns.setdefault(ckey, _stats_fn(kernel, *ckey))
                job.dmax = 0.0 if has_delta(*key) else None
                n = job.a_info.numel
                starts = range(0, n, CHUNK)
                job.remaining = len(starts)
                if not starts:  # an empty tensor: finished in order with the others
                    inflight.append((i, job, None, None))
                    continue
                acc = (np.zeros((len(starts), len(kernel.tols)), dtype=np.int64),
                       np.zeros((len(starts), 2, BINS), dtype=np.int64),
                       np.zeros(len(starts), dtype=np.float64))
                step = itemsize(key[0]) + itemsize(key[1])
                for k, start in enumerate(starts):
                    stop = min(n, start + CHUNK)
                    fut = pool.submit(_chunk_task, fn, cfn, job, start, stop, acc[0][k],
                                      acc[1][k], acc[2][k:k + 1], lossless,
                                      prefetch.direct)
                    inflight.append((i, job, fut, acc))
                    prefetch.advance((stop - start) * step)
                    while len(inflight) > window:
                        pop_oldest()
            while inflight:
                pop_oldest()
        except BaseException:
            for _, _, fut, _ in inflight:
                if fut is not None:
                    fut.cancel()
            raise


def _run_cuda(jobs: Iterator[_Job], kernel: DiffKernel, prefetch: _Prefetcher,
              finish_job: Callable[[int, _Job], None], lossless: bool = False) -> None:
    from maskhub.kernels.gpukernel import CudaDiffer

    differ = CudaDiffer.for_kernel(kernel)
    for i, job in enumerate(jobs):
        n = job.a_info.numel
        if n:
            job.counts += differ.diff(job.a.raw(), job.b.raw(), job.a_info.dtype,
                                      job.b_info.dtype, n, job.packed)
            if job.values is not None:  # a patch: its values are gathered on the CPU
                sa, sb = itemsize(job.a_info.dtype), itemsize(job.b_info.dtype)
                for start in range(0, n, CHUNK):
                    stop = min(n, start + CHUNK)
                    job.values[start] = patch_chunk(
                        job.a.raw()[start * sa:stop * sa], job.b.raw()[start * sb:stop * sb],
                        job.a_info.dtype, job.b_info.dtype,
                        job.packed[start // 8:(stop + 7) // 8], lossless)
            _strata_fn(kernel, job.a_info.dtype, job.known is None)(job.a.raw(), job.packed, n,
                                                                  job.strata)
            for side, chunks, info in ((job.a, job.a_chunks, job.a_info),
                                       (job.b, job.b_chunks, job.b_info)):
                if not chunks:
                    continue
                step = CHUNK * itemsize(info.dtype)
                for k, start in enumerate(range(side.begin, side.end, step)):
                    chunks[k] = fp.chunk_digest(side.file.buf[start:min(side.end, start + step)])
        dfn = _delta_fn(kernel, job.a_info.dtype, job.b_info.dtype)
        if dfn is not None:
            job.dmax = dfn(job.a.raw(), job.b.raw(), job.packed, n) if n else 0.0
        job.a.file.release(job.a.begin, job.a.end - job.a.begin)
        job.b.file.release(job.b.begin, job.b.end - job.b.begin)
        prefetch.advance(job.a_info.nbytes + job.b_info.nbytes)
        finish_job(i, job)
