"""The one validator of untrusted metadata: what a file, a header or a Hub repo *declares*
is checked here before any reader believes it.

Every reader of bytes maskhub did not write goes through this module: the safetensors
header reader (:mod:`maskhub.checkpoints.header`, hence ``diff``, ``verify``, trajectories,
training and ``import`` of a safetensors file), the Zarr mask store
(:class:`maskhub.storage.store.MaskStore`: registered, pulled and imported stores), the
import of a hand-written Zarr store (:mod:`maskhub.ingest.sources`) and the manifest of a
pulled Hub repo (:func:`maskhub.hub.layout.parse_manifest`). ``maskhub fsck`` applies
:func:`count_problem` to what is already registered.

What it enforces:

* **files**: regular files only (a FIFO, device, socket or directory is refused before it is
  opened, and files are opened ``O_NONBLOCK`` so that a swap cannot block); inside a store,
  a symlink must resolve to a file inside the same store;
* **JSON**: a size bound, and a nesting bound checked on the raw bytes *before* ``json.loads``
  recurses (:func:`load_json`);
* **safetensors headers** (:func:`parse_safetensors_header`): the 8-byte length against the
  file size and :data:`MAX_HEADER`, at most :data:`MAX_TENSORS` tensors, known dtypes,
  shapes that are lists of at most :data:`MAX_NDIM` non-negative ``int`` (no float, bool,
  ``1e400``) with at most :data:`MAX_NUMEL` entries, ``data_offsets`` ``[begin, end]`` of
  non-negative ints inside the data section with ``end - begin = numel × itemsize``, no two
  tensors overlapping, and ``__metadata__`` a flat ``str -> str`` object;
* **Zarr array metadata** (:func:`check_array_document`): the ``zarr.json`` of a mask array
  as maskhub writes it (packed ``uint8``) or as a plain Zarr ``bool``/``uint8`` array:
  shape, data type, regular chunk grid with bounded chunks, known codecs, fill value 0, and
  the attributes ``shape``/``numel``/``n_updated`` consistent with it;
* **counts** (:func:`count_problem`): non-negative ints, ``n_updated <= numel``.

Memory follows the bytes present: nothing here allocates from a declared shape, and the
readers decode chunk files one at a time into zero pages (a chunk that is not there reads
as zeros without touching memory).
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from maskhub.errors import CheckpointError, MaskhubError, MaskStoreError
from maskhub.schemas.dtypes import SAFETENSORS_DTYPES, itemsize

#: Largest safetensors header maskhub reads (safetensors itself caps headers at 100 MB).
MAX_HEADER = 100 << 20
#: Most tensors one safetensors file may declare (the largest MoE checkpoints hold ~10^5
#: tensors across all their shards).
MAX_TENSORS = 100_000
#: Most dimensions of a tensor.
MAX_NDIM = 16
#: Most entries of one tensor: 2^36 (the largest real tensors, 256k-vocabulary embeddings,
#: hold ~2^32).
MAX_NUMEL = 1 << 36
#: Deepest JSON nesting read (a safetensors header needs 3, a mask store's metadata ~5).
MAX_JSON_DEPTH = 32
#: Largest ``zarr.json`` read (a group listing 10^5 tensor names is a few MB).
MAX_ZARR_JSON = 64 << 20
#: Largest decoded chunk of an array maskhub reads.
MAX_CHUNK_BYTES = 256 << 20
#: Codecs of a Zarr v3 array that maskhub (through zarr-python) decodes.
KNOWN_CODECS = frozenset({"bytes", "zstd", "gzip", "blosc", "crc32c"})
#: Data types a mask array may have (``bool``, or ``uint8``: packed bits or 0/1 values).
MASK_DATA_TYPES = ("bool", "uint8")
#: Data types of a patch's values arrays (``values/<tensor>``: the target's dtype, bf16 and
#: float8 as their raw bits).
VALUE_DATA_TYPES = ("float16", "float32", "float64", "uint8", "uint16", "int8", "int16",
                    "int32", "int64", "bool")
#: The subgroup of a patch's values (:mod:`maskhub.storage.values`).
VALUES_PREFIX = "values/"

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"))
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters (with the full length) so that a
    hostile name never floods a one-line message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters"
    return f"{text[:limit]}... ({size})"


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike[str], error: type[MaskhubError] = CheckpointError,
                 what: str | None = None) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading if it is a regular file (following symlinks); return the
    file and its size. A FIFO, device, socket or directory raises ``error`` (one line) without
    being opened for a blocking read."""
    label = what or str(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise error(f"{label}: cannot read it: {exc.strerror or exc}", str(path)) from exc
    kind = _kind(st.st_mode)
    if kind is not None:
        raise error(f"{label} is {kind}, not a regular file", str(path))
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise error(f"{label}: cannot read it: {exc.strerror or exc}", str(path)) from exc
    st = os.fstat(fd)  # the path may have been swapped between the two calls
    kind = _kind(st.st_mode)
    if kind is not None:
        os.close(fd)
        raise error(f"{label} is {kind}, not a regular file", str(path))
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), st.st_size


