"""Write a safetensors file one tensor at a time: the header first (from names, dtypes and
shapes), then each tensor's bytes in order, so that no more than one tensor is ever in memory
(``safetensors.torch.save_file`` needs them all at once). No tensor library is imported."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from maskhub.schemas.dtypes import SAFETENSORS_DTYPES, itemsize

#: maskhub / torch dtype name -> safetensors header code.
DTYPE_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}


class SafetensorsWriter:
    """Streams tensors into a new safetensors file, in the order the header lists them.

    ``tensors``: ``(name, dtype, shape)`` in file order. Call :meth:`write` once per tensor,
    in that order, with its raw bytes (any number of pieces, as :meth:`write` calls for the
    same tensor), then :meth:`close`. The file is written aside and renamed into place on a
    complete close, so a reader never sees a partial file.
    """

    def __init__(self, path: str | os.PathLike[str],
                 tensors: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None, *, atomic: bool = True) -> None:
        """Create the file and write its header. ``atomic=False`` writes ``path`` itself
        (for a scratch file whose name already marks it as unfinished)."""
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial") if atomic else self.path
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._sizes: list[tuple[str, int]] = []
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * itemsize(dtype)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._sizes.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors writes it
        self._f: BinaryIO = open(self._tmp, "wb")
        self._f.write(len(raw).to_bytes(8, "little"))
        self._f.write(raw)
        self._next = 0
        self._left = self._sizes[0][1] if self._sizes else 0

    def write(self, name: str, data: np.ndarray | bytes | memoryview) -> None:
        """Append (part of) the bytes of tensor ``name``, the next one in file order."""
        while self._left == 0 and self._next < len(self._sizes) - 1:
            self._next += 1
            self._left = self._sizes[self._next][1]
        expected = self._sizes[self._next][0] if self._sizes else None
        if name != expected:
            raise ValueError(f"tensor {name!r} written out of order (expected {expected!r})")
        buf = memoryview(np.ascontiguousarray(data).view(np.uint8).reshape(-1)) \
            if isinstance(data, np.ndarray) else memoryview(data)
        if buf.nbytes > self._left:
            raise ValueError(f"too many bytes for tensor {name!r}")
        self._f.write(buf)
        self._left -= buf.nbytes

    def close(self) -> Path:
        """Check that every byte was written, then put the file in place."""
        complete = self._left == 0 and self._next >= len(self._sizes) - 1
        self._f.close()
        if not complete:
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: not every tensor was written")
        if self._tmp != self.path:
            os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the partial file."""
        self._f.close()
        self._tmp.unlink(missing_ok=True)
