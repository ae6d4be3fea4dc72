"""Content identity of a checkpoint: a fingerprint of the tensors' bytes, not of a path.

The scheme (``xxh3-128``), the same whoever computes it (the diff pipeline, a Ray worker, or
:func:`checkpoint_fingerprint` reading a checkpoint on its own):

* each tensor's bytes are cut into chunks of :data:`CHUNK` elements (the diff's own chunks,
  so the pipeline hashes each chunk while it is in cache for the compare) and each chunk is
  hashed with XXH3-128;
* a tensor's digest is XXH3-128 of ``name NUL dtype NUL shape NUL`` followed by its chunk
  digests in order;
* the checkpoint's fingerprint is ``"xxh3-128:" + hex(XXH3-128(the tensor digests in order
  of tensor name)))``.

So the fingerprint depends on the tensors' names, dtypes, shapes and every byte of their
values, and on nothing else: not on the path, the number of shards, the order of tensors in
the files, the safetensors ``__metadata__`` or the file names. A diff fingerprints the tensors
it compares (all of them, unless ``--allow-missing`` skipped some: then the fingerprint is
of the compared ones). XXH3 is not a cryptographic hash: it identifies content, it does not
authenticate it against someone forging a collision.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

#: Elements per hashed chunk (equal to the diff kernel's ``CHUNK``; a test checks it).
CHUNK = 1 << 20
#: The scheme prefix of every fingerprint written by this version.
SCHEME = "xxh3-128"


def chunk_digest(buf: object) -> bytes:
    """XXH3-128 digest of one chunk's bytes (any buffer: a memoryview, a numpy array)."""
    import xxhash

    return xxhash.xxh3_128_digest(buf)


def tensor_digest(name: str, dtype: str, shape: Sequence[int], chunks: Iterable[bytes]) -> bytes:
    """Digest of one tensor from its chunk digests (in order)."""
    import xxhash

    h = xxhash.xxh3_128()
    h.update(f"{name}\0{dtype}\0{','.join(str(int(s)) for s in shape)}\0".encode())
    for c in chunks:
        h.update(c)
    return h.digest()


def combine(tensors: Mapping[str, bytes]) -> str:
    """The fingerprint of a checkpoint from its tensors' digests (``{name: digest}``), in an
    order that does not depend on files or sharding."""
    import xxhash

    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        h.update(tensors[name])
    return f"{SCHEME}:{h.hexdigest()}"


def checkpoint_fingerprint(spec: str | os.PathLike[str], names: Sequence[str] | None = None
                           ) -> str:
    """The fingerprint of a checkpoint (a local ``.safetensors`` file or directory, or a Hub
    repo id), read on its own: the value a diff records as ``base_fingerprint`` /
    ``target_fingerprint`` for the same bytes. ``names``: only these tensors (the default:
    all). Reads every byte once (XXH3 runs at ~10 GB/s; the disk usually sets the pace).
    """
    from maskhub.checkpoints.mapped import MappedCheckpoint
    from maskhub.checkpoints.sources import open_checkpoint
    from maskhub.schemas.dtypes import itemsize

    ck = open_checkpoint(spec)
    try:
        wanted = list(ck.tensors) if names is None else list(names)
        digests: dict[str, bytes] = {}
        with MappedCheckpoint(ck) as mapped:
            for name in wanted:
                info = ck.tensors[name]
                region = mapped.region(name)
                step = CHUNK * itemsize(info.dtype)
                chunks = []
                for start in range(region.begin, region.end, step):
                    stop = min(region.end, start + step)
                    chunks.append(chunk_digest(region.file.buf[start:stop]))
                    region.file.release(start, stop - start)
                digests[name] = tensor_digest(name, info.dtype, info.shape, chunks)
        return combine(digests)
    finally:
        ck.close()
