"""Masks made elsewhere, read one tensor at a time: a Zarr v3 store in the documented layout
(written by hand or by another tool), a safetensors file of ``bool``/``uint8`` masks, or a
mapping of numpy arrays / torch tensors. Every tensor comes out packed the way maskhub stores
it (``uint8``, little bit order, padding bits zero) with its exact count.

Nothing is unpickled: a safetensors file is read through maskhub's own header reader and
plain byte reads, a pickle file is refused by name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskhub.checkpoints.header import PICKLE_SUFFIXES, read_header
from maskhub.checkpoints.validate import (
    MAX_CHUNK_BYTES,
    ArrayFacts,
    check_array_document,
    check_chunk_files,
    check_tree,
    present_chunks,
    read_array_metadata,
    read_json_file,
    short,
)
from maskhub.errors import MaskhubError, MaskStoreError, UsageError
from maskhub.hub.layout import safe_relpath
from maskhub.kernels.bitcount import popcount
from maskhub.schemas.metadata import BITORDER, FORMAT_VERSION, STORE_KIND
from maskhub.storage.gapcode import ENCODING_ATTR, GAPS_U8, GapCodeError, decode

#: What an imported tensor's mask may be held as: booleans, or 0/1 in ``uint8``.
MASK_DTYPES = ("bool", "uint8")


@dataclass(frozen=True)
class ImportedTensor:
    """One tensor's mask, packed as maskhub stores it."""

    name: str
    shape: tuple[int, ...]
    packed: np.ndarray
    n_updated: int

    @property
    def numel(self) -> int:
        """Entries of the parameter."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class MaskSource:
    """A mask made elsewhere: its kind (``zarr``, ``safetensors``, ``arrays``), a label for
    messages and provenance (the file name), the metadata it carries (a Zarr store's group
    attributes, else none), its tensor names in order and a reader of one tensor."""

    kind: str
    label: str
    names: list[str]
    read: Callable[[str], ImportedTensor]
    attrs: dict[str, Any] = field(default_factory=dict)


def pack_bits(name: str, values: np.ndarray, where: str) -> ImportedTensor:
    """Pack a ``bool`` (or 0/1 ``uint8``) mask shaped like its parameter."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        if values.size and int(values.max()) > 1:
            raise MaskStoreError(f"{where}: tensor {name!r} holds values other than 0 and 1 "
                                 f"(up to {int(values.max())}); a mask is bool, or uint8 0/1",
                                 where)
        values = values.view(bool)
    elif values.dtype != np.bool_:
        raise MaskStoreError(f"{where}: tensor {name!r} is {values.dtype}; a mask is bool, or "
                             "uint8 0/1", where)
    packed = np.packbits(values.ravel(), bitorder=BITORDER)
    return ImportedTensor(name, tuple(int(s) for s in values.shape), packed,
                          int(np.count_nonzero(values)))


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or "/" in name:
        raise MaskStoreError(f"{where}: {name!r} cannot name a tensor (a parameter name such "
                             "as model.layers.0.mlp.up_proj.weight)", where)
    return safe_relpath(name, "tensor", where)


def from_arrays(arrays: Mapping[str, Any], label: str = "arrays") -> MaskSource:
    """A mapping ``{parameter name: mask}`` of numpy arrays or torch tensors (``bool``, or
    ``uint8`` 0/1, shaped like the parameter), in its own order."""
    names = [_check_name(n, label) for n in arrays]
    if not names:
        raise UsageError("the mask to import holds no tensors")

    def read(name: str) -> ImportedTensor:
        value = arrays[name]
        if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
            value = value.detach().cpu().numpy()
        return pack_bits(name, np.asarray(value), label)

    return MaskSource("arrays", label, names, read)


