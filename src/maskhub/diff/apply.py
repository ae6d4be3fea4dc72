"""``apply``: a patch (a mask with values) and its base in, the target's safetensors out.

The output has BASE's file layout (the same shard file names, and
``model.safetensors.index.json`` when BASE has one, its ``total_size`` recomputed), the
target's dtypes, and tensors bit for bit equal to the target the patch was made from (for a
patch made at ``tol = 0``). No torch.

One pass, one chunk of :data:`APPLY_CHUNK` entries at a time, on a thread per CPU: each
chunk of BASE is read (``pread`` into a reused buffer), hashed for BASE's content fingerprint
(XXH3, while it is in cache), converted to the target's dtype where the two differ, the
chunk's values scattered in at its set bits (compiled; straight from the byte-gap code of a
low-density mask, never through packed bits) and written at its place in the output
(``pwrite``). The main thread meanwhile reads the next tensor's mask and values. Memory:
one tensor's stored mask and values (two while one ends and the next begins) plus one
buffer per chunk in flight. On a warm cache this runs at about the speed of ``cp`` of the
target (BENCHMARKS.md, ``bench/bench_patch.py``).

BASE must be the patch's base: the same tensor names, shapes and dtypes (and the same
revision when both are known), refused before anything is written; and, when the diff
recorded one, the same content fingerprint, computed from the bytes the pass read and
compared before the output is renamed into place (a base with other bytes costs one pass
and leaves nothing behind). Other files of a BASE directory (config, tokenizer) are copied
as they are. The output is written beside OUT and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maskhub.checkpoints import fingerprint as fp
from maskhub.checkpoints.header import PICKLE_SUFFIXES, TensorInfo
from maskhub.checkpoints.sources import INDEX_NAME, Checkpoint, open_checkpoint
from maskhub.core.identity import base_mismatch, recorded_base_fingerprint
from maskhub.core.record import MaskRecord
from maskhub.errors import (
    CheckpointError,
    MaskhubError,
    MaskMismatchError,
    PatchError,
    UsageError,
)
from maskhub.kernels.patchbits import GapScatter, PackedScatter, bits_view, convert_bits
from maskhub.kernels.threads import available_cpus
from maskhub.schemas.dtypes import SAFETENSORS_DTYPES, itemsize
from maskhub.schemas.metadata import MaskMetadata, TensorStats
from maskhub.schemas.progress import ProgressFn
from maskhub.storage.files import remove_tree

#: Entries per chunk (2 MiB of bf16: read, hashed, patched and written while in cache); a
#: multiple of the fingerprint's chunk, so that each chunk is hashed in the fingerprint's
#: own pieces.
APPLY_CHUNK = 1 << 20
assert APPLY_CHUNK % fp.CHUNK == 0
#: Other files of a BASE directory larger than this are not copied.
COPY_LIMIT = 64 << 20
_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class ApplyResult:
    """What :func:`apply` wrote."""

    mask: str
    out: str
    files: tuple[str, ...]
    n_tensors: int
    n_values: int
    nbytes: int
    exact: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"mask": self.mask, "out": self.out, "files": list(self.files),
                "n_tensors": self.n_tensors, "n_values": self.n_values, "bytes": self.nbytes,
                "exact": self.exact}


def check_base_identity(meta: MaskMetadata, base: Checkpoint, label: str) -> None:
    """Refuse ``base`` when what the patch recorded of its base's identity disagrees.

    Today: the revision, when the patch and ``base`` both know one (a Hub base). Hook for
    issue 26: when diffs record a content fingerprint of the base checkpoint, compare it
    here with ``base``'s (the one check that tells apart two checkpoints with the same
    tensor names, shapes and dtypes)."""
    if meta.base_revision and base.revision and meta.base_revision != base.revision:
        raise MaskMismatchError(
            f"{label} is not the base of mask {meta.name!r}: it is revision "
            f"{base.revision[:12]}, the mask was made from revision {meta.base_revision[:12]}")


def check_base(mask: MaskRecord, base: Checkpoint, label: str) -> list[TensorStats]:
    """The mask's tensor stats, after checking that ``base`` holds exactly the mask's
    tensors with the base's shapes and dtypes (else one :class:`MaskMismatchError` line)."""
    stats = mask.tensor_stats()
    head = f"{label} is not the base of mask {mask.name!r}"
    covered = {s.tensor for s in stats}
    missing = [s.tensor for s in stats if s.tensor not in base.tensors]
    extra = [n for n in base.tensors if n not in covered]
    if missing:
        raise MaskMismatchError(f"{head}: it lacks tensor {missing[0]!r}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                                missing_in_target=missing, missing_in_mask=extra)
    if extra:
        raise MaskMismatchError(f"{head}: it has tensor {extra[0]!r}, which the mask does not "
                                "cover" + (f" (and {len(extra) - 1} more)" if len(extra) > 1
                                           else ""), missing_in_mask=extra)
    for s in stats:
        info = base.tensors[s.tensor]
        if info.shape != s.shape or (s.base_dtype and info.dtype != s.base_dtype):
            raise MaskMismatchError(
                f"{head}: tensor {s.tensor!r} is {info.dtype} {list(info.shape)} there, the "
                f"mask's base had {s.base_dtype or '?'} {list(s.shape)}",
                shape_mismatches=[s.tensor])
    check_base_identity(mask.metadata, base, label)
    return stats


def hashes_base(mask: MaskRecord, base: Checkpoint, stats: list[TensorStats]) -> bool:
    """Whether ``apply`` checks BASE's content fingerprint: when the patch recorded one and
    BASE stores every tensor in the dtype the patch's base had (the fingerprint is of
    bytes: an fp32 copy of a bf16 base holds the same values in other bytes, and is
    compared by names, shapes and dtypes only, as ``verify`` does)."""
    return recorded_base_fingerprint(mask) is not None and all(
        s.base_dtype and base.tensors[s.tensor].dtype == s.base_dtype for s in stats)


def _file_metadata(path: Path) -> dict[str, str] | None:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n)).get("__metadata__")
    return meta if isinstance(meta, dict) else None


