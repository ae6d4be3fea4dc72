"""Checkpoint sources: a safetensors file, a directory (single or sharded), or a Hub repo.

Opening a checkpoint reads only its headers (:mod:`maskhub.checkpoints.header`). The diff
reads tensor bytes through :mod:`maskhub.checkpoints.mapped`; :meth:`Checkpoint.get` loads
one tensor into torch for the analyses that need it. Nothing holds a whole checkpoint.
Pickle formats are refused without being opened.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from maskhub.checkpoints.header import (
    CONVERT_HINT,
    PICKLE_SUFFIXES,
    TensorInfo,
    read_header,
    short_error,
)
from maskhub.checkpoints.validate import read_json_file, short
from maskhub.errors import CheckpointError

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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
        """Load one tensor as a CPU torch tensor (imports torch: the diff itself reads raw
        bytes through :mod:`maskhub.checkpoints.mapped` instead)."""
        from safetensors import safe_open

        info = self.tensors[name]
        handle = self._handles.get(info.file)
        try:
            if handle is None:
                handle = safe_open(str(info.file), framework="pt")
                self._handles[info.file] = handle
            return handle.get_tensor(name)  # type: ignore[attr-defined]
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(
                f"cannot read tensor {name!r} from {info.file}: {short_error(exc)}", str(info.file)
            ) from exc

    def close(self) -> None:
        """Drop the open file handles."""
        self._handles.clear()


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
            weight_map = read_json_file(index, str(index), CheckpointError)["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not an object of file names")
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index", str(index)) from exc
        shard_names = list(dict.fromkeys(weight_map.values()))
        for s in shard_names:
            if s != Path(s).name or s in ("", ".", ".."):
                raise CheckpointError(f"{index} names shard {short(s)}, which is not a file "
                                      "of its directory", str(index))
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
    from maskhub.checkpoints.hubio import download_checkpoint

    directory, sha = download_checkpoint(repo_id, revision)
    ckpt = _from_dir(directory, repo_id, sha)
    return ckpt
