"""The one safetensors header reader: tensor names, dtypes, shapes and byte ranges of a file,
validated, without reading any tensor data (and without importing a tensor library)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from maskhub.checkpoints.validate import read_safetensors_header
from maskhub.errors import CheckpointError
from maskhub.schemas.dtypes import itemsize

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = (
    "convert it first without unpickling untrusted files, e.g. "
    "`python -c \"import torch, safetensors.torch as st; "
    "st.save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\"`"
    " or transformers' `model.save_pretrained(dir, safe_serialization=True)`"
)


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
    """Tensor infos of one safetensors file, in data-offset order. The header is checked by
    the one validator (:func:`maskhub.checkpoints.validate.read_safetensors_header`: a
    regular file, header length, JSON nesting, tensor count, dtypes, shapes, offsets against
    byte ranges, truncation). Pickle files are refused by name, without being opened."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path} is a pickle checkpoint, which maskhub never loads; "
                              + CONVERT_HINT, str(path))
    entries, data_start = read_safetensors_header(path)
    return [TensorInfo(e.name, e.shape, e.dtype, path, data_start + e.begin) for e in entries]
