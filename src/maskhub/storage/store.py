"""The mask store: one Zarr v3 group per mask, one packed-bit array per parameter tensor.

Layout (the contract in DESIGN.md and the README):

* group attributes: the :class:`~maskhub.schemas.MaskMetadata` dict (``kind``,
  ``format_version``...) plus ``tensors``, the tensor names in checkpoint order;
* one array per tensor, named exactly as the parameter: ``uint8`` of ``ceil(numel/8)``
  bytes, zstd-compressed, with attributes ``shape``, ``bitorder`` (``"little"``),
  ``numel``, ``n_updated``, ``layer``, ``module``, ``base_dtype``, ``target_dtype``.

A reader with only zarr and numpy rebuilds a mask with
``np.unpackbits(a[:], count=prod(shape), bitorder=a.attrs["bitorder"]).reshape(shape)``.

Codec and chunks: ``bytes`` + ``zstd`` level 1, chunks of :data:`CHUNK_BYTES` packed bytes.
Packed random bits at density p compress with zstd-1 to about 1.27x the entropy bound H(p) at
p = 5%, 1.07x at 10%, 1.02x at 20% and 1.0x at 50%; higher levels gain little below 10% at a
tenth of the speed or less (BENCHMARKS.md, docs/performance.md). Chunks that are all zero
are not written at all (Zarr reads a missing chunk as the fill value 0), so an untouched
tensor costs only its ``zarr.json``.

Arrays are written without going through zarr's generic write path (which costs ~10 ms per
array and compresses at a fraction of zstd's speed): the writer emits the same ``zarr.json``
document and zstd frames that zarr-python writes, and the tests read every store back with
stock zarr. Stores are written aside (``<home>/tmp``) and renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numcodecs import Zstd

from maskhub.errors import MaskStoreError, UsageError
from maskhub.schemas.metadata import BITORDER, FORMAT_VERSION, STORE_KIND, MaskMetadata, TensorStats

if TYPE_CHECKING:
    import zarr
from maskhub.kernels.bitcount import count_entries
from maskhub.storage import remote
from maskhub.storage.files import remove_tree

#: Packed bytes per chunk: 4 MiB, i.e. 32 Mi parameters per chunk.
CHUNK_BYTES = 4 << 20
ZSTD_LEVEL = 1
#: Array names written directly; anything else (nested paths...) goes through zarr itself.
_PLAIN_NAME = re.compile(r"^(?!\.)(?!__)[A-Za-z0-9_.\-]+$")
_ZSTD = Zstd(level=ZSTD_LEVEL, checksum=False)


def _array_attrs(stats: TensorStats) -> dict:
    d = stats.to_dict()
    d.pop("tensor")
    d["bitorder"] = BITORDER
    return d


def array_metadata(nbytes: int, chunk: int, attributes: dict) -> dict:
    """The ``zarr.json`` document of a packed-bit array, as zarr-python 3 writes it."""
    return {
        "shape": [nbytes],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "bytes"},
                   {"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}}],
        "attributes": attributes,
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def write_packed_array(directory: Path, packed: np.ndarray, attributes: dict,
                       chunk_bytes: int = CHUNK_BYTES) -> int:
    """Write one packed-bit Zarr v3 array at ``directory``; return the bytes stored.

    All-zero chunks are skipped (read back as the fill value).
    """
    (directory / "c").mkdir(parents=True)
    stored = 0
    for key, data in packed_array_files(packed, attributes, chunk_bytes):
        (directory / key).write_bytes(data)
        stored += len(data)
    return stored


def packed_array_files(packed: np.ndarray, attributes: dict,
                       chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[str, bytes]]:
    """The files of one packed-bit Zarr v3 array, ``(key relative to the array, bytes)``:
    the compressed chunks (all-zero ones skipped), then ``zarr.json``."""
    nbytes = packed.shape[0]
    chunk = max(1, min(nbytes, chunk_bytes))
    for i, start in enumerate(range(0, nbytes, chunk)):
        part = packed[start:start + chunk]
        if not part.any():
            continue
        if part.shape[0] < chunk:  # zarr stores edge chunks at full size
            full = np.zeros(chunk, dtype=np.uint8)
            full[:part.shape[0]] = part
            part = full
        yield f"c/{i}", _ZSTD.encode(part)
    yield "zarr.json", json.dumps(array_metadata(nbytes, chunk, attributes),
                                  indent=2).encode()


def _write_group(directory: Path, attributes: dict) -> None:
    """Write the ``zarr.json`` of a Zarr v3 group, as zarr-python 3 writes it."""
    doc = {"attributes": attributes, "zarr_format": 3, "node_type": "group"}
    (directory / "zarr.json").write_text(json.dumps(doc, indent=2))


class MaskWriter:
    """Writes the arrays of one mask store, then its metadata.

    The store is a local directory or a URL (``s3://...``, see :mod:`maskhub.storage.remote`).
    """

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        """Create an empty store at ``path`` (a directory that must not exist, or a URL).

        ``create=False`` attaches to a store that another writer created, to add arrays only
        (the Ray tasks of a diff); an array written again replaces the earlier one.
        """
        self.url: str | None = str(path) if remote.is_url(path) else None
        self.path: Path | str = self.url or Path(path)
        self.attached = not create
        self._group: zarr.Group | None = None
        if create and self.url is None:
            # A local store is written without zarr (its import is most of a small diff's
            # start-up): the same group document zarr-python writes.
            Path(self.path).mkdir()
            _write_group(Path(self.path), {})
        elif create:
            import zarr

            self._group = zarr.open_group(store=self._zarr_store(), mode="w-", zarr_format=3)
        self.names: list[str] = []

    def _zarr_store(self) -> Any:
        return remote.zarr_store(self.url, read_only=False) if self.url else str(self.path)

    @property
    def group(self) -> zarr.Group:
        """The store's root group (opened with zarr on first use)."""
        if self._group is None:
            import zarr

            self._group = zarr.open_group(store=self._zarr_store(), mode="r+", zarr_format=3)
        return self._group

    def add(self, stats: TensorStats, packed: np.ndarray) -> None:
        """Store one tensor's packed bits (``ceil(numel/8)`` uint8) with its stats."""
        nbytes = (stats.numel + 7) // 8
        if packed.shape != (nbytes,) or packed.dtype != np.uint8:
            raise ValueError(f"{stats.tensor}: packed bits must be uint8[{nbytes}]")
        plain = _PLAIN_NAME.match(stats.tensor)
        if plain and self.url:  # same bytes as below; a rewrite replaces the same keys
            remote.put_files(self.url, {f"{stats.tensor}/{key}": data for key, data in
                                        packed_array_files(packed, _array_attrs(stats))})
            self.names.append(stats.tensor)
            return
        if self.attached and isinstance(self.path, Path):
            remove_tree(self.path / stats.tensor)  # left by an earlier attempt
        if plain and isinstance(self.path, Path) and not (self.path / stats.tensor).exists():
            write_packed_array(self.path / stats.tensor, packed, _array_attrs(stats))
        else:
            from zarr.codecs import ZstdCodec

            arr = self.group.create_array(
                name=stats.tensor,
                shape=(nbytes,),
                dtype="uint8",
                chunks=(max(1, min(nbytes, CHUNK_BYTES)),),
                compressors=[ZstdCodec(level=ZSTD_LEVEL)],
                fill_value=0,
                attributes=_array_attrs(stats),
            )
            if nbytes:
                arr[:] = packed
        self.names.append(stats.tensor)

    def finish(self, meta: MaskMetadata) -> None:
        """Write the group metadata; the store is complete after this."""
        attrs = meta.to_dict()
        attrs["tensors"] = list(self.names)
        attrs["description"] = STORE_DESCRIPTION  # issue 26: the store says what it holds
        if self.url is None and self._group is None:
            _write_group(Path(self.path), attrs)
        else:
            self.group.update_attributes(attrs)  # one write (attrs.update: once per key)


def _chunk_dir(arr: zarr.Array) -> Path | None:
    """The directory of a local array's chunk files when they can be read without zarr (the
    layout :class:`MaskWriter` writes), else ``None``."""
    from zarr.codecs import BytesCodec, ZstdCodec
    from zarr.storage import LocalStore

    meta = arr.metadata
    codecs = getattr(meta, "codecs", ())
    if not (isinstance(arr.store, LocalStore) and getattr(meta, "zarr_format", 0) == 3
            and len(arr.shape) == 1 and arr.shape[0] > 0 and len(codecs) == 2
            and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], ZstdCodec)
            and arr.dtype == np.uint8 and int(meta.fill_value) == 0):
        return None
    return Path(arr.store.root) / arr.path


