"""``apply``: a patch (a mask with values) and its base in, the target's safetensors out.

The output has BASE's file layout (the same shard file names, and
``model.safetensors.index.json`` when BASE has one, its ``total_size`` recomputed), the
target's dtypes, and tensors bit for bit equal to the target the patch was made from (for a
patch made at ``tol = 0``). Work is one tensor at a time and one chunk at a time: each
shard's header is written first, then every tensor's bytes stream from BASE's memory map
through a reused buffer, the patch's values scattered in at the set bits. Memory: one
tensor's packed bits and values plus one chunk. No torch.

BASE must be the patch's base: the same tensor names, shapes and dtypes (and the same
revision when both are known). :func:`check_base_identity` is the place for a content
fingerprint once diffs record one. Other files of a BASE directory (config, tokenizer) are
copied as they are. The output is written beside OUT and renamed into place when complete.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from maskhub.checkpoints.header import PICKLE_SUFFIXES, TensorInfo
from maskhub.checkpoints.mapped import MappedCheckpoint
from maskhub.checkpoints.sources import INDEX_NAME, Checkpoint, open_checkpoint
from maskhub.core.record import MaskRecord
from maskhub.errors import MaskMismatchError, PatchError, UsageError
from maskhub.kernels.bitcount import count_entries
from maskhub.kernels.patchbits import bits_view, convert_bits, scatter_chunk
from maskhub.kernels.threads import available_cpus
from maskhub.schemas.dtypes import SAFETENSORS_DTYPES, itemsize
from maskhub.schemas.metadata import MaskMetadata, TensorStats
from maskhub.schemas.progress import ProgressFn
from maskhub.storage.files import remove_tree

#: Entries per chunk written (8 MiB of bf16).
APPLY_CHUNK = 4 << 20
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
    # Content identity (issue 26): a base with the same names, shapes and dtypes but other
    # bytes (another fine-tune of the architecture) is refused before anything is written.
    # Costs one read of the base, hashed at memory speed (XXH3); skipped when the mask
    # recorded no fingerprint.
    from maskhub.core.identity import check_base as check_fingerprint

    check_fingerprint(mask, base.ref if base.revision is None else f"{base.ref}@{base.revision}",
                      [s.tensor for s in stats])
    return stats


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
    """Writes chunks of tensors into one open file from a thread pool: each task copies (or
    converts) its slice of the base into its own buffer, scatters its values in (compiled,
    GIL released) and ``pwrite``s the buffer at its offset. At most ``window`` chunks are in
    flight, each with its own buffer."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="maskhub-apply")
        self.window = 2 * threads
        self.inflight: deque[Future[None]] = deque()
        self.free: list[dict[str, np.ndarray]] = []

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(buffers, *args)`` in the pool (blocks while the window is full)."""
        while len(self.inflight) >= self.window:
            self.inflight.popleft().result()
        bufs = self.free.pop() if self.free else {}
        fut = self.pool.submit(fn, bufs, *args)
        fut.add_done_callback(lambda _f: self.free.append(bufs))
        self.inflight.append(fut)

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


def _chunk_task(bufs: dict[str, np.ndarray], fd: int, offset: int, a: np.ndarray,
                a_dtype: str, b_dtype: str, packed: np.ndarray, values: np.ndarray,
                release: Callable[[], None]) -> None:
    n = a.shape[0]
    out = bufs.get(b_dtype)
    if out is None:
        out = bufs[b_dtype] = np.empty(APPLY_CHUNK, dtype=f"<u{itemsize(b_dtype)}")
    part = out[:n]
    if a_dtype == b_dtype:
        np.copyto(part, a)
    else:
        part[:] = convert_bits(a, a_dtype, b_dtype)
    used = scatter_chunk(part, packed, values)
    if used != values.shape[0]:
        raise ValueError(f"{used} set bits for {values.shape[0]} values")
    data = memoryview(part).cast("B")
    pos = 0
    while pos < len(data):
        pos += os.pwrite(fd, data[pos:], offset + pos)
    release()


def _scatter_task(bufs: dict[str, np.ndarray], dst: np.ndarray, packed: np.ndarray,
                  values: np.ndarray) -> None:
    used = scatter_chunk(dst, packed, values)
    if used != values.shape[0]:
        raise ValueError(f"{used} set bits for {values.shape[0]} values")


#: ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14): fault a range in for writing in one call.
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else None)


def _prefault(mm: mmap.mmap | None, start: int, length: int) -> None:
    """Fault ``[start, start+length)`` of the output mapping in for writing in one call
    instead of one page fault per page (advice: skipped where the kernel lacks it)."""
    if mm is None or _POPULATE_WRITE is None or length <= 0:
        return
    lo = start // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        mm.madvise(_POPULATE_WRITE, lo, start + length - lo)
    except (OSError, ValueError):
        pass


def _copy_range(src_fd: int, dst_fd: int, src: int, dst: int, n: int) -> bool:
    """Copy ``n`` bytes in the kernel (``copy_file_range``, what ``cp`` does); False when the
    platform or file system cannot (nothing is then left half done that matters: the
    caller writes the whole range itself)."""
    if not hasattr(os, "copy_file_range"):
        return False
    done = 0
    try:
        while done < n:
            step = os.copy_file_range(src_fd, dst_fd, n - done, src + done, dst + done)
            if step <= 0:
                return False
            done += step
    except OSError:
        return False
    return True


def _write_tensor(writer: _ChunkWriter, fd: int, offset: int, mask: MaskRecord,
                  st: TensorStats, raw: np.ndarray,
                  release: Callable[[int, int], None],
                  copied: tuple[np.ndarray, Callable[[], bool], Callable[[int, int], None]]
                  | None = None) -> int:
    """Queue one tensor's chunks, its data starting at ``offset`` of ``fd``; return the
    values it holds. ``copied``: the output file mapped writable, a function that copies
    the base's bytes of this tensor into place in the kernel and one that prefaults a range
    of the mapping for writing; when the copy succeeds (same dtype on both sides), only the
    values are scattered, into the mapping."""
    a_dtype = st.base_dtype or st.target_dtype
    b_dtype = st.target_dtype or a_dtype
    store = mask.store
    if store.values_dtype(st.tensor) != b_dtype:
        raise PatchError(f"mask {mask.name!r}: the values of {st.tensor!r} are "
                         f"{store.values_dtype(st.tensor)!r}, its target dtype is {b_dtype!r}",
                         mask.name)
    values = np.ascontiguousarray(store.values(st.tensor)).view(f"<u{itemsize(b_dtype)}")
    packed = store.packed(st.tensor)
    a = bits_view(raw, a_dtype)
    starts = list(range(0, st.numel, APPLY_CHUNK))
    first = [0]
    for start in starts:  # where each chunk's values begin
        stop = min(st.numel, start + APPLY_CHUNK)
        first.append(first[-1] + count_entries(packed[start // 8:(stop + 7) // 8], stop - start))
    if first[-1] != values.shape[0] or values.shape[0] != st.n_updated:
        raise PatchError(f"mask {mask.name!r}: {st.tensor!r} has {values.shape[0]} values for "
                         f"{first[-1]} set bits", mask.name)
    sa, sb = itemsize(a_dtype), itemsize(b_dtype)
    if copied is not None and a_dtype == b_dtype and copied[1]():
        if not values.shape[0]:
            return 0
        copied[2](offset, st.numel * sb)
        dst = copied[0][offset:offset + st.numel * sb].view(f"<u{sb}")
        for i, start in enumerate(starts):
            if first[i + 1] > first[i]:
                stop = min(st.numel, start + APPLY_CHUNK)
                writer.submit(_scatter_task, dst[start:stop], packed[start // 8:(stop + 7) // 8],
                              values[first[i]:first[i + 1]])
        return int(values.shape[0])
    for i, start in enumerate(starts):
        stop = min(st.numel, start + APPLY_CHUNK)
        writer.submit(_chunk_task, fd, offset + start * sb, a[start:stop], a_dtype, b_dtype,
                      packed[start // 8:(stop + 7) // 8], values[first[i]:first[i + 1]],
                      lambda s0=start * sa, n0=(stop - start) * sa: release(s0, n0))
    return int(values.shape[0])


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
        stats = {s.tensor: s for s in check_base(mask, base_ck, label)}
        staging = out_path.parent / f".{out_path.name}.partial-{os.getpid()}"
        try:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            remove_tree(staging)
            staging.mkdir()
            directory = _base_dir(base, base_ck)
            result = _write(mask, base_ck, stats, staging, directory, progress)
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
           staging: Path, directory: Path | None,
           progress: ProgressFn | None) -> tuple[list[str], int, int]:
    files: list[str] = []
    n_values = 0
    total = sum(s.numel * itemsize(s.target_dtype or s.base_dtype) for s in stats.values())
    done = 0
    k = 0
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in base_ck.tensors.values():
        by_file.setdefault(info.file, []).append(info)
    sizes: dict[str, int] = {}
    writer = _ChunkWriter(available_cpus())
    try:
        with MappedCheckpoint(base_ck) as mapped:
            for path in _base_files(base_ck):
                infos = sorted(by_file[path], key=lambda i: i.offset)
                header, data_size = _header(infos, stats, _file_metadata(path))
                files.append(path.name)
                fd = os.open(staging / path.name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                mm = None
                try:
                    os.write(fd, header)
                    os.ftruncate(fd, len(header) + data_size)
                    mm = mmap.mmap(fd, len(header) + data_size) if data_size else None
                    out_view = np.frombuffer(mm, dtype=np.uint8) if mm is not None else None
                    offset = len(header)
                    for info in infos:
                        region = mapped.region(info.name)

                        def release(start: int, length: int, region: Any = region) -> None:
                            region.file.release(region.begin + start, length)

                        def copy(region: Any = region, offset: int = offset, fd: int = fd) -> bool:
                            return _copy_range(region.file.fd, fd, region.begin, offset,
                                               region.end - region.begin)

                        st = stats[info.name]
                        n_values += _write_tensor(
                            writer, fd, offset, mask, st, region.raw(), release,
                            (out_view, copy, partial(_prefault, mm))
                            if out_view is not None else None)
                        nbytes = st.numel * itemsize(st.target_dtype or st.base_dtype)
                        offset += nbytes
                        done += nbytes
                        k += 1
                        if progress:
                            progress(k, len(stats), done, total, info.name)
                    writer.drain()
                except ValueError as exc:  # a chunk's values disagree with its bits
                    raise PatchError(f"mask {mask.name!r}: {exc}", mask.name) from exc
                finally:
                    writer.drain_quietly()
                    out_view = None
                    if mm is not None:
                        try:
                            mm.close()
                        except BufferError:  # a view still referenced: unmapped when freed
                            pass
                    os.close(fd)
                sizes[path.name] = data_size
    finally:
        writer.close()
    index = directory / INDEX_NAME if directory is not None else None
    if index is not None and index.is_file():
        doc = json.loads(index.read_text())
        doc["metadata"] = {**(doc.get("metadata") or {}), "total_size": sum(sizes.values())}
        (staging / INDEX_NAME).write_text(json.dumps(doc, indent=2) + "\n")
        files.append(INDEX_NAME)
    return files, n_values, total


def _copy_other_files(base: Path, staging: Path) -> None:
    """Copy BASE's small non-weight files (config, tokenizer...) beside the weights."""
    for p in sorted(base.iterdir()):
        if (p.is_file() and p.suffix not in (".safetensors", *PICKLE_SUFFIXES)
                and p.name != INDEX_NAME and p.stat().st_size <= COPY_LIMIT
                and not (staging / p.name).exists()):
            shutil.copyfile(p, staging / p.name)
