"""The one safetensors header reader: tensor names, dtypes, shapes and byte ranges of a file,
validated, without reading any tensor data (and without importing a tensor library)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from maskhub.errors import CheckpointError
from maskhub.schemas.dtypes import SAFETENSORS_DTYPES, itemsize

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = (
    "convert it first without unpickling untrusted files, e.g. "
    "`python -c \"import torch, safetensors.torch as st; "
    "st.save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\"`"
    " or transformers' `model.save_pretrained(dir, safe_serialization=True)`"
)
#: Largest header maskhub reads (safetensors itself caps headers at 100 MB).
MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Header facts of one tensor, read without loading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    #: Absolute byte offset of the tensor's data in ``file``.
    offset: int = 0
    numel: int = field(init=False, repr=False, compare=False)
    nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once here: the diff asks for both several times per tensor.
        n = 1
        for s in self.shape:
            n *= s
        object.__setattr__(self, "numel", n)
        object.__setattr__(self, "nbytes", n * itemsize(self.dtype))

    @property
    def end(self) -> int:
        """Absolute byte offset just past the tensor's data."""
        return self.offset + self.nbytes


def short_error(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_header(path: Path) -> list[TensorInfo]:
    """Tensor infos of one safetensors file, in data-offset order; validates the header
    (length, JSON, dtypes, shapes against byte ranges, truncation). Pickle files are refused
    by name, without being opened."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path} is a pickle checkpoint, which maskhub never loads; "
                              + CONVERT_HINT, str(path))
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file is shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > min(size - 8, MAX_HEADER):
                raise ValueError("header length is out of range (truncated or not safetensors)")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {short_error(exc)}",
                              str(path)) from exc
    infos: list[TensorInfo] = []
    data_start = 8 + n
    data_size = size - data_start
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad header entry for {name!r}", str(path)) from exc
        if end > data_size or begin < 0:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {end} of a "
                f"{data_size}-byte data section", str(path))
        info = TensorInfo(name, shape, dtype, path, data_start + begin)
        if end - begin != info.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes, "
                                  f"its shape and dtype need {info.nbytes}", str(path))
        infos.append(info)
    infos.sort(key=lambda i: i.offset)
    return infos
