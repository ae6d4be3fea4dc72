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
from maskhub.errors import MaskStoreError, UsageError
from maskhub.hub.layout import safe_relpath
from maskhub.schemas.metadata import BITORDER, FORMAT_VERSION, STORE_KIND

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
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        attrs = dict(group.attrs)
        arrays = dict(group.arrays())
        subgroups = [n for n, _ in group.groups()]
    except Exception as exc:
        raise MaskStoreError(f"{path} is not a readable Zarr v3 group: {exc}", str(path)) from exc
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
        a = dict(arr.attrs)
        if arr.dtype == np.uint8 and "shape" in a:
            got = _unpack(name, arr, a, where)
        else:
            got = pack_bits(name, np.asarray(arr[...]), where)
            if "shape" in a and [int(s) for s in a["shape"]] != list(got.shape):
                raise MaskStoreError(f"{where}: array {name!r} has shape {list(got.shape)}, "
                                     f"its shape attribute says {a['shape']}", where)
        for key, value in (("numel", got.numel), ("n_updated", got.n_updated)):
            if key in a and a[key] != value:
                raise MaskStoreError(f"{where}: array {name!r} has {key} {value}, its "
                                     f"attributes say {a[key]}", where)
        return got

    return MaskSource("zarr", where, names, read, attrs)


def _unpack(name: str, arr: Any, attrs: dict[str, Any], where: str) -> ImportedTensor:
    """A packed ``uint8`` array (attributes ``shape``, ``bitorder``), repacked little-endian
    with its padding bits cleared."""
    shape = attrs["shape"]
    bitorder = attrs.get("bitorder")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise MaskStoreError(f"{where}: array {name!r} has a bad shape attribute {shape!r}",
                             where)
    if bitorder not in ("little", "big"):
        raise MaskStoreError(f"{where}: packed array {name!r} needs a bitorder attribute, "
                             f"'little' or 'big' (not {bitorder!r})", where)
    numel = math.prod(shape)
    if arr.shape != ((numel + 7) // 8,):
        raise MaskStoreError(f"{where}: packed array {name!r} has shape {list(arr.shape)}; "
                             f"{numel} entries need [{(numel + 7) // 8}] bytes", where)
    bits = np.unpackbits(np.asarray(arr[...]), count=numel, bitorder=bitorder)
    return pack_bits(name, bits.view(bool).reshape(shape), where)


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