def from_safetensors(path: Path) -> MaskSource:
    """A safetensors file of masks, tensors in file order; read without a tensor library."""
    where = path.name
    infos = {i.name: i for i in read_header(path)}
    if not infos:
        raise UsageError(f"{path} holds no tensors")
    for info in infos.values():
        _check_name(info.name, where)
        if info.dtype not in MASK_DTYPES:
            raise MaskStoreError(f"{where}: tensor {info.name!r} is {info.dtype}; a mask is "
                                 "bool, or uint8 0/1", where)

    def read(name: str) -> ImportedTensor:
        info = infos[name]
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            data = np.frombuffer(f.read(info.numel), dtype=np.uint8)
        if data.size and int(data.max()) > 1:  # safetensors' bool is one byte, 0 or 1
            return pack_bits(name, data.reshape(info.shape), where)
        return pack_bits(name, data.view(bool).reshape(info.shape), where)

    return MaskSource("safetensors", where, list(infos), read)


def from_zarr(path: Path) -> MaskSource:
    """A Zarr v3 group with one array per tensor: ``bool`` (or ``uint8`` 0/1) shaped like the
    parameter, or packed ``uint8`` with attributes ``shape`` and ``bitorder``; tensors in the
    order of the group's ``tensors`` attribute, else by name."""
    import zarr

    where = path.name
    _check_store_files(path, where)
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        attrs = dict(group.attrs)
        arrays = dict(group.arrays())
        subgroups = [n for n, _ in group.groups()]
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MaskStoreError(f"{path} is not a readable Zarr v3 group: {first}",
                             str(path)) from exc
    if attrs.get("kind", STORE_KIND) != STORE_KIND:
        raise MaskStoreError(f"{where}: its kind is {attrs['kind']!r}, not {STORE_KIND!r}",
                             where)
    version = attrs.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise MaskStoreError(f"{where} has mask format_version {version!r}; this maskhub reads "
                             f"up to {FORMAT_VERSION} (upgrade maskhub)", where)
    if attrs.get("has_values") is True:  # a patch: its bits are imported, not its values
        subgroups = [n for n in subgroups if n != "values"]
    if subgroups:
        raise MaskStoreError(f"{where}: nested group {subgroups[0]!r}; a mask store holds one "
                             "array per tensor at its top level", where)
    listed = attrs.get("tensors")
    if listed is None:
        names = sorted(arrays)
    elif not isinstance(listed, list):
        raise MaskStoreError(f"{where}: the tensors attribute is not a list of names", where)
    else:
        names = list(listed)
        missing = [n for n in names if n not in arrays]
        unlisted = sorted(set(arrays) - set(names))
        if missing or unlisted:
            what = (f"tensor {missing[0]!r} is listed in its tensors attribute but has no "
                    "array" if missing else
                    f"array {unlisted[0]!r} is not listed in its tensors attribute")
            raise MaskStoreError(f"{where}: {what}", where)
    if not names:
        raise MaskStoreError(f"{where} holds no arrays", where)
    for name in names:
        _check_name(name, where)

    def read(name: str) -> ImportedTensor:
        arr = arrays[name]
        facts = read_array_metadata(path / name, name, where, path)
        a = facts.attributes
        check_chunk_files(path / name, path, facts, f"{where}: array {short(name)}")
        try:
            if facts.encoded:
                got = _ungap(name, arr, dict(a), where)
            elif facts.packed:
                got = _unpack(name, arr, facts, path / name, where)
            else:
                got = _read_unpacked(name, arr, facts, path / name, where)
        except MaskhubError:
            raise
        except Exception as exc:  # zarr and its codecs raise their own types on corrupt chunks
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MaskStoreError(f"{where}: cannot read array {short(name)}: {first}",
                                 where) from exc
        for key, value in (("numel", got.numel), ("n_updated", got.n_updated)):
            if key in a and a[key] != value:
                raise MaskStoreError(f"{where}: array {name!r} has {key} {value}, its "
                                     f"attributes say {a[key]}", where)
        return got

    return MaskSource("zarr", where, names, read, attrs)


