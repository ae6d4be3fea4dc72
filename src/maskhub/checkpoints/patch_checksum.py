"""The ``checksum_sha256`` a trainer's patch may carry (huggingface/trl #5417), verified.

TRL's delta engine writes into each patch's ``__metadata__`` ``checksum_sha256``: the SHA-256
of the weights the patch leads to, its bf16 state dict hashed as the raw bytes of every
tensor, one after the other in order of tensor name (no names, shapes or dtypes in the
hash). Here the same hash is computed over BASE with the patches applied, one tensor at a
time (a copy of one tensor, the patches' values written in at their positions, in chain
order), every tensor of BASE in order of name, as stored. It equals TRL's when BASE holds
exactly the tensors the trainer synced, in bf16 (the case of TRL's bf16 checkpoints); a
checkpoint with other tensors or dtypes hashes to another value, and says so in one line.

Cost: one read of BASE and SHA-256 of every byte (about 0.3-2 GB/s on one core), so a chain
verifies its last patch only (the state every earlier step leads to would need the model
densely at every step, the cost a chain avoids).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from maskhub.checkpoints.mapped import MappedCheckpoint
from maskhub.checkpoints.patches import PatchFile
from maskhub.checkpoints.sources import Checkpoint
from maskhub.errors import CheckpointError
from maskhub.schemas.dtypes import itemsize

#: The ``__metadata__`` key of TRL #5417's checksum.
CHECKSUM_KEY = "checksum_sha256"
#: Bytes hashed between two releases of the base's mapped pages.
_STEP = 64 << 20
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def recorded_checksum(pf: PatchFile) -> str | None:
    """The checksum ``pf`` records (lower-case hex), or ``None`` when it records none (an
    empty value, as TRL writes when it has none, counts as none)."""
    value = pf.metadata.get(CHECKSUM_KEY)
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip().lower()


def patched_sha256(base: Checkpoint, patches: Sequence[PatchFile]) -> str:
    """SHA-256 (hex) of ``base`` with ``patches`` applied in order, every tensor's raw bytes
    in order of tensor name (the module's definition). Memory: one tensor."""
    h = hashlib.sha256()
    with MappedCheckpoint(base) as mapped:
        for name in sorted(base.tensors):
            info = base.tensors[name]
            region = mapped.region(name)
            touching = [pf for pf in patches if name in pf.entries]
            if not touching:
                for start in range(region.begin, region.end, _STEP):
                    stop = min(region.end, start + _STEP)
                    h.update(region.file.buf[start:stop])
                    region.file.release(start, stop - start)
                continue
            flat = region.raw().view(_RAW[itemsize(info.dtype)]).copy()
            region.file.release(region.begin, region.end - region.begin)
            for pf in touching:
                pt = pf.read(name, info.shape, info.dtype)
                flat[pt.indices] = pt.values
            h.update(flat)
    return h.hexdigest()


def verify_checksum(base: Checkpoint, patches: Sequence[PatchFile]) -> bool:
    """Check the last patch's ``checksum_sha256`` against ``base`` + ``patches``: one
    :class:`CheckpointError` line naming that patch on a mismatch. Returns whether a
    checksum was there to verify."""
    if not patches:
        return False
    last = patches[-1]
    expected = recorded_checksum(last)
    if expected is None:
        return False
    actual = patched_sha256(base, patches)
    if actual != expected:
        what = "BASE + this patch" if len(patches) == 1 else \
            f"BASE + the {len(patches)} patches of the chain"
        raise CheckpointError(
            f"patch {last.path}: its checksum_sha256 {expected[:16]}... is not that of the "
            f"weights it leads to ({what}: {actual[:16]}...); the patch is damaged or "
            f"{base.ref} is not the checkpoint it patches", str(last.path))
    return True