def _plainly_inside(root: Path, path: Path) -> bool:
    """True when ``path`` is ``root`` followed by names (no ``.``, ``..`` or empty part) none
    of which is a symlink: then it lies inside ``root`` whatever ``root`` resolves to, which
    a few ``lstat`` calls tell without resolving both paths. False when unsure."""
    r, p = os.fspath(root).rstrip(os.sep), os.fspath(path)
    if p == r or not r:
        return p == r
    if not p.startswith(r + os.sep):
        return False
    cur = r
    for part in p[len(r) + 1:].split(os.sep):
        if part in ("", ".", ".."):
            return False
        cur = cur + os.sep + part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return True  # the rest does not exist: it resolves to itself, under root
        except OSError:
            return False
        if stat.S_ISLNK(st.st_mode):
            return False
    return True


def check_inside(root: Path, path: Path, what: str, error: type[MaskhubError] = MaskStoreError
                 ) -> None:
    """Raise ``error`` unless ``path`` (after resolving symlinks) lies inside ``root``."""
    if _plainly_inside(root, path):  # the common case: no symlink below root
        return
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise error(f"{what} is a symlink that leaves the store (to {short(real)}); "
                    "refusing it", str(root))


def check_tree(root: Path, where: str, max_entries: int = 10_000_000) -> None:
    """Check every entry under the store directory ``root`` before any library opens it:
    regular files and directories only, and symlinks that stay inside ``root`` and point at
    one of those. Raises :class:`MaskStoreError` naming the first offending entry."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            count += 1
            if count > max_entries:
                raise MaskStoreError(f"{where} holds more than {max_entries} files", where)
            p = Path(dirpath) / name
            rel = f"{where}/{p.relative_to(root).as_posix()}"
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                check_inside(root, p, rel)
                try:
                    st = os.stat(p)
                except OSError as exc:
                    raise MaskStoreError(f"{rel} is a broken symlink", where) from exc
                if stat.S_ISDIR(st.st_mode):
                    raise MaskStoreError(f"{rel} is a symlink to a directory; a store holds "
                                         "plain files and directories", where)
            kind = None if stat.S_ISDIR(st.st_mode) else _kind(st.st_mode)
            if kind is not None:
                raise MaskStoreError(f"{rel} is {kind}, not a regular file", where)


#: JSON texts up to this many bytes have their nesting measured in plain Python (no numpy:
#: a push or a pull reads only small ``zarr.json`` documents and never imports it); longer
#: ones (a large safetensors header) with numpy, vectorized.
NESTING_PLAIN_BYTES = 256 << 10
#: The bytes of the four brackets, and every other byte (deleted before the bracket walk).
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(_BRACKETS)))


def json_nesting(data: bytes) -> tuple[int, int]:
    """``(deepest nesting, objects opened at depth 2)`` of the JSON text ``data``, computed
    without recursion and without parsing (vectorized: a 100 MB header takes well under a
    second). Brackets inside strings are skipped. The second figure bounds the entries of a
    top-level object whose values are objects (a safetensors header's tensors)."""
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")  # escaped \\ and \" hold no quote
    if len(text) <= NESTING_PLAIN_BYTES:
        return _nesting_plain(text)
    return _nesting_numpy(text)


def _nesting_plain(text: bytes) -> tuple[int, int]:
    """:func:`json_nesting` of ``text`` (escapes already removed) in plain Python: the pieces
    between quotes at even positions lie outside strings; their brackets, in order, are
    walked once (C-speed ``translate`` drops every other byte first)."""
    brackets = b"".join(part.translate(None, _NOT_BRACKETS) for part in text.split(b'"')[::2])
    if not brackets:
        return 0, 0
    depth = at_two = 0
    deepest = -1  # as the running sum's maximum: -1 when the text only closes brackets
    for b in brackets:
        if b == 0x5B or b == 0x7B:  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
            if depth == 2 and b == 0x7B:
                at_two += 1
        else:
            depth -= 1
    return deepest, at_two


def _nesting_numpy(text: bytes) -> tuple[int, int]:
    """:func:`json_nesting` of ``text`` (escapes already removed), vectorized with numpy."""
    import numpy as np

    a = np.frombuffer(text, dtype=np.uint8)
    if not a.size:
        return 0, 0
    parity = np.cumsum(a == 0x22, dtype=np.uint8) & 1  # odd: inside a string
    at = np.flatnonzero(((a == 0x5B) | (a == 0x5D) | (a == 0x7B) | (a == 0x7D)) & (parity == 0))
    if not at.size:
        return 0, 0
    b = a[at]
    depth = np.cumsum(np.where((b == 0x5B) | (b == 0x7B), 1, -1).astype(np.int32),
                      dtype=np.int64)
    return int(depth.max()), int(np.count_nonzero((b == 0x7B) & (depth == 2)))


def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in the JSON text ``data`` (strings skipped),
    computed without recursion."""
    return json_nesting(data)[0]


def load_json(data: bytes, what: str, error: type[MaskhubError] = MaskStoreError,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse untrusted JSON: nesting checked on the raw bytes first (no recursion limit can be
    hit), then ``json.loads``; one-line ``error`` naming ``what`` otherwise."""
    depth = json_depth(data)
    if depth > max_depth:
        raise error(f"{what} nests JSON {depth} levels deep (at most {max_depth} are read)",
                    what)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{what} is not valid JSON: {first}", what) from exc


def read_json_file(path: Path, what: str, error: type[MaskhubError] = MaskStoreError,
                   max_bytes: int = MAX_ZARR_JSON) -> Any:
    """Read a JSON file that came from outside: regular file, at most ``max_bytes``, bounded
    nesting."""
    f, size = open_regular(path, error, what)
    with f:
        if size > max_bytes:
            raise error(f"{what} is {size} bytes; at most {max_bytes} are read", what)
        data = f.read(max_bytes + 1)
    return load_json(data, what, error)


# -- shapes and counts -----------------------------------------------------------------------


def is_count(value: Any) -> bool:
    """A non-negative ``int`` (``bool`` is not one)."""
    return type(value) is int and value >= 0


def shape_problem(shape: Any, max_numel: int = MAX_NUMEL) -> str | None:
    """Why ``shape`` is not a valid tensor shape (a list of at most :data:`MAX_NDIM`
    non-negative ints with at most ``max_numel`` entries), or None."""
    if not isinstance(shape, list | tuple):
        return f"its shape {short(shape)} is not a list"
    if len(shape) > MAX_NDIM:
        return f"its shape has {len(shape)} dimensions (at most {MAX_NDIM})"
    for s in shape:
        if not is_count(s):
            return f"its shape {short(list(shape))} holds {short(s)}, not a non-negative integer"
    n = math.prod(shape)
    if n > max_numel:
        return f"its shape {short(list(shape))} has {n} entries (at most {max_numel})"
    return None


def count_problem(numel: Any, n_updated: Any, shape: Any = None) -> str | None:
    """Why the counts of a tensor (or of a whole mask, without ``shape``) are inconsistent:
    not non-negative ints, ``n_updated > numel``, or ``numel != prod(shape)``; else None."""
    if not is_count(numel):
        return f"numel is {short(numel)}, not a non-negative integer"
    if not is_count(n_updated):
        return f"n_updated is {short(n_updated)}, not a non-negative integer"
    if n_updated > numel:
        return f"n_updated {n_updated} exceeds its {numel} entries"
    if shape is not None:
        bad = shape_problem(list(shape))
        if bad:
            return bad
        if math.prod(shape) != numel:
            return f"numel {numel} is not the product of its shape {list(shape)}"
    return None


# -- safetensors ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderEntry:
    """One validated tensor entry of a safetensors header (offsets relative to the data)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(path: Path) -> tuple[list[HeaderEntry], int]:
    """Validate and parse the header of the safetensors file ``path``; return its entries (in
    data-offset order) and where its data section starts. Raises :class:`CheckpointError`
    with one line naming the file and the problem."""
    entries, data_start, _meta = read_safetensors(path)
    return entries, data_start


def read_safetensors(path: Path, dtypes: Mapping[str, str] = SAFETENSORS_DTYPES
                     ) -> tuple[list[HeaderEntry], int, dict[str, str]]:
    """:func:`read_safetensors_header`, also returning the header's ``__metadata__`` (a flat
    object of strings, ``{}`` when absent); ``dtypes``: the dtype codes accepted (header code
    -> maskhub name; sparse patches add unsigned index types)."""
    f, size = open_regular(path)
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a readable safetensors file: file is shorter "
                                  "than a safetensors header", str(path))
        n = int.from_bytes(head, "little")
        if n <= 0 or n > min(size - 8, MAX_HEADER):
            raise CheckpointError(f"{path} is not a readable safetensors file: header length "
                                  f"{n} is out of range for a {size}-byte file (truncated or "
                                  "not safetensors)", str(path))
        raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{path} is truncated: its header needs {n} bytes", str(path))
    entries, meta = _parse_header(raw, size - 8 - n, str(path), dtypes)
    return entries, 8 + n, meta


def parse_safetensors_header(raw: bytes, data_size: int, where: str) -> list[HeaderEntry]:
    """Validate the JSON header ``raw`` of a safetensors file whose data section holds
    ``data_size`` bytes (see the module docstring); entries in data-offset order."""
    return _parse_header(raw, data_size, where, SAFETENSORS_DTYPES)[0]


def _parse_header(raw: bytes, data_size: int, where: str, dtypes: Mapping[str, str]
                  ) -> tuple[list[HeaderEntry], dict[str, str]]:
    def fail(msg: str) -> CheckpointError:
        return CheckpointError(f"{where}: {msg}", where)

    depth, objects = json_nesting(raw)
    if depth > 3:
        raise fail(f"its header nests JSON {depth} levels deep (a safetensors header has 3)")
    if objects > MAX_TENSORS + 1:  # checked before parsing: tensors, plus __metadata__
        raise fail(f"its header declares about {objects} tensors (at most {MAX_TENSORS} per "
                   "file)")
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{where} is not a readable safetensors file: {first}",
                              where) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{where} is not a readable safetensors file: the header is not "
                              "a JSON object", where)
    n_tensors = len(header) - ("__metadata__" in header)
    if n_tensors > MAX_TENSORS:
        raise fail(f"its header declares {n_tensors} tensors (at most {MAX_TENSORS} per file)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise fail("its __metadata__ is not a flat object of strings")
    entries: list[HeaderEntry] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise fail(f"bad header entry for {short(name)}: not an object")
        dtype_code = entry.get("dtype")
        dtype = dtypes.get(dtype_code) if isinstance(dtype_code, str) else None
        if dtype is None:
            raise fail(f"tensor {short(name)} has unknown dtype {short(dtype_code)}")
        shape = entry.get("shape")
        bad = shape_problem(shape)
        if bad:
            raise fail(f"tensor {short(name)}: {bad}")
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(is_count(x) for x in offsets) and offsets[0] <= offsets[1]):
            raise fail(f"tensor {short(name)} has data_offsets {short(offsets)}; they must be "
                       "[begin, end], non-negative integers with begin <= end")
        begin, end = offsets
        if end > data_size:
            raise CheckpointError(f"{where} is truncated: tensor {short(name)} ends at byte "
                                  f"{end} of a {data_size}-byte data section", where)
        nbytes = math.prod(shape) * itemsize(dtype)
        if end - begin != nbytes:
            raise fail(f"tensor {short(name)} has {end - begin} bytes, its shape and dtype "
                       f"need {nbytes}")
        entries.append(HeaderEntry(name, dtype, tuple(shape), begin, end))
    entries.sort(key=lambda e: (e.begin, e.end))
    last: HeaderEntry | None = None
    for e in entries:
        if e.end == e.begin:
            continue
        if last is not None and e.begin < last.end:
            raise fail(f"tensors {short(last.name)} and {short(e.name)} overlap in the data "
                       "section")
        last = e
    return entries, dict(meta or {})


# -- Zarr --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArrayFacts:
    """What a validated ``zarr.json`` of a mask array declares."""

    shape: tuple[int, ...]
    data_type: str
    chunk_shape: tuple[int, ...]
    #: ``"/"`` or ``"."``, and whether keys start with ``c`` (the ``default`` encoding).
    separator: str
    prefixed: bool
    attributes: dict[str, Any]
    codecs: tuple[str, ...] = ()
    #: The ``bytes`` codec's ``endian`` (``None`` when absent or unset).
    bytes_endian: str | None = None

    @property
    def encoded(self) -> bool:
        """Whether the array holds a code of the set bits (``encoding``, e.g. the byte-gap
        layout ``gaps-u8``) instead of the bits themselves."""
        return self.attributes.get("encoding") is not None

    @property
    def packed(self) -> bool:
        """Whether this is a packed-bit array (``uint8`` with a ``shape`` attribute)."""
        return self.data_type == "uint8" and "shape" in self.attributes and not self.encoded

    @property
    def numel(self) -> int:
        """Mask entries the array holds (the parameter's, for a packed or coded array)."""
        if self.packed or (self.encoded and "shape" in self.attributes):
            return math.prod(self.attributes["shape"])
        return math.prod(self.shape)

    def chunk_key(self, index: Iterable[int]) -> str:
        """The store key of a chunk, relative to the array."""
        key = self.separator.join(str(i) for i in index)
        return f"c{self.separator}{key}" if self.prefixed else key

    def grid(self) -> tuple[int, ...]:
        """Chunks along each dimension."""
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunk_shape, strict=True))