def _check_store_files(path: Path, where: str) -> None:
    """Before zarr opens anything: every file of the store a regular file inside it, every
    ``zarr.json`` of bounded size and nesting (see :mod:`maskhub.checkpoints.validate`)."""
    check_tree(path, where)
    for dirpath, _dirs, files in os.walk(path):
        if "zarr.json" in files:
            rel = Path(dirpath).relative_to(path).as_posix()
            doc = read_json_file(Path(dirpath) / "zarr.json", f"{where}/zarr.json" if rel == "."
                                 else f"{where}/{rel}/zarr.json")
            if rel != "." and isinstance(doc, dict) and doc.get("node_type") == "array":
                check_array_document(doc, rel, where)


def _zeros(nbytes: int, name: str, where: str) -> np.ndarray:
    """A zero-filled buffer; its pages are only touched where chunks are stored."""
    try:
        return np.zeros(nbytes, dtype=np.uint8)
    except MemoryError as exc:
        raise MaskStoreError(f"{where}: array {short(name)} needs {nbytes} bytes, more than "
                             "this process can allocate", where) from exc


def _ungap(name: str, arr: Any, attrs: dict[str, Any], where: str) -> ImportedTensor:
    """A byte-gap coded ``uint8`` array (attributes ``encoding: "gaps-u8"``, ``shape``)."""
    shape = attrs.get("shape")
    if attrs[ENCODING_ATTR] != GAPS_U8:
        raise MaskStoreError(f"{where}: array {name!r} has encoding {attrs[ENCODING_ATTR]!r}; "
                             f"this maskhub reads packed bits and {GAPS_U8!r}", where)
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise MaskStoreError(f"{where}: array {name!r} has a bad shape attribute {shape!r}",
                             where)
    if arr.dtype != np.uint8 or len(arr.shape) != 1:
        raise MaskStoreError(f"{where}: gap-coded array {name!r} is {arr.dtype} of shape "
                             f"{list(arr.shape)}, not one-dimensional uint8", where)
    try:
        packed, count = decode(np.asarray(arr[...]), math.prod(shape))
    except GapCodeError as exc:
        raise MaskStoreError(f"{where}: array {name!r}: {exc}", where) from exc
    return ImportedTensor(name, tuple(shape), packed, count)


def _unpack(name: str, arr: Any, facts: ArrayFacts, directory: Path, where: str
            ) -> ImportedTensor:
    """A packed ``uint8`` array (attributes ``shape``, ``bitorder``; checked by the
    validator), repacked little-endian with its padding bits cleared, read chunk by chunk:
    only the chunks present are read, so memory follows the bytes stored."""
    shape = [int(s) for s in facts.attributes["shape"]]
    bitorder = facts.attributes.get("bitorder")
    if bitorder not in ("little", "big"):
        raise MaskStoreError(f"{where}: packed array {name!r} needs a bitorder attribute, "
                             f"'little' or 'big' (not {short(bitorder)})", where)
    numel = math.prod(shape)
    nbytes, chunk = facts.shape[0], facts.chunk_shape[0]
    out = _zeros(nbytes, name, where)
    count = 0
    for (i,) in present_chunks(directory, facts):
        start, stop = i * chunk, min(nbytes, (i + 1) * chunk)
        part = np.asarray(arr[start:stop])
        out[start:stop] = _REVERSED[part] if bitorder == "big" else part
        if stop == nbytes and numel % 8:
            out[-1] &= (1 << (numel % 8)) - 1
        count += popcount(out[start:stop])  # only the bytes present: untouched pages stay so
    return ImportedTensor(name, tuple(shape), out, count)