class MaskStore:
    """Read access to one mask store."""

    def __init__(self, path: Path | str) -> None:
        """Open and validate the store at ``path`` (a directory or a URL)."""
        import zarr

        self.path: Path | str = str(path) if remote.is_url(path) else Path(path)
        try:
            zstore = remote.zarr_store(str(path), read_only=True) \
                if isinstance(self.path, str) else str(self.path)
            self.group = zarr.open_group(store=zstore, mode="r", zarr_format=3)
            attrs = dict(self.group.attrs)
        except UsageError:
            raise
        except Exception as exc:
            raise MaskStoreError(f"{self.path} is not a readable Zarr v3 mask store: {exc}",
                                 str(self.path)) from exc
        if attrs.get("kind") != STORE_KIND:
            raise MaskStoreError(f"{self.path} is a Zarr group but not a maskhub mask",
                                 str(self.path))
        version = attrs.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise MaskStoreError(
                f"{self.path} has mask format_version {version!r}; this maskhub reads up to "
                f"{FORMAT_VERSION} (upgrade maskhub)", str(self.path))
        try:
            self.metadata = MaskMetadata.from_dict(attrs)
        except (TypeError, ValueError) as exc:
            raise MaskStoreError(f"{self.path}: bad mask metadata: {exc}", str(self.path)) from exc
        self.names: list[str] = list(attrs.get("tensors") or [])

    def stats(self, name: str) -> TensorStats:
        """Per-tensor stats as recorded in the array attributes."""
        arr = self._array(name)
        d = dict(arr.attrs)
        d["tensor"] = name
        return TensorStats.from_dict(d)

    def iter_stats(self) -> Iterator[TensorStats]:
        """Stats of every tensor, in order."""
        for name in self.names:
            yield self.stats(name)

    def _array(self, name: str) -> zarr.Array:
        import zarr

        try:
            arr = self.group[name]
        except KeyError as exc:
            raise MaskStoreError(f"{self.path}: tensor {name!r} is missing from the store",
                                 str(self.path)) from exc
        if not isinstance(arr, zarr.Array):
            raise MaskStoreError(f"{self.path}: {name!r} is not an array", str(self.path))
        return arr

    def packed(self, name: str) -> np.ndarray:
        """The packed bits of one tensor (uint8, little bit order).

        A local array in the layout :class:`MaskWriter` writes (one dimension, ``bytes`` +
        ``zstd``, fill value 0) is read chunk file by chunk file, each decoded straight into
        the result: about twice as fast as zarr's generic read path, same bytes.
        """
        arr = self._array(name)
        directory = _chunk_dir(arr)
        if directory is None:
            return np.asarray(arr[:])
        nbytes, chunk = int(arr.shape[0]), int(arr.chunks[0])
        n_chunks = -(-nbytes // chunk)
        out = np.empty(n_chunks * chunk, dtype=np.uint8)  # edge chunks are stored full size
        try:
            for i in range(n_chunks):
                part = out[i * chunk:(i + 1) * chunk]
                try:
                    with open(directory / arr.metadata.encode_chunk_key((i,)), "rb") as f:
                        data = f.read()
                except FileNotFoundError:  # an all-zero chunk is not written
                    part[:] = 0
                    continue
                _ZSTD.decode(data, out=part)
        except (OSError, RuntimeError, ValueError) as exc:
            raise MaskStoreError(f"{self.path}: cannot read tensor {name!r}: {exc}",
                                 str(self.path)) from exc
        return out[:nbytes]

    def unpacked(self, name: str) -> np.ndarray:
        """The boolean mask of one tensor, with the parameter's shape."""
        st = self.stats(name)
        bits = np.unpackbits(self.packed(name), count=st.numel, bitorder=BITORDER)
        return bits.view(bool).reshape(st.shape)

    def validate(self) -> None:
        """Check every array against its recorded shape and count (popcount of the bits)."""
        total = 0
        for name in self.names:
            st = self.stats(name)
            arr = self._array(name)
            expect = (st.numel + 7) // 8
            if arr.dtype != np.uint8 or arr.shape != (expect,) or math.prod(st.shape) != st.numel:
                raise MaskStoreError(f"{self.path}: array {name!r} has shape {arr.shape}, its "
                                     f"metadata says {st.numel} entries", str(self.path))
            count = count_entries(self.packed(name), st.numel)
            if count != st.n_updated:
                raise MaskStoreError(f"{self.path}: array {name!r} has {count} set bits, its "
                                     f"metadata says {st.n_updated}", str(self.path))
            total += st.numel
        if total != self.metadata.n_params:
            raise MaskStoreError(f"{self.path}: tensors hold {total} parameters, the metadata "
                                 f"says {self.metadata.n_params}", str(self.path))


# -- issue 26: metadata edits (maskhub edit) -------------------------------------------------

#: What a reader without maskhub needs to know, in the group attributes of every store
#: written since (``description``; readers ignore it).
STORE_DESCRIPTION = {
    "bit": "1: that parameter entry was updated (|target - base| > tol, tol in the "
           "attributes), 0: it was not",
    "arrays": "one uint8 array per parameter tensor, named as the parameter: the flattened "
              "(C-order) mask packed 8 entries per byte; rebuild with np.unpackbits(a[:], "
              "count=prod(a.attrs['shape']), bitorder=a.attrs['bitorder'])"
              ".reshape(a.attrs['shape']) (a bool array, if any, is the mask itself)",
    "documentation": "maskhub README.md, section 'Mask store layout (Zarr v3)'",
}

def replace_attributes(path: Path | str, attributes: dict) -> Callable[[], None]:
    """Replace the group attributes of the store at ``path`` and return a function that puts
    the old ones back. A local store's ``zarr.json`` is written aside and renamed over the
    old one (a reader sees the old document or the new one, never half of one); a remote
    store's group document is one object written by zarr."""
    if not remote.is_url(path):
        doc_path = Path(path) / "zarr.json"
        old = doc_path.read_bytes()
        doc = json.loads(old)
        doc["attributes"] = attributes

        def put(data: bytes) -> None:
            aside = doc_path.with_name("zarr.json.edit")
            aside.write_bytes(data)
            os.replace(aside, doc_path)

        put(json.dumps(doc, indent=2).encode())
        return lambda: put(old)
    import zarr

    group = zarr.open_group(store=remote.zarr_store(str(path), read_only=False), mode="r+",
                            zarr_format=3)
    before = dict(group.attrs)
    group.update_attributes(attributes)
    return lambda: group.update_attributes(before)
