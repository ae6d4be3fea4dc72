"""The mask store: one Zarr v3 group per mask, one packed-bit array per parameter tensor.

Layout (the contract in DESIGN.md and the README):

* group attributes: the :class:`~maskhub.schemas.MaskMetadata` dict (``kind``,
  ``format_version``...) plus ``tensors``, the tensor names in checkpoint order;
* one array per tensor, named exactly as the parameter: ``uint8`` of ``ceil(numel/8)``
  bytes, zstd-compressed, with attributes ``shape`` (the parameter's shape, not the
  array's; also as ``parameter_shape`` since issue 26), ``bitorder`` (``"little"``),
  ``numel``, ``n_updated``, ``layer``, ``module``, ``base_dtype``, ``target_dtype``, and one
  dimension name (``dimension_names``: ``<tensor>.bytes``, see :func:`dimension_name`) so
  that xarray opens the group.

A reader with only zarr and numpy rebuilds a mask with
``np.unpackbits(a[:], count=prod(shape), bitorder=a.attrs["bitorder"]).reshape(shape)``.

Low-density tensors (below 12%, and up to 20% where it is smaller) are stored instead as a
byte-gap code of their set bits, marked by the array attribute ``encoding: "gaps-u8"``
(no ``bitorder``; layout and the numpy lines that decode it in :mod:`maskhub.storage.gapcode`
and the README). Arrays without ``encoding`` are packed bits, as every store written before.

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

from maskhub.checkpoints.validate import (
    ArrayFacts,
    check_chunk_files,
    check_inside,
    check_mask_counts,
    chunk_file_limit,
    count_problem,
    present_chunks,
    read_array_metadata,
    read_chunk,
    read_json_file,
    short,
)
from maskhub.errors import MaskStoreError, UsageError, environment_errors
from maskhub.schemas.metadata import BITORDER, FORMAT_VERSION, STORE_KIND, MaskMetadata, TensorStats

if TYPE_CHECKING:
    import numpy as np
    import zarr
from maskhub.kernels.bitcount import count_entries, plain_count
from maskhub.storage import gapcode, remote, zstdframe
from maskhub.storage.files import remove_tree
from maskhub.storage.values import (
    DTYPE_ATTR,
    HAS_VALUES_ATTR,
    VALUES_GROUP,
    check_values,
    decode_chunk,
    direct_codecs,
    group_document,
    values_array_files,
)

#: Packed bytes per chunk: 4 MiB, i.e. 32 Mi parameters per chunk.
CHUNK_BYTES = 4 << 20
ZSTD_LEVEL = 1
#: Array names written directly; anything else (nested paths...) goes through zarr itself.
_PLAIN_NAME = re.compile(r"^(?!\.)(?!__)[A-Za-z0-9_.\-]+$")


#: The array attribute holding the parameter's shape (the same as the ``shape`` attribute).
PARAMETER_SHAPE_ATTR = "parameter_shape"


def dimension_name(tensor: str, what: str) -> str:
    """The one dimension name of a tensor's array (Zarr v3 ``dimension_names``, issue 26):
    ``<tensor>.bytes`` (packed bits), ``<tensor>.gaps`` (byte-gap code), ``<tensor>.values``
    (a patch's values). One name per array, since the arrays' lengths differ: xarray opens
    the group as a Dataset whose variables share no dimension."""
    return f"{tensor}.{what}"


def _array_attrs(stats: TensorStats) -> dict:
    d = stats.to_dict()
    d.pop("tensor")
    for key in ("max_abs_delta", "n_null", "n_null_updated"):  # absent rather than null
        if d.get(key) is None:
            d.pop(key, None)
    d["bitorder"] = BITORDER
    # issue 26: the parameter's shape under a name that does not clash with the array's own
    # shape (the packed bytes); ``shape`` stays, as the format's contract names it
    d[PARAMETER_SHAPE_ATTR] = list(stats.shape)
    return d


def array_metadata(nbytes: int, chunk: int, attributes: dict,
                   dimension: str | None = None) -> dict:
    """The ``zarr.json`` document of a packed-bit array, as zarr-python 3 writes it;
    ``dimension``: the array's one dimension name (``dimension_names``), if any."""
    doc = {
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
    if dimension is not None:
        doc["dimension_names"] = [dimension]
    return doc


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
                       chunk_bytes: int = CHUNK_BYTES, dimension: str | None = None
                       ) -> Iterator[tuple[str, bytes]]:
    """The files of one packed-bit Zarr v3 array, ``(key relative to the array, bytes)``:
    the compressed chunks (all-zero ones skipped), then ``zarr.json`` (with
    ``dimension_names: [dimension]`` when given)."""
    import numpy as np

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
        yield f"c/{i}", zstdframe.compress(part, ZSTD_LEVEL)
    yield "zarr.json", json.dumps(array_metadata(nbytes, chunk, attributes, dimension),
                                  indent=2).encode()


def tensor_array_files(packed: np.ndarray, stats: TensorStats) -> list[tuple[str, bytes]]:
    """The files of one tensor's array: below :data:`~maskhub.storage.gapcode.GAPS_DENSITY`
    the byte-gap code (:mod:`maskhub.storage.gapcode`, attribute ``encoding: "gaps-u8"``),
    else packed bits."""
    attrs = _array_attrs(stats)
    density = stats.n_updated / stats.numel if stats.numel else 0.0
    if not (stats.n_updated and density < gapcode.GAPS_DENSITY):
        return list(packed_array_files(packed, attrs,
                                       dimension=dimension_name(stats.tensor, "bytes")))
    gap_attrs = {k: v for k, v in attrs.items() if k != "bitorder"}
    gap_attrs[gapcode.ENCODING_ATTR] = gapcode.GAPS_U8
    return list(packed_array_files(gapcode.encode(packed, stats.numel), gap_attrs,
                                   dimension=dimension_name(stats.tensor, "gaps")))


def _write_files(directory: Path, files: list[tuple[str, bytes]]) -> None:
    """Write one array's files (keys relative to ``directory``)."""
    (directory / "c").mkdir(parents=True)
    for key, data in files:
        (directory / key).write_bytes(data)


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
        self.names: list[str] = []
        with environment_errors(self.path):  # a full disk: one line naming the store
            if create and self.url is None:
                # A local store is written without zarr (its import is most of a small
                # diff's start-up): the same group document zarr-python writes.
                Path(self.path).mkdir()
                _write_group(Path(self.path), {})
            elif create:
                import zarr

                self._group = zarr.open_group(store=self._zarr_store(), mode="w-",
                                              zarr_format=3)

        #: Tensors given values (a patch: :mod:`maskhub.storage.values`).
        self.valued: list[str] = []

    def _zarr_store(self) -> Any:
        return remote.zarr_store(self.url, read_only=False) if self.url else str(self.path)

    @property
    def group(self) -> zarr.Group:
        """The store's root group (opened with zarr on first use)."""
        if self._group is None:
            import zarr

            self._group = zarr.open_group(store=self._zarr_store(), mode="r+", zarr_format=3)
        return self._group

    def add(self, stats: TensorStats, packed: np.ndarray,
            values: np.ndarray | None = None) -> None:
        """Store one tensor's packed bits (``ceil(numel/8)`` uint8) with its stats (an
        error of the disk: :class:`~maskhub.errors.EnvironmentFailure`).

        ``values`` (a patch): the target's ``stats.n_updated`` entries at the set bits, in
        flat C order, as :func:`~maskhub.storage.values.storage_dtype` of
        ``stats.target_dtype`` (bf16: its uint16 bits); stored in ``values/<tensor>``. Give
        values for every tensor of a store or for none.
        """
        import numpy as np

        nbytes = (stats.numel + 7) // 8
        if packed.shape != (nbytes,) or packed.dtype != np.uint8:
            raise ValueError(f"{stats.tensor}: packed bits must be uint8[{nbytes}]")
        if values is not None:
            values = check_values(values, stats.target_dtype, stats.n_updated, stats.tensor)
        with environment_errors(self.path):
            self._add(stats, packed, nbytes, values)

    def _add(self, stats: TensorStats, packed: np.ndarray, nbytes: int,
             values: np.ndarray | None) -> None:
        plain = _PLAIN_NAME.match(stats.tensor)
        if plain and self.url:  # same bytes as below; a rewrite replaces the same keys
            files = {f"{stats.tensor}/{key}": data for key, data in
                     tensor_array_files(packed, stats)}
            if values is not None:
                files[f"{VALUES_GROUP}/zarr.json"] = group_document()
                files.update((f"{VALUES_GROUP}/{stats.tensor}/{key}", data) for key, data in
                             values_array_files(values, stats.target_dtype,
                                                dimension=dimension_name(stats.tensor,
                                                                         "values")))
            remote.put_files(self.url, files)
            self._added(stats.tensor, values is not None)
            return
        if self.attached and isinstance(self.path, Path):
            remove_tree(self.path / stats.tensor)  # left by an earlier attempt
        if plain and isinstance(self.path, Path) and not (self.path / stats.tensor).exists():
            _write_files(self.path / stats.tensor, tensor_array_files(packed, stats))
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
                dimension_names=[dimension_name(stats.tensor, "bytes")],
            )
            if nbytes:
                arr[:] = packed
        if values is not None:
            self._add_values(stats, values, bool(plain))
        self._added(stats.tensor, values is not None)

    def _added(self, name: str, valued: bool) -> None:
        self.names.append(name)
        if valued:
            self.valued.append(name)

    def _add_values(self, stats: TensorStats, values: np.ndarray, plain: bool) -> None:
        if plain and isinstance(self.path, Path):
            group = self.path / VALUES_GROUP
            if not (group / "zarr.json").exists():
                group.mkdir(exist_ok=True)
                (group / "zarr.json").write_bytes(group_document())
            directory = group / stats.tensor
            if self.attached:
                remove_tree(directory)
            (directory / "c").mkdir(parents=True)
            for key, data in values_array_files(values, stats.target_dtype,
                                                dimension=dimension_name(stats.tensor,
                                                                         "values")):
                (directory / key).write_bytes(data)
            return
        from zarr.codecs import BloscCodec

        from maskhub.storage.values import BLOSC_CONFIG, VALUES_CHUNK, storage_dtype

        n = values.shape[0]
        arr = self.group.create_array(
            name=f"{VALUES_GROUP}/{stats.tensor}", shape=(n,),
            dtype=storage_dtype(stats.target_dtype), chunks=(max(1, min(n, VALUES_CHUNK)),),
            compressors=[BloscCodec(**BLOSC_CONFIG)], fill_value=0,
            attributes={DTYPE_ATTR: stats.target_dtype}, overwrite=True,
            dimension_names=[dimension_name(stats.tensor, "values")])
        if n:
            arr[:] = values

    def finish(self, meta: MaskMetadata) -> None:
        """Write the group metadata; the store is complete after this."""
        attrs = meta.to_dict()
        attrs["tensors"] = list(self.names)
        if self.valued and len(set(self.valued)) != len(set(self.names)):
            missing = next(n for n in self.names if n not in set(self.valued))
            raise ValueError(f"{missing}: a patch needs values for every tensor")
        if meta.has_values != bool(self.valued):
            raise ValueError(f"metadata says has_values={meta.has_values}, the writer was "
                             f"given values for {len(self.valued)} tensors")
        attrs[HAS_VALUES_ATTR] = meta.has_values
        attrs["description"] = STORE_DESCRIPTION  # issue 26: the store says what it holds
        with environment_errors(self.path):
            if self.url is None and self._group is None:
                _write_group(Path(self.path), attrs)
            else:
                self.group.update_attributes(attrs)  # one write (attrs.update: once per key)