def _read_unpacked(name: str, arr: Any, facts: ArrayFacts, directory: Path, where: str
                   ) -> ImportedTensor:
    """A ``bool`` (or ``uint8`` 0/1) array shaped like its parameter, packed slab by slab of
    chunk rows: rows with no chunk stored are zeros and are never read."""
    shape = facts.shape
    numel = math.prod(shape)
    out = _zeros((numel + 7) // 8, name, where)
    if not shape:  # a 0-d array
        got = pack_bits(name, np.asarray(arr[...]).reshape(1), where)
        return ImportedTensor(name, (), got.packed, got.n_updated)
    row = math.prod(shape[1:])
    rows = facts.chunk_shape[0]
    count = 0
    if rows * row <= MAX_CHUNK_BYTES:
        for r in sorted({index[0] for index in present_chunks(directory, facts)}):
            lo, hi = r * rows, min(shape[0], (r + 1) * rows)
            bits = _mask_values(name, np.asarray(arr[lo:hi]), where)
            _put_bits(out, lo * row, bits)
            count += int(np.count_nonzero(bits))
    else:  # rows too wide to read whole: one chunk at a time, its set entries placed
        for index in present_chunks(directory, facts):
            sel = tuple(slice(i * c, min(s, (i + 1) * c))
                        for i, c, s in zip(index, facts.chunk_shape, shape, strict=True))
            block = _mask_values(name, np.asarray(arr[sel]), where).reshape(
                [b.stop - b.start for b in sel])
            hits = np.nonzero(block)
            count += int(hits[0].size)
            if hits[0].size:
                flat = np.ravel_multi_index(tuple(h + b.start for h, b in zip(hits, sel,
                                                                              strict=True)),
                                            shape)
                np.bitwise_or.at(out, flat >> 3, (1 << (flat & 7)).astype(np.uint8))
    return ImportedTensor(name, tuple(shape), out, count)


def _mask_values(name: str, values: np.ndarray, where: str) -> np.ndarray:
    """``values`` as a flat bool array: a ``bool`` array, or ``uint8`` holding 0 and 1."""
    if values.dtype == np.uint8:
        if values.size and int(values.max()) > 1:
            raise MaskStoreError(f"{where}: tensor {name!r} holds values other than 0 and 1 "
                                 f"(up to {int(values.max())}); a mask is bool, or uint8 0/1",
                                 where)
        return values.view(bool).ravel()
    if values.dtype != np.bool_:
        raise MaskStoreError(f"{where}: tensor {name!r} is {values.dtype}; a mask is bool, or "
                             "uint8 0/1", where)
    return values.ravel()


def _put_bits(out: np.ndarray, pos: int, bits: np.ndarray) -> None:
    """OR the entries ``bits`` into the little-endian packed ``out`` from entry ``pos``."""
    lead = min((-pos) % 8, bits.size)
    for j in np.flatnonzero(bits[:lead]):
        out[(pos + j) >> 3] |= np.uint8(1 << ((pos + j) & 7))
    pos += lead
    bits = bits[lead:]
    if bits.size:
        packed = np.packbits(bits, bitorder=BITORDER)
        out[pos >> 3:(pos >> 3) + packed.size] |= packed


#: Each byte with its bit order reversed (big to little bit order).
_REVERSED = np.packbits(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1,
                                      bitorder="big"), axis=1, bitorder="little").ravel()


def open_source(source: str | os.PathLike[str] | Mapping[str, Any]) -> MaskSource:
    """The mask source ``source`` names: a mapping of arrays, a ``.safetensors`` file, or a
    directory holding a Zarr v3 store (``zarr.json``)."""
    if isinstance(source, Mapping):
        return from_arrays(source)
    path = Path(source).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        read_header(path)  # refuses it by name, never opening it
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if path.is_dir():
        if not (path / "zarr.json").is_file():
            raise UsageError(f"{path} is not a Zarr v3 store (no zarr.json); import a Zarr "
                             "store, a .safetensors file of masks, or a dict of arrays")
        return from_zarr(path)
    if path.suffix.lower() == ".safetensors":
        return from_safetensors(path)
    raise UsageError(f"cannot import {path}: give a Zarr v3 store (a directory), a "
                     ".safetensors file of bool/uint8 masks, or (from Python) a dict of arrays")
