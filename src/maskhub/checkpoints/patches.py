"""Sparse weight patches in checkpoint coordinates: the delta files RL trainers emit.

A patch is one safetensors file holding, per changed tensor, the flat C-order positions of
the entries it sets and their new values (absolute values, not differences), in the
tensor's own dtype. It is read here through ``mmap`` without a tensor library and never
unpickled; each tensor is checked against the base it patches (shape, dtype, every index in
range, no index twice) before anything uses it. The layouts accepted (README, "Sparse
patches"; docs/analysis.md):

``trl-v1`` (huggingface/trl #5417)
    ``NAME.indices`` (I32 or I64, flat) + ``NAME.values``; ``__metadata__`` carries
    ``format = "sparse_weight_patch"``, ``model_version`` (the step the patch leads to),
    ``prev_model_version`` (the step it starts from, ``-1`` for none), ``changed_params``.
``trl-v2`` (huggingface/trl #5932, #5937: ``delta_engine.encode_patch``)
    ``NAME.idx`` + ``NAME.val``; ``__metadata__["encoding"]`` says how ``.idx`` holds the
    positions: ``raw`` (I32 flat positions) or ``gap_delta`` (U16 or U32 gaps
    ``idx[k] - idx[k-1] - 1``, ``idx[-1] = -1``). ``nvcomp_cascaded`` (an nvCOMP GPU
    bitstream) is refused in one line. A plain ``NAME`` (TRL's "anchor") replaces the whole
    tensor.
``generic`` (vLLM #50723's checkpoint patch: name, full shape, dtype, values, optional
flat indices)
    ``NAME.indices`` (any integer dtype, flat; or a ``(2, nnz)`` row/column pair for a 2-D
    tensor, as grail's ``sparse_codec`` takes them) + ``NAME.values``; ``NAME.values``
    without indices is a dense replacement. ``__metadata__`` may give ``shapes`` (a JSON
    object ``{name: [d0, d1, ...]}``), checked against the base.

Steps, for chains: ``target_step`` (else ``model_version``, else ``step``) is the step a
patch leads to, ``base_step`` (else ``prev_model_version`` when ``>= 0``) the step it
starts from; both optional. Indices need not be sorted (they are sorted here, values with
them); an index given twice is refused (which value would win is not defined).
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskhub.checkpoints.validate import read_safetensors
from maskhub.errors import CheckpointError
from maskhub.schemas.dtypes import SAFETENSORS_DTYPES, itemsize

#: Header dtype codes of a patch: a checkpoint's, plus the unsigned gap widths of TRL's
#: ``gap_delta`` encoding.
_DTYPES = {**SAFETENSORS_DTYPES, "U16": "uint16", "U32": "uint32", "U64": "uint64"}
_INT_DTYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
               "int32": np.int32, "uint32": np.uint32, "int64": np.int64,
               "uint64": np.uint64}
_ITEMSIZE = {"uint16": 2, "uint32": 4, "uint64": 8}
#: Unsigned views of raw values, by item size (values are compared as bits, never cast).
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
ENCODINGS = ("raw", "gap_delta")
SUFFIXES = ((".indices", ".values"), (".idx", ".val"))


def _size(dtype: str) -> int:
    return _ITEMSIZE.get(dtype) or itemsize(dtype)


@dataclass(frozen=True)
class _Stored:
    """Header facts of one stored array of the patch file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class PatchTensor:
    """What a patch sets in one tensor: sorted unique flat positions and their raw values
    (an unsigned view of the tensor's dtype, bit for bit)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    #: integers, sorted, unique, each in [0, numel): int64, or the file's own integer dtype
    #: when it stores flat positions (a view of the file, no copy)
    indices: np.ndarray
    values: np.ndarray   # raw unsigned view (uint16 for bf16/fp16...), same length
    dense: bool = False  # the whole tensor was given (an anchor / dense replacement)

    @property
    def nnz(self) -> int:
        """Number of entries set."""
        return int(self.indices.shape[0])


@dataclass
class PatchFile:
    """One patch file, mapped; :meth:`read` gives one tensor's entries, validated against the
    base tensor it patches."""

    path: Path
    layout: str
    metadata: dict[str, str]
    #: tensor name -> (indices key or None, values key)
    entries: dict[str, tuple[str | None, str]]
    target_step: int | None
    base_step: int | None
    _arrays: dict[str, _Stored] = field(repr=False, default_factory=dict)
    _buf: Any = field(repr=False, default=None)
    _mm: Any = field(repr=False, default=None)

    @property
    def label(self) -> str:
        """The file's name, as errors name it."""
        return self.path.name

    @property
    def nbytes(self) -> int:
        """Bytes of the file."""
        return self.path.stat().st_size

    def _fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"patch {self.path}: {message}", str(self.path))

    def _array(self, key: str) -> np.ndarray:
        a = self._arrays[key]
        return self._buf[a.begin:a.end]

    def read(self, name: str, shape: tuple[int, ...], dtype: str) -> PatchTensor:
        """The entries of tensor ``name`` of a base where it has ``shape`` and ``dtype``;
        refused in one line naming the file when they do not fit."""
        idx_key, val_key = self.entries[name]
        vals = self._arrays[val_key]
        numel = 1
        for s in shape:
            numel *= s
        declared = self.declared_shape(name)
        if declared is not None and declared != tuple(shape):
            raise self._fail(f"tensor {name!r} has shape {list(declared)} in the patch, "
                             f"{list(shape)} in the base")
        if vals.dtype != dtype:
            raise self._fail(f"tensor {name!r}: the patch's values are {vals.dtype}, the "
                             f"base tensor is {dtype}")
        raw = self._array(val_key).view(_RAW[_size(dtype)])
        if idx_key is None:  # dense: the whole tensor
            if vals.numel != numel or (len(vals.shape) > 1 and vals.shape != tuple(shape)):
                raise self._fail(f"tensor {name!r}: {list(vals.shape)} values given without "
                                 f"indices, the base tensor has shape {list(shape)}")
            return PatchTensor(name, tuple(shape), dtype, np.arange(numel, dtype=np.int64),
                               raw, dense=True)
        if len(vals.shape) != 1:
            raise self._fail(f"tensor {name!r}: values of shape {list(vals.shape)}, not "
                             "one-dimensional")
        idx = self._indices(name, idx_key, shape)
        if idx.shape[0] != raw.shape[0]:
            raise self._fail(f"tensor {name!r}: {idx.shape[0]} indices but {raw.shape[0]} "
                             "values")
        if idx.shape[0] > 1 and not bool(np.all(idx[1:] > idx[:-1])):
            order = np.argsort(idx, kind="stable")
            idx, raw = idx[order], raw[order]
            dup = np.flatnonzero(idx[1:] == idx[:-1])
            if dup.size:
                raise self._fail(f"tensor {name!r}: index {int(idx[dup[0]])} is given "
                                 "twice")
        if idx.size:  # sorted: the first and last are the bounds
            lo, hi = int(idx[0]), int(idx[-1])
            if lo < 0 or hi >= numel:
                bad_i = lo if lo < 0 else hi
                raise self._fail(f"tensor {name!r}: index {bad_i} is outside its {numel} "
                                 f"entries (shape {list(shape)})")
        return PatchTensor(name, tuple(shape), dtype, idx, np.asarray(raw))

    def values_dtype(self, name: str) -> str:
        """The dtype of tensor ``name``'s values in the patch."""
        return self._arrays[self.entries[name][1]].dtype

    def declared_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape the patch's metadata gives tensor ``name`` (``shapes``), if any."""
        shapes = self.metadata.get("shapes")
        if shapes is None:
            return None
        try:
            table = json.loads(shapes)
            got = table.get(name) if isinstance(table, dict) else None
            return None if got is None else tuple(int(s) for s in got)
        except (ValueError, TypeError) as exc:
            raise self._fail("__metadata__ shapes is not a JSON object of integer lists") \
                from exc

    def _indices(self, name: str, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor ``name``'s flat positions as stored (not yet sorted nor checked against
        the tensor's size, but for the row/column pairs): the file's own integers where it
        stores flat positions, int64 where they are decoded."""
        a = self._arrays[key]
        np_dt = _INT_DTYPES.get(a.dtype)
        if np_dt is None:
            raise self._fail(f"tensor {name!r}: indices are {a.dtype}, not integers")
        stored = self._array(key).view(np_dt)
        if self.layout == "trl-v2" and self.metadata.get("encoding", "raw") == "gap_delta":
            if a.dtype not in ("uint16", "uint32") or len(a.shape) != 1:
                raise self._fail(f"tensor {name!r}: gap_delta indices must be a 1-D uint16 "
                                 f"or uint32 array, not {a.dtype} {list(a.shape)}")
            return np.cumsum(stored.astype(np.int64) + 1) - 1
        if len(a.shape) == 2 and a.shape[0] == 2 and len(shape) == 2:
            rows, cols = stored[:a.shape[1]].astype(np.int64), stored[a.shape[1]:]
            cols = cols.astype(np.int64)
            bad = (rows < 0) | (rows >= shape[0]) | (cols < 0) | (cols >= shape[1])
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise self._fail(f"tensor {name!r}: index ({int(rows[i])}, {int(cols[i])}) "
                                 f"is outside its shape {list(shape)}")
            return rows * shape[1] + cols
        if len(a.shape) == 1:
            return stored
        raise self._fail(f"tensor {name!r}: indices of shape {list(a.shape)}, not flat")

    def close(self) -> None:
        """Unmap the file."""
        self._buf = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view still lives; unmapped when it goes
                pass
            self._mm = None


def open_patch(path: str | os.PathLike[str]) -> PatchFile:
    """Map the patch file ``path`` and sort its arrays into tensors (see the module's
    layouts); raises :class:`CheckpointError` naming the file when it is not a patch."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"patch {path} is not a .safetensors file (maskhub reads "
                              "sparse patches from safetensors only, never pickles)", str(path))
    # The one validator: header size, JSON depth, tensor count, shapes, dtypes and offsets.
    entries_in, data_start, meta = read_safetensors(path, _DTYPES)
    size = path.stat().st_size
    arrays: dict[str, _Stored] = {}
    for e in entries_in:
        arrays[e.name] = _Stored(e.dtype, e.shape, data_start + e.begin, data_start + e.end)
    entries, layout = _pair(path, arrays, meta)
    target = _step(path, meta, ("target_step", "model_version", "step"))
    base = _step(path, meta, ("base_step", "prev_model_version"))
    if base is not None and base < 0:
        base = None  # TRL writes -1 for "no previous version"
    pf = PatchFile(path, layout, meta, entries, target, base, arrays)
    if layout == "trl-v2":
        enc = meta.get("encoding", "raw")
        if enc not in ENCODINGS:
            raise CheckpointError(f"patch {path}: index encoding {enc!r} is not supported "
                                  f"(maskhub reads {', '.join(ENCODINGS)}; nvCOMP bitstreams "
                                  "need a GPU decoder: re-encode with encoding=raw)", str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        pf._mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
    finally:
        os.close(fd)
    pf._buf = np.frombuffer(pf._mm, dtype=np.uint8) if pf._mm is not None else None
    return pf


def _step(path: Path, meta: dict[str, str], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        if key in meta and meta[key] != "":
            try:
                return int(meta[key])
            except ValueError:
                raise CheckpointError(f"patch {path}: __metadata__ {key} is "
                                      f"{meta[key]!r}, not an integer", str(path)) from None
    return None


def _pair(path: Path, arrays: dict[str, _Stored], meta: dict[str, str]
          ) -> tuple[dict[str, tuple[str | None, str]], str]:
    """Tensor name -> (indices key, values key), and the layout's name."""
    entries: dict[str, tuple[str | None, str]] = {}
    used: set[str] = set()
    kinds: set[str] = set()
    for idx_suffix, val_suffix in SUFFIXES:
        for key in arrays:
            if key.endswith(val_suffix):
                name = key[:-len(val_suffix)]
                idx_key = name + idx_suffix
                if idx_key in arrays:
                    entries[name] = (idx_key, key)
                    used.update((idx_key, key))
                elif val_suffix == ".values":
                    entries[name] = (None, key)  # dense values, no indices
                    used.add(key)
                else:
                    raise CheckpointError(f"patch {path}: {key!r} has no {idx_key!r}",
                                          str(path))
                kinds.add(val_suffix)
            elif key.endswith(idx_suffix) and name_of(key, idx_suffix) + val_suffix \
                    not in arrays:
                raise CheckpointError(f"patch {path}: {key!r} has no "
                                      f"{name_of(key, idx_suffix) + val_suffix!r}", str(path))
    for key in arrays:  # anything else is a whole tensor (TRL's anchors)
        if key not in used:
            if key in entries:
                raise CheckpointError(f"patch {path}: tensor {key!r} is given both whole "
                                      "and as indices + values", str(path))
            entries[key] = (None, key)
            kinds.add("whole")
    if ".val" in kinds and ".values" in kinds:
        raise CheckpointError(f"patch {path} mixes the .indices/.values and .idx/.val "
                              "layouts", str(path))
    if ".val" in kinds or ("whole" in kinds and "encoding" in meta):
        layout = "trl-v2"
    elif meta.get("format") == "sparse_weight_patch":
        layout = "trl-v1"
    else:
        layout = "generic"
    return dict(sorted(entries.items())), layout


def name_of(key: str, suffix: str) -> str:
    """``key`` without ``suffix``."""
    return key[:-len(suffix)]
