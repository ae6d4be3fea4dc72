"""Checkpoint sources: a safetensors file, a directory (single or sharded), or a Hub repo.

Tensors are read one at a time through ``safetensors.safe_open`` (memory-mapped); nothing
holds a whole checkpoint. Pickle formats are refused without being opened.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from maskhub.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CONVERT_HINT = (
    "convert it first without unpickling untrusted files, e.g. "
    "`python -c \"import torch, safetensors.torch as st; "
    "st.save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\"`"
    " or transformers' `model.save_pretrained(dir, safe_serialization=True)`"
)

_DTYPE_NAMES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


@dataclass(frozen=True)
class TensorInfo:
    """Header facts of one tensor, read without loading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path

    @property
    def numel(self) -> int:
        """Number of entries."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of data in the file."""
        return self.numel * _element_size(self.dtype)


@functools.cache
def _element_size(dtype: str) -> int:
    # Asked for every tensor several times per diff: building a torch scalar each time
    # showed in profiles.
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


@dataclass
class Checkpoint:
    """A set of named tensors in one or more safetensors files."""

    ref: str
    revision: str | None
    tensors: dict[str, TensorInfo]
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)

    def names(self) -> list[str]:
        """Tensor names in storage order (by file, then by offset)."""
        return list(self.tensors)

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(t.nbytes for t in self.tensors.values())

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (CPU)."""
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        try:
            if handle is None:
                handle = safe_open(str(info.file), framework="pt")
                self._handles[info.file] = handle
            return handle.get_tensor(name)  # type: ignore[attr-defined]
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(
                f"cannot read tensor {name!r} from {info.file}: {_short(exc)}", str(info.file)
            ) from exc

    def close(self) -> None:
        """Drop the open file handles."""
        self._handles.clear()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_header(path: Path) -> list[TensorInfo]:
    """Tensor infos of one safetensors file, in data-offset order; validates the header."""
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
            if n <= 0 or n > min(size - 8, 100 << 20):
                raise ValueError("header length is out of range (truncated or not safetensors)")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {_short(exc)}",
                              str(path)) from exc
    infos: list[tuple[int, TensorInfo]] = []
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            dtype = _DTYPE_NAMES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad header entry for {name!r}", str(path)) from exc
        if end > data_size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {end} of a "
                f"{data_size}-byte data section", str(path))
        info = TensorInfo(name, shape, dtype, path)
        if end - begin != info.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes, "
                                  f"its shape and dtype need {info.nbytes}", str(path))
        infos.append((begin, info))
    infos.sort(key=lambda x: x[0])
    return [info for _, info in infos]


def _collect(ref: str, revision: str | None, files: list[Path]) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for info in read_header(path):
            if info.name in tensors:
                raise CheckpointError(f"tensor {info.name!r} appears in both "
                                      f"{tensors[info.name].file.name} and {path.name}", ref)
            tensors[info.name] = info
    return Checkpoint(ref, revision, tensors)


def _from_dir(directory: Path, ref: str, revision: str | None) -> Checkpoint:
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index", str(index)) from exc
        shard_names = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shard_names if not (directory / s).is_file()]
        if missing:
            raise CheckpointError(f"{directory}: shard {missing[0]} named in {INDEX_NAME} "
                                  "is missing", str(directory))
        ckpt = _collect(ref, revision, [directory / s for s in shard_names])
        absent = [k for k in weight_map if k not in ckpt.tensors]
        if absent:
            raise CheckpointError(f"{directory}: tensor {absent[0]!r} is listed in {INDEX_NAME} "
                                  f"but not in {weight_map[absent[0]]}", str(directory))
        return ckpt
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = [p for p in sorted(directory.iterdir()) if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(f"{directory} holds only pickle checkpoints ({pickles[0].name}),"
                                  " which maskhub never loads; " + CONVERT_HINT, str(directory))
        raise CheckpointError(f"{directory} holds no .safetensors file", str(directory))
    return _collect(ref, revision, files)


def looks_like_path(spec: str) -> bool:
    """True when ``spec`` can only be a local path (absolute, ./, ~, or a file suffix)."""
    return (spec.startswith((".", "/", "~")) or os.sep + os.sep in spec
            or spec.count("/") > 1 or spec.endswith((".safetensors", *PICKLE_SUFFIXES)))


def split_revision(spec: str) -> tuple[str, str | None]:
    """``"org/model@rev"`` → ``("org/model", "rev")``."""
    if "@" in spec:
        repo, rev = spec.rsplit("@", 1)
        return repo, rev or None
    return spec, None


def open_checkpoint(spec: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint given as a path or a Hub repo id (``org/name[@revision]``)."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            return _from_dir(path.resolve(), str(path), None)
        return _collect(str(path), None, [path.resolve()])
    repo, rev = split_revision(spec)
    if looks_like_path(spec) or not _REPO_ID.match(repo):
        raise CheckpointError(f"{spec}: no such file or directory", spec)
    return _from_hub(repo, rev)


def _from_hub(repo_id: str, revision: str | None) -> Checkpoint:
    from maskhub.registry.hubio import download_checkpoint

    directory, sha = download_checkpoint(repo_id, revision)
    ckpt = _from_dir(directory, repo_id, sha)
    return ckpt


def iter_pairs(base: Checkpoint, target: Checkpoint, names: list[str]
               ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(name, base_tensor, target_tensor)`` one pair at a time."""
    for name in names:
        yield name, base.get(name), target.get(name)