def check_array_document(doc: Any, name: str, where: str) -> ArrayFacts:
    """Validate the ``zarr.json`` document ``doc`` of the mask array ``name`` (see the module
    docstring). Raises :class:`MaskStoreError` naming ``where`` and the array."""
    def fail(msg: str) -> MaskStoreError:
        return MaskStoreError(f"{where}: array {short(name)} {msg}", where)

    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 \
            or doc.get("node_type") != "array":
        raise fail("is not a Zarr v3 array")
    shape = doc.get("shape")
    bad = shape_problem(shape)
    if bad:
        raise fail(f"has a bad zarr.json: {bad}")
    dtype = doc.get("data_type")
    values = name.startswith(VALUES_PREFIX)
    if values and dtype not in VALUE_DATA_TYPES:
        raise fail(f"has data_type {short(dtype)}; a values array is one of "
                   f"{', '.join(VALUE_DATA_TYPES)}")
    if not values and dtype not in MASK_DATA_TYPES:
        raise fail(f"has data_type {short(dtype)}; a mask array is bool or uint8")
    grid = doc.get("chunk_grid")
    conf = grid.get("configuration") if isinstance(grid, dict) else None
    chunks = conf.get("chunk_shape") if isinstance(conf, dict) else None
    if not (isinstance(grid, dict) and grid.get("name") == "regular"
            and isinstance(chunks, list) and len(chunks) == len(shape)
            and all(is_count(c) and c > 0 for c in chunks)):
        raise fail(f"has chunk grid {short(grid)}; a regular grid of positive chunk sizes, one "
                   "per dimension, is read")
    if math.prod(chunks) > MAX_CHUNK_BYTES:
        raise fail(f"has chunks of {math.prod(chunks)} entries (at most {MAX_CHUNK_BYTES})")
    enc = doc.get("chunk_key_encoding")
    enc_conf = enc.get("configuration") if isinstance(enc, dict) else None
    enc_name = enc.get("name") if isinstance(enc, dict) else None
    sep = (enc_conf or {}).get("separator", "/" if enc_name == "default" else ".")
    if enc_name not in ("default", "v2") or sep not in ("/", "."):
        raise fail(f"has chunk_key_encoding {short(enc)}")
    codecs = doc.get("codecs")
    if not (isinstance(codecs, list) and codecs and all(
            isinstance(c, dict) and c.get("name") in KNOWN_CODECS for c in codecs)):
        names = [c.get("name") if isinstance(c, dict) else c for c in codecs] \
            if isinstance(codecs, list) else codecs
        raise fail(f"has codecs {short(names)}; maskhub reads {', '.join(sorted(KNOWN_CODECS))}")
    if doc.get("fill_value") not in (0, False, 0.0):
        raise fail(f"has fill_value {short(doc.get('fill_value'))}; a mask array's is 0/false")
    if doc.get("storage_transformers") not in (None, []):
        raise fail("has storage transformers, which maskhub does not read")
    attrs = doc.get("attributes", {})
    if not isinstance(attrs, dict):
        raise fail("has attributes that are not an object")
    endian = next(((c.get("configuration") or {}).get("endian") for c in codecs
                   if c["name"] == "bytes"), None)
    facts = ArrayFacts(tuple(shape), dtype, tuple(chunks), sep, enc_name == "default", attrs,
                       tuple(c["name"] for c in codecs),
                       endian if isinstance(endian, str) else None)
    if "shape" in attrs:
        bad = shape_problem(attrs["shape"])
        if bad:
            raise fail(f"has a bad shape attribute: {bad}")
        if attrs.get("encoding") is not None:
            if dtype != "uint8" or len(shape) != 1:
                raise fail(f"is coded ({short(attrs['encoding'])}) but not a 1-D uint8 array")
        elif dtype == "uint8":
            numel = math.prod(attrs["shape"])
            if list(shape) != [(numel + 7) // 8]:
                raise fail(f"has shape {tuple(shape)}, its metadata says {numel} entries")
        elif list(attrs["shape"]) != list(shape):
            raise fail(f"has shape {list(shape)}, its shape attribute says {attrs['shape']}")
    if "parameter_shape" in attrs and "shape" in attrs \
            and attrs["parameter_shape"] != attrs["shape"]:  # issue 26: the same shape twice
        raise fail(f"has parameter_shape {short(attrs['parameter_shape'])} but shape "
                   f"{short(attrs['shape'])}")
    for key in ("numel", "n_updated"):
        if key in attrs and not is_count(attrs[key]):
            raise fail(f"has {key} {short(attrs[key])}, not a non-negative integer")
    if "numel" in attrs and attrs["numel"] != facts.numel:
        raise fail(f"has {facts.numel} entries, its numel attribute says {attrs['numel']}")
    if "n_updated" in attrs and attrs["n_updated"] > facts.numel:
        raise fail(f"has n_updated {attrs['n_updated']} but only {facts.numel} entries")
    return facts


def read_array_metadata(directory: Path, name: str, where: str, root: Path | None = None
                        ) -> ArrayFacts:
    """Read and validate ``directory/zarr.json`` of the array ``name`` of a local store
    (inside ``root`` when given)."""
    path = directory / "zarr.json"
    if root is not None:
        check_inside(root, path, f"{where}/{name}/zarr.json")
    return check_array_document(read_json_file(path, f"{where}: array {short(name)} zarr.json"),
                                name, where)


def read_chunk(path: Path, root: Path, max_bytes: int, what: str) -> bytes | None:
    """The bytes of one chunk file of a local store, or None when it is absent (a chunk of
    fill values): refused when it leaves the store, is not a regular file, or holds more
    than ``max_bytes`` (a compressed chunk never does)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MaskStoreError(f"{what}: cannot read it: {exc.strerror or exc}", what) from exc
    check_inside(root, path, what)
    f, size = open_regular(path, MaskStoreError, what)
    with f:
        if size > max_bytes:
            raise MaskStoreError(f"{what} is {size} bytes; a chunk of this array is at most "
                                 f"{max_bytes}", what)
        return f.read(max_bytes + 1)


def chunk_file_limit(chunk_bytes: int) -> int:
    """Most bytes a compressed chunk of ``chunk_bytes`` decoded bytes may take on disk."""
    return chunk_bytes + chunk_bytes // 64 + (1 << 16)


def check_mask_counts(attrs: dict[str, Any], where: str) -> None:
    """Check a mask's totals (``n_params``, ``n_updated``) when present: non-negative ints,
    ``n_updated <= n_params``."""
    if "n_params" in attrs or "n_updated" in attrs:
        bad = count_problem(attrs.get("n_params", 0), attrs.get("n_updated", 0))
        if bad:
            bad = bad.replace("numel", "n_params").replace("entries", "parameters")
            raise MaskStoreError(f"{where}: bad mask metadata: {bad}", where)


def present_chunks(directory: Path, facts: ArrayFacts) -> list[tuple[int, ...]]:
    """Indices of the chunk files present in the local array ``directory``, sorted: found by
    listing the directory (cost follows the files present, never the declared grid). Files
    that name no chunk of the grid are ignored, as zarr ignores them."""
    grid = facts.grid()
    found: list[tuple[int, ...]] = []
    keys: list[str] = []
    if facts.separator == "/":
        base = directory / "c" if facts.prefixed else directory
        if not grid:
            return [()] if facts.prefixed and base.is_file() else []
        if base.is_dir():
            for dirpath, _dirs, files in os.walk(base):
                rel = Path(dirpath).relative_to(base).parts
                keys += ["/".join((*rel, f)) for f in files]
    else:
        with os.scandir(directory) as it:
            names = [e.name for e in it]
        prefix = "c." if facts.prefixed else ""
        keys = [n[len(prefix):] for n in names if n.startswith(prefix) and n != "zarr.json"]
    for key in keys:
        parts = key.split(facts.separator)
        if len(parts) != len(grid) or not all(p.isdigit() and p.isascii() for p in parts):
            continue
        index = tuple(int(p) for p in parts)
        if all(i < g for i, g in zip(index, grid, strict=True)):
            found.append(index)
    return sorted(found)


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def zstd_content_size(data: bytes) -> int | None:
    """The content size a zstd frame declares in its header (None: the frame does not
    declare one, or ``data`` is not a zstd frame)."""
    if len(data) < 6 or data[:4] != _ZSTD_MAGIC:
        return None
    fhd = data[4]
    fcs_flag, single = fhd >> 6, (fhd >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(data) < pos + size:
        return None
    value = int.from_bytes(data[pos:pos + size], "little")
    return value + 256 if size == 2 else value


def check_chunk_files(directory: Path, root: Path, facts: ArrayFacts, what: str) -> None:
    """Before a library decodes them: every chunk file present of a local array is a regular
    file inside ``root`` of bounded size, and a zstd-coded chunk declares a decoded size no
    larger than a chunk (a decompression bomb is refused, never inflated)."""
    itemsize_ = 1  # bool and uint8
    chunk_bytes = math.prod(facts.chunk_shape) * itemsize_
    limit = chunk_file_limit(chunk_bytes)
    zstd = "zstd" in facts.codecs
    for index in present_chunks(directory, facts):
        key = facts.chunk_key(index)
        data = read_chunk(directory / key, root, limit, f"{what} chunk {key}")
        if not zstd or data is None:
            continue
        declared = zstd_content_size(data)
        if declared is None or declared > chunk_bytes:
            size = "no size" if declared is None else f"{declared} bytes"
            raise MaskStoreError(f"{what} chunk {key} is a zstd frame that declares {size}; a "
                                 f"chunk of this array decodes to {chunk_bytes}", what)