def _header(infos: list[TensorInfo], stats: dict[str, TensorStats],
            metadata: dict[str, str] | None) -> tuple[bytes, int]:
    doc: dict[str, Any] = {}
    if metadata is not None:
        doc["__metadata__"] = metadata
    offset = 0
    for info in infos:
        dtype = stats[info.name].target_dtype or info.dtype
        nbytes = info.numel * itemsize(dtype)
        doc[info.name] = {"dtype": _CODES[dtype], "shape": list(info.shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data section to 8 bytes
    return len(text).to_bytes(8, "little") + text, offset


class _ChunkWriter:
    """Runs the chunk tasks of one output file in a thread pool, each with its own reused
    buffers (a task's work, reads, hashing, the scatter and the write, releases the GIL).
    At most ``window`` chunks are in flight."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="maskhub-apply")
        self.window = 2 * threads
        self.inflight: deque[Future[Any]] = deque()
        self.free: list[dict[str, np.ndarray]] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(buffers, *args)`` in the pool (blocks while the window is full)."""
        while len(self.inflight) >= self.window:
            self.inflight.popleft().result()
        bufs = self.free.pop() if self.free else {}
        fut = self.pool.submit(fn, bufs, *args)
        fut.add_done_callback(lambda _f: self.free.append(bufs))
        self.inflight.append(fut)
        return fut

    def drain(self) -> None:
        """Wait for every chunk submitted (re-raises a task's error)."""
        while self.inflight:
            self.inflight.popleft().result()

    def drain_quietly(self) -> None:
        """Wait for every chunk submitted, ignoring their errors (on the way out of an
        error: nothing may still write into a file about to be closed)."""
        while self.inflight:
            try:
                self.inflight.popleft().result()
            except BaseException:
                pass

    def close(self) -> None:
        """Cancel what has not started, wait for the rest."""
        for fut in self.inflight:
            fut.cancel()
        self.pool.shutdown(wait=True)


def _buffer(bufs: dict[str, np.ndarray], role: str, nbytes: int) -> np.ndarray:
    """A reused uint8 buffer of at least ``nbytes`` (one per role and task slot)."""
    buf = bufs.get(role)
    if buf is None or buf.shape[0] < nbytes:
        buf = bufs[role] = np.empty(max(nbytes, APPLY_CHUNK * 2), dtype=np.uint8)
    return buf[:nbytes]


def _read_at(fd: int, buf: np.ndarray, offset: int, path: Path) -> None:
    done = 0
    view = memoryview(buf)
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path} ends before its tensors do (it was cut short or "
                                  "changed while being read)", str(path))
        done += n


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


@dataclass(frozen=True)
class _Chunk:
    """One chunk of one tensor: where its bytes lie in BASE and in the output."""

    src_fd: int
    src_path: Path
    src_offset: int
    dst_fd: int
    dst_offset: int
    n: int
    a_dtype: str
    b_dtype: str
    index: int
    hashed: bool


def _chunk_task(bufs: dict[str, np.ndarray], ch: _Chunk, plan: PackedScatter | GapScatter,
                values: np.ndarray) -> list[bytes]:
    """Read one chunk of BASE (``pread``: no page faults of a mapping), hash it for the
    base's fingerprint, convert it to the target's dtype if needed, scatter the chunk's
    values into it and ``pwrite`` it; return its fingerprint chunk digests."""
    sa, sb = itemsize(ch.a_dtype), itemsize(ch.b_dtype)
    raw = _buffer(bufs, "a", ch.n * sa)
    _read_at(ch.src_fd, raw, ch.src_offset, ch.src_path)
    digests = []
    if ch.hashed:
        step = fp.CHUNK * sa
        digests = [fp.chunk_digest(raw[i:i + step]) for i in range(0, raw.shape[0], step)]
    if ch.a_dtype == ch.b_dtype:
        out = raw.view(f"<u{sb}")
    else:
        out = _buffer(bufs, "b", ch.n * sb).view(f"<u{sb}")
        out[:] = convert_bits(bits_view(raw, ch.a_dtype), ch.a_dtype, ch.b_dtype)
    plan.scatter(ch.index, out, values)
    _write_at(ch.dst_fd, memoryview(out).cast("B"), ch.dst_offset)
    return digests


def _plan(mask: MaskRecord, st: TensorStats, b_dtype: str
          ) -> tuple[PackedScatter | GapScatter, np.ndarray]:
    """How one tensor's values are scattered, and the values (raw bits): both checked
    against the tensor's count (one :class:`PatchError` line naming the patch)."""
    store = mask.store
    if store.values_dtype(st.tensor) != b_dtype:
        raise PatchError(f"mask {mask.name!r}: the values of {st.tensor!r} are "
                         f"{store.values_dtype(st.tensor)!r}, its target dtype is {b_dtype!r}",
                         mask.name)
    values = np.ascontiguousarray(store.values(st.tensor)).view(f"<u{itemsize(b_dtype)}")
    encoding, stored = store.stored_bits(st.tensor)
    try:
        plan: PackedScatter | GapScatter = (
            PackedScatter(stored, st.numel, APPLY_CHUNK) if encoding is None
            else GapScatter(stored, st.numel, APPLY_CHUNK))
    except ValueError as exc:
        raise PatchError(f"mask {mask.name!r}: tensor {st.tensor!r}: {exc}", mask.name) from exc
    if plan.total != values.shape[0] or values.shape[0] != st.n_updated:
        raise PatchError(f"mask {mask.name!r}: {st.tensor!r} has {values.shape[0]} values for "
                         f"{plan.total} set bits", mask.name)
    return plan, values


def _base_files(base: Checkpoint) -> list[Path]:
    return list(dict.fromkeys(info.file for info in base.tensors.values()))


def apply(mask: MaskRecord, base: str | os.PathLike[str], out: str | os.PathLike[str], *,
          progress: ProgressFn | None = None,
          warn: Callable[[str], None] | None = None) -> ApplyResult:
    """Rebuild the target of patch ``mask`` from ``base`` into the directory ``out`` (which
    must not exist): see the module docstring."""
    if not mask.store.has_values:
        raise PatchError(f"mask {mask.name!r} holds no values, so it cannot rebuild its target: "
                         "make a patch with `maskhub diff BASE TARGET --patch`", mask.name)
    out_path = Path(out).expanduser()
    if out_path.exists():
        raise UsageError(f"{out} already exists: give a new directory for the rebuilt model")
    meta = mask.metadata
    if meta.tol > 0 and warn is not None:
        warn(f"mask {mask.name!r} was made at tol {meta.tol:g}: {out} holds the target only "
             f"where entries moved by more than {meta.tol:g} (a patch made at --tol 0 is exact)")
    base_ck = open_checkpoint(base)
    label = str(base)
    try:
        checked = check_base(mask, base_ck, label)
        stats = {s.tensor: s for s in checked}
        hashed = hashes_base(mask, base_ck, checked)
        where = base_ck.ref if base_ck.revision is None else f"{base_ck.ref}@{base_ck.revision}"
        staging = out_path.parent / f".{out_path.name}.partial-{os.getpid()}"
        try:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            remove_tree(staging)
            staging.mkdir()
            directory = _base_dir(base, base_ck)
            result, digests = _write(mask, base_ck, stats, staging, directory, progress,
                                     hashed)
            if hashed:
                # Content identity (issue 26), from the bytes the pass read: a base with the
                # same names, shapes and dtypes but other bytes is refused, and nothing it
                # made reaches OUT.
                line = base_mismatch(mask, fp.combine(digests), where)
                if line is not None:
                    raise MaskMismatchError(line)
            if directory is not None:
                _copy_other_files(directory, staging)
            os.rename(staging, out_path)
        except OSError as exc:
            remove_tree(staging)
            raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from exc
        except BaseException:
            remove_tree(staging)
            raise
    finally:
        base_ck.close()
    files, n_values, nbytes = result
    return ApplyResult(mask.name, str(out_path), tuple(files), len(stats), n_values, nbytes,
                       exact=meta.tol == 0)


def _base_dir(base: str | os.PathLike[str], base_ck: Checkpoint) -> Path | None:
    """BASE's directory (a local one, or a Hub snapshot's); ``None`` for a single file."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not base_ck.tensors:
        return None
    return _base_files(base_ck)[0].parent  # a Hub repo's snapshot


def _write(mask: MaskRecord, base_ck: Checkpoint, stats: dict[str, TensorStats],
           staging: Path, directory: Path | None, progress: ProgressFn | None,
           hashed: bool) -> tuple[tuple[list[str], int, int], dict[str, bytes]]:
    """Write every shard of the output into ``staging``; return (file names, values
    written, bytes of tensor data) and, when ``hashed``, the digest of each BASE tensor
    (:mod:`maskhub.checkpoints.fingerprint`) from the bytes read."""
    files: list[str] = []
    n_values = 0
    total = sum(s.numel * itemsize(s.target_dtype or s.base_dtype) for s in stats.values())
    done = 0
    k = 0
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in base_ck.tensors.values():
        by_file.setdefault(info.file, []).append(info)
    sizes: dict[str, int] = {}
    digests: dict[str, bytes] = {}
    writer = _ChunkWriter(available_cpus())
    try:
        for path in _base_files(base_ck):
            infos = sorted(by_file[path], key=lambda i: i.offset)
            header, data_size = _header(infos, stats, _file_metadata(path))
            files.append(path.name)
            src = os.open(path, os.O_RDONLY)
            dst = os.open(staging / path.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            pending: list[tuple[TensorInfo, list[Future[list[bytes]]]]] = []
            try:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                _write_at(dst, memoryview(header), 0)
                os.ftruncate(dst, len(header) + data_size)
                offset = len(header)
                for info in infos:
                    st = stats[info.name]
                    a_dtype = st.base_dtype or st.target_dtype
                    b_dtype = st.target_dtype or a_dtype
                    plan, values = _plan(mask, st, b_dtype)
                    sa, sb = itemsize(a_dtype), itemsize(b_dtype)
                    futures = [writer.submit(_chunk_task, _Chunk(
                        src, path, info.offset + lo * sa, dst, offset + lo * sb,
                        min(st.numel, lo + APPLY_CHUNK) - lo, a_dtype, b_dtype, i, hashed),
                        plan, values) for i, lo in enumerate(range(0, st.numel, APPLY_CHUNK))]
                    pending.append((info, futures))
                    n_values += plan.total
                    offset += st.numel * sb
                    done += st.numel * sb
                    k += 1
                    if progress:
                        progress(k, len(stats), done, total, info.name)
                writer.drain()
                for info, futures in pending:
                    if hashed:
                        digests[info.name] = fp.tensor_digest(
                            info.name, info.dtype, info.shape,
                            [d for f in futures for d in f.result()])
            except ValueError as exc:  # a chunk's values disagree with its bits
                if isinstance(exc, MaskhubError):  # BASE cut short: its own line
                    raise
                raise PatchError(f"mask {mask.name!r}: {exc}", mask.name) from exc
            finally:
                writer.drain_quietly()
                os.close(src)
                os.close(dst)
            sizes[path.name] = data_size
    finally:
        writer.close()
    index = directory / INDEX_NAME if directory is not None else None
    if index is not None and index.is_file():
        doc = json.loads(index.read_text())
        doc["metadata"] = {**(doc.get("metadata") or {}), "total_size": sum(sizes.values())}
        (staging / INDEX_NAME).write_text(json.dumps(doc, indent=2) + "\n")
        files.append(INDEX_NAME)
    return (files, n_values, total), digests


def _copy_other_files(base: Path, staging: Path) -> None:
    """Copy BASE's small non-weight files (config, tokenizer...) beside the weights."""
    for p in sorted(base.iterdir()):
        if (p.is_file() and p.suffix not in (".safetensors", *PICKLE_SUFFIXES)
                and p.name != INDEX_NAME and p.stat().st_size <= COPY_LIMIT
                and not (staging / p.name).exists()):
            shutil.copyfile(p, staging / p.name)