class MaskStore:
    """Read access to one mask store."""

    def __init__(self, path: Path | str) -> None:
        """Open and validate the store at ``path`` (a directory or a URL).

        A local store's group document is read here without zarr (whose import is most of a
        push's or a pull's own work); zarr opens the group on the first use of
        :attr:`group`. A remote store, or a document that is not plainly a Zarr v3 group,
        goes through zarr at once (its error says why)."""
        self.path: Path | str = str(path) if remote.is_url(path) else Path(path)
        self._facts: dict[str, ArrayFacts] = {}
        self._group: zarr.Group | None = None
        attrs: dict[str, Any] | None = None
        if isinstance(self.path, Path) and (self.path / "zarr.json").exists():
            # Untrusted metadata is checked before zarr parses it (issue 21: a regular file,
            # bounded size and nesting).
            doc = read_json_file(self.path / "zarr.json", f"{self.path}/zarr.json")
            if isinstance(doc, dict) and doc.get("zarr_format") == 3 and \
                    doc.get("node_type") == "group" and \
                    isinstance(doc.get("attributes", {}), dict):
                attrs = dict(doc.get("attributes") or {})
        if attrs is None:
            attrs = dict(self.group.attrs)
        if attrs.get("kind") != STORE_KIND:
            raise MaskStoreError(f"{self.path} is a Zarr group but not a maskhub mask",
                                 str(self.path))
        version = attrs.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise MaskStoreError(
                f"{self.path} has mask format_version {version!r}; this maskhub reads up to "
                f"{FORMAT_VERSION} (upgrade maskhub)", str(self.path))
        check_mask_counts(attrs, str(self.path))
        try:
            self.metadata = MaskMetadata.from_dict(attrs)
        except (TypeError, ValueError) as exc:
            raise MaskStoreError(f"{self.path}: bad mask metadata: {exc}", str(self.path)) from exc
        self.names: list[str] = list(attrs.get("tensors") or [])
        self._attrs = attrs

    @property
    def attributes(self) -> dict[str, Any]:
        """The group attributes (a copy)."""
        return dict(self._attrs)

    @property
    def group(self) -> zarr.Group:
        """The store's root group, opened with zarr on first use."""
        if self._group is None:
            import zarr

            try:
                zstore = remote.zarr_store(str(self.path), read_only=True) \
                    if isinstance(self.path, str) else str(self.path)
                self._group = zarr.open_group(store=zstore, mode="r", zarr_format=3)
            except UsageError:
                raise
            except Exception as exc:
                raise MaskStoreError(f"{self.path} is not a readable Zarr v3 mask store: {exc}",
                                     str(self.path)) from exc
        return self._group

    def stats(self, name: str) -> TensorStats:
        """Per-tensor stats as recorded in the array attributes."""
        d = dict(self._attributes(name))  # local: the validated zarr.json, no zarr lookup
        bad = count_problem(d.get("numel"), d.get("n_updated"), d.get("shape"))
        if bad:
            raise MaskStoreError(f"{self.path}: array {short(name)} has bad metadata: {bad}",
                                 str(self.path))
        d["tensor"] = name
        return TensorStats.from_dict(d)

    def iter_stats(self) -> Iterator[TensorStats]:
        """Stats of every tensor, in order."""
        for name in self.names:
            yield self.stats(name)

    def _array(self, name: str) -> zarr.Array:
        import zarr

        self._local_facts(name)  # the one validator reads zarr.json before zarr believes it
        try:
            arr = self.group[name]
        except KeyError as exc:
            raise MaskStoreError(f"{self.path}: tensor {name!r} is missing from the store",
                                 str(self.path)) from exc
        if not isinstance(arr, zarr.Array):
            raise MaskStoreError(f"{self.path}: {name!r} is not an array", str(self.path))
        return arr

    def encoding(self, name: str) -> str | None:
        """The layout of one tensor's array: ``None`` (packed bits) or ``"gaps-u8"``."""
        enc = self._attributes(name).get(gapcode.ENCODING_ATTR)
        if enc not in gapcode.KNOWN_ENCODINGS:
            raise MaskStoreError(f"{self.path}: array {name!r} has encoding {enc!r}; "
                                 "this maskhub reads packed bits and 'gaps-u8' (upgrade "
                                 "maskhub)", str(self.path))
        return enc

    def _attributes(self, name: str) -> dict[str, Any]:
        """One array's attributes: from its validated ``zarr.json`` for a local store (read
        once, no zarr lookup), through zarr for a remote one."""
        facts = self._local_facts(name)
        if facts is not None:
            return facts.attributes
        return dict(self._array(name).attrs)

    def _local_facts(self, name: str) -> ArrayFacts | None:
        """The validated ``zarr.json`` of a local store's array (None for a remote store)."""
        if not isinstance(self.path, Path):
            return None
        facts = self._facts.get(name)
        if facts is None:
            directory = self.path / name
            check_inside(self.path, directory, f"{self.path}/{short(name)}")
            if not os.path.lexists(directory / "zarr.json"):
                raise MaskStoreError(f"{self.path}: tensor {name!r} is missing from the store",
                                     str(self.path))
            facts = read_array_metadata(directory, name, str(self.path), self.path)
            self._facts[name] = facts
        return facts

    def _regions(self, name: str) -> Iterator[tuple[int, np.ndarray | memoryview]]:
        """``(start, bytes)`` of each chunk of a local packed array that is present on disk,
        in order, decoded one at a time into one reused buffer (a chunk that is absent holds
        zeros). Memory follows the chunk size and the files present, never the declared
        shape; chunk files that leave the store or are not regular files are refused.

        The bytes are a ``memoryview`` of that buffer where maskhub decodes the chunk itself
        (``bytes`` + ``zstd``: no numpy imported), a uint8 array where zarr decodes it."""
        facts = self._local_facts(name)
        assert facts is not None and isinstance(self.path, Path)
        if facts.data_type != "uint8" or len(facts.shape) != 1:
            raise MaskStoreError(f"{self.path}: array {short(name)} is {facts.data_type} with "
                                 f"{len(facts.shape)} dimension(s); a stored mask is packed "
                                 "uint8 with one", str(self.path))
        nbytes, chunk = facts.shape[0], facts.chunk_shape[0]
        # The layout MaskWriter writes (checked by the validator: 1-D uint8, fill value 0)
        # with bytes + zstd is decoded here; anything else goes through zarr, one chunk at a
        # time.
        direct = facts.codecs == ("bytes", "zstd") and nbytes > 0
        arr = None if direct else self._array(name)
        directory = self.path / name
        buf = bytearray(chunk) if direct else None
        limit = chunk_file_limit(chunk)
        if not direct:  # a library decodes: no decompression bomb reaches it
            check_chunk_files(directory, self.path, facts, f"{self.path}: array {short(name)}")
        try:
            for (i,) in present_chunks(directory, facts):
                start = i * chunk
                stop = min(nbytes, start + chunk)
                what = f"{self.path}: array {short(name)} chunk {facts.chunk_key((i,))}"
                data = read_chunk(directory / facts.chunk_key((i,)), self.path, limit, what)
                if data is None:
                    continue
                if buf is not None:
                    zstdframe.decompress(data, buf)
                    yield start, memoryview(buf)[:stop - start]
                else:  # other codecs: zarr decodes this one chunk (frames checked above)
                    import numpy as np

                    yield start, np.asarray(arr[start:stop])  # type: ignore[index]
        except MaskStoreError:
            raise
        except (OSError, RuntimeError, ValueError) as exc:
            raise MaskStoreError(f"{self.path}: cannot read tensor {name!r}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else exc!r}",
                                 str(self.path)) from exc

    def packed(self, name: str) -> np.ndarray:
        """The packed bits of one tensor (uint8, little bit order), whatever its layout (a
        gap-coded array is decoded, :mod:`maskhub.storage.gapcode`).

        A local array is read chunk file by chunk file (:meth:`_regions`), each decoded
        straight into the result, a zero-filled allocation whose pages stay untouched where
        no chunk is stored: about twice as fast as zarr's generic read path, same bytes, and
        resident memory follows the bytes present.
        """
        enc = self.encoding(name)
        raw = self._stored(name)
        if enc is None:
            return raw
        numel = int(self._attributes(name).get("numel", 0))
        try:
            return gapcode.decode(raw, numel)[0]
        except gapcode.GapCodeError as exc:
            raise MaskStoreError(f"{self.path}: array {name!r}: {exc}", str(self.path)) from exc

    def _stored(self, name: str) -> np.ndarray:
        """The stored bytes of one array (packed bits or a gap code)."""
        import numpy as np

        if not isinstance(self.path, Path):
            return np.asarray(self._array(name)[:])
        nbytes = self._local_facts(name).shape[0]  # type: ignore[union-attr]
        try:
            out = np.zeros(nbytes, dtype=np.uint8)
        except MemoryError as exc:
            raise MaskStoreError(f"{self.path}: tensor {short(name)} needs {nbytes} bytes, "
                                 "more than this process can allocate", str(self.path)) from exc
        for start, data in self._regions(name):
            out[start:start + len(data)] = data
        return out

    def _stored_bytes(self, name: str) -> bytearray:
        """:meth:`_stored` of a local array as a ``bytearray`` (no numpy: a validation's)."""
        nbytes = self._local_facts(name).shape[0]  # type: ignore[union-attr]
        try:
            out = bytearray(nbytes)
        except MemoryError as exc:
            raise MaskStoreError(f"{self.path}: tensor {short(name)} needs {nbytes} bytes, "
                                 "more than this process can allocate", str(self.path)) from exc
        for start, data in self._regions(name):
            out[start:start + len(data)] = data
        return out

    def count(self, name: str, numel: int) -> int:
        """Set bits among the ``numel`` entries of one tensor, counted chunk by chunk
        (memory: one chunk, whatever the declared shape); a gap-coded array is counted and
        checked without being decoded (:func:`maskhub.storage.gapcode.count`). A local
        store's arrays are counted without numpy (below
        :data:`~maskhub.kernels.bitcount.PLAIN_COUNT_BYTES` while numpy is not loaded)."""
        local = isinstance(self.path, Path)
        if self.encoding(name) is not None:  # a gap code: counted and checked, not decoded
            try:
                return gapcode.count(self._stored_bytes(name) if local
                                     else self._stored(name), numel)
            except gapcode.GapCodeError as exc:
                raise MaskStoreError(f"{self.path}: array {name!r}: {exc}",
                                     str(self.path)) from exc
        if not local:
            return count_entries(self.packed(name), numel)
        plain = plain_count(self._local_facts(name).shape[0])  # type: ignore[union-attr]
        total = 0
        for start, data in self._regions(name):
            if not plain and isinstance(data, memoryview):
                import numpy as np

                data = np.frombuffer(data, dtype=np.uint8)
            size = len(data)
            valid = numel - start * 8  # entries from this chunk on
            if valid >= size * 8:
                total += count_entries(data, size * 8)
            elif valid > 0:
                total += count_entries(data[:(valid + 7) // 8], valid)
        return total

    @property
    def has_values(self) -> bool:
        """True for a patch: the store holds the target's values at the set bits."""
        return bool(self.metadata.has_values)

    def _values_array(self, name: str) -> zarr.Array:
        if not self.has_values:
            raise MaskStoreError(f"{self.path}: the mask holds no values (not a patch)",
                                 str(self.path))
        return self._array(f"{VALUES_GROUP}/{name}")

    def values(self, name: str) -> np.ndarray:
        """The target's values at the set bits of tensor ``name``, in flat C order of the set
        bits: a 1-D array of :func:`~maskhub.storage.values.storage_dtype` of the target's
        dtype (bf16: its raw uint16 bits; :meth:`values_dtype` names the dtype)."""
        import numpy as np

        direct = self._values_direct(name)
        if direct is not None:
            return direct
        arr = self._values_array(name)
        try:
            return np.asarray(arr[:])
        except Exception as exc:  # zarr and numcodecs raise their own types
            raise MaskStoreError(f"{self.path}: cannot read the values of {name!r}: {exc}",
                                 str(self.path)) from exc

    def _values_direct(self, name: str) -> np.ndarray | None:
        """The values of a local store's array in the layout maskhub writes (1-D, ``bytes``
        little endian + ``blosc``), decoded chunk file by chunk file without zarr (zarr's
        read path costs ~2 ms per array, more than decoding a small one); ``None`` for any
        other store or layout (then zarr reads it)."""
        import numpy as np

        if not isinstance(self.path, Path):
            return None
        if not self.has_values:
            raise MaskStoreError(f"{self.path}: the mask holds no values (not a patch)",
                                 str(self.path))
        key = f"{VALUES_GROUP}/{name}"
        facts = self._local_facts(key)
        assert facts is not None
        dt = np.dtype(facts.data_type)
        directory = self.path / key
        if not (len(facts.shape) == 1 and direct_codecs(facts.codecs, facts.bytes_endian, dt)):
            return None
        n, chunk = facts.shape[0], facts.chunk_shape[0]
        out = np.zeros(-(-n // chunk) * chunk, dtype=dt)
        limit = chunk_file_limit(chunk * dt.itemsize)
        try:
            for (i,) in present_chunks(directory, facts):
                what = f"{self.path}: array {short(key)} chunk {facts.chunk_key((i,))}"
                data = read_chunk(directory / facts.chunk_key((i,)), self.path, limit, what)
                if data is not None:
                    decode_chunk(data, out[i * chunk:(i + 1) * chunk], what)
        except MaskStoreError:
            raise
        except (OSError, RuntimeError, ValueError) as exc:
            raise MaskStoreError(f"{self.path}: cannot read the values of {name!r}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else exc!r}",
                                 str(self.path)) from exc
        return out[:n]

    def values_dtype(self, name: str) -> str:
        """The target's dtype of tensor ``name`` (torch's name), as the values array records
        it."""
        if not self.has_values:
            raise MaskStoreError(f"{self.path}: the mask holds no values (not a patch)",
                                 str(self.path))
        return str(self._attributes(f"{VALUES_GROUP}/{name}").get(DTYPE_ATTR, ""))

    def stored_bits(self, name: str) -> tuple[str | None, np.ndarray]:
        """``(encoding, bytes)`` of one tensor's mask as stored: ``(None, packed bits)`` or
        ``("gaps-u8", its byte-gap code)``, not decoded (``apply`` scatters values straight
        from a gap code, :class:`maskhub.kernels.patchbits.GapScatter`)."""
        return self.encoding(name), self._stored(name)

    def unpacked(self, name: str) -> np.ndarray:
        """The boolean mask of one tensor, with the parameter's shape."""
        import numpy as np

        st = self.stats(name)
        bits = np.unpackbits(self.packed(name), count=st.numel, bitorder=BITORDER)
        return bits.view(bool).reshape(st.shape)

    def validate(self, stop: Callable[[], bool] | None = None) -> None:
        """Check every array against its recorded shape and count (popcount of the bits).

        ``stop``: asked before each array; when it says True the caller has given up on
        the store (an interrupted push) and the check ends there, unfinished."""
        total = updated = 0
        for name in self.names:
            if stop is not None and stop():
                return
            st = self.stats(name)
            facts = self._local_facts(name)
            if facts is not None:  # the validated zarr.json: no zarr needed
                shape, uint8 = tuple(facts.shape), facts.data_type == "uint8"
            else:
                import numpy as np

                arr = self._array(name)
                shape, uint8 = tuple(arr.shape), arr.dtype == np.uint8
            expect = (st.numel + 7) // 8
            if self.encoding(name) is not None and len(shape) == 1:
                expect = int(shape[0])  # a gap code's length is its own
            if not uint8 or shape != (expect,) or math.prod(st.shape) != st.numel:
                raise MaskStoreError(f"{self.path}: array {name!r} has shape {shape}, its "
                                     f"metadata says {st.numel} entries", str(self.path))
            count = self.count(name, st.numel)
            if count != st.n_updated:
                raise MaskStoreError(f"{self.path}: array {name!r} has {count} set bits, its "
                                     f"metadata says {st.n_updated}", str(self.path))
            if self.has_values:
                self._validate_values(name, st)
            total += st.numel
            updated += st.n_updated
        if updated != self.metadata.n_updated:
            raise MaskStoreError(f"{self.path}: tensors hold {updated} updated entries, the "
                                 f"metadata says {self.metadata.n_updated}", str(self.path))
        if total != self.metadata.n_params:
            raise MaskStoreError(f"{self.path}: tensors hold {total} parameters, the metadata "
                                 f"says {self.metadata.n_params}", str(self.path))

    def _validate_values(self, name: str, st: TensorStats) -> None:
        from maskhub.storage.values import storage_dtype

        arr = self._values_array(name)
        dtype = str(arr.attrs.get(DTYPE_ATTR, ""))
        try:
            dt = storage_dtype(dtype)
        except ValueError:
            dt = None
        if dtype != st.target_dtype or dt is None or arr.dtype != dt \
                or arr.shape != (st.n_updated,):
            raise MaskStoreError(
                f"{self.path}: values of {name!r} are {arr.dtype}{list(arr.shape)} of dtype "
                f"{dtype!r}; the mask has {st.n_updated} set bits of target dtype "
                f"{st.target_dtype!r}", str(self.path))


# -- issue 26: metadata edits (maskhub edit) -------------------------------------------------

#: What a reader without maskhub needs to know, in the group attributes of every store
#: written since (``description``; readers ignore it).
STORE_DESCRIPTION = {
    "bit": "1: that parameter entry was updated (|target - base| > tol, tol in the "
           "attributes), 0: it was not",
    "arrays": "one uint8 array per parameter tensor, named as the parameter: the flattened "
              "(C-order) mask packed 8 entries per byte; rebuild with np.unpackbits(a[:], "
              "count=prod(a.attrs['shape']), bitorder=a.attrs['bitorder'])"
              ".reshape(a.attrs['shape']) (a bool array, if any, is the mask itself). The "
              "shape attribute (also parameter_shape) is the parameter's shape, not the "
              "array's own (a.shape: the packed bytes); an array with attribute encoding: "
              "gaps-u8 holds a byte-gap code instead (see the documentation)",
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
