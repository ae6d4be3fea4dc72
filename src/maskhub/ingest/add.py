"""``maskhub import`` / :meth:`maskhub.Registry.add`: register a mask made elsewhere.

The source (see :mod:`maskhub.ingest.sources`) is read tensor by tensor into a new store in
maskhub's own layout, written aside and registered through the commit protocol
(:meth:`~maskhub.core.home.Home.register_store`), then checked like a pulled store: every
array against its recorded shape and count, the totals against the metadata. Missing
metadata is filled (a new id, the creation time, the counts); what the source's metadata
says and the caller's arguments are checked against the bits. Provenance: ``operation`` is
``import``, ``extra.import`` records the source's kind and file name.

An imported mask has no magnitude strata (``tensor_strata``): they need θ0's values, which
an import does not see. Its overlaps then report the stratified baseline, without the
magnitude one.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskhub.core.provenance import timestamp
from maskhub.errors import MaskStoreError, UsageError
from maskhub.ingest.sources import MaskSource, open_source
from maskhub.schemas.metadata import MaskMetadata, TensorStats
from maskhub.schemas.names import mask_name_from, parse_tensor_name
from maskhub.schemas.progress import ProgressFn
from maskhub.storage.engine import duckdb
from maskhub.storage.files import remove_tree
from maskhub.storage.store import MaskStore, MaskWriter

if TYPE_CHECKING:
    from maskhub.core.home import Home
    from maskhub.core.record import MaskRecord

#: ``masks.operation`` of an imported mask.
OPERATION = "import"
_MASK_ID = re.compile(r"[0-9a-f]{32}")
#: Metadata a source may carry, with the Python types each must have.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str, "base_model": str, "base_revision": str, "target_model": str,
    "target_revision": str, "algorithm": str, "seed": int, "dataset": str,
    "tol": (int, float), "notes": str, "created_at": str, "dtype": str}


def add(registry: Home, source: str | os.PathLike[str] | Mapping[str, Any], *,
        name: str | None = None, base_model: str | None = None,
        target_model: str | None = None, base_revision: str | None = None,
        target_revision: str | None = None, tol: float | None = None,
        algorithm: str | None = None, seed: int | None = None, dataset: str | None = None,
        tags: Sequence[str] = (), notes: str | None = None,
        progress: ProgressFn | None = None) -> MaskRecord:
    """Register the mask ``source`` (a Zarr store directory, a ``.safetensors`` file of
    ``bool``/``uint8`` masks, or a mapping of arrays/tensors) and return it.

    The arguments override what the source's metadata says (a Zarr store's group
    attributes). ``base_model`` is required (an argument or the store's attribute): overlaps
    and combines pair masks by it. ``name`` defaults to the store's, else the file's name;
    ``target_model`` to the name; ``tol`` to the store's, else 1e-5. Nothing is registered if
    any check fails.
    """
    src = open_source(source)
    meta_in = _source_metadata(src)
    given = {"name": name, "base_model": base_model, "target_model": target_model,
             "base_revision": base_revision, "target_revision": target_revision, "tol": tol,
             "algorithm": algorithm, "seed": seed, "dataset": dataset, "notes": notes}
    fields = {**meta_in, **{k: v for k, v in given.items() if v is not None}}
    if not fields.get("base_model"):
        raise UsageError(f"importing {src.label} needs --base-model (the Hub id or name of "
                         "the checkpoint the mask was taken against)")
    if name is not None:
        registry.check_new_name(name)
    elif "name" in fields:
        registry.check_new_name(fields["name"])
    else:
        stem = src.label.removesuffix(".safetensors").removesuffix(".zarr")
        fields["name"] = registry.free_name(mask_name_from(stem, "imported"))
    mask_id = _mask_id(registry, src)
    tmp = registry.new_store_location(mask_id)
    try:
        writer = MaskWriter(tmp)
        stats = _write(src, writer, progress)
        meta = _metadata(src, mask_id, fields, tags, stats)
        writer.finish(meta)
        _validate(src, tmp)
    except BaseException:
        remove_tree(tmp)
        raise
    try:
        return registry.register_store(tmp, meta, stats)
    except duckdb.Error as exc:  # metadata the index cannot hold (a bad date...)
        raise MaskStoreError(f"{src.label}: the mask metadata cannot be indexed: "
                             f"{str(exc).splitlines()[0]}", src.label) from exc


def _source_metadata(src: MaskSource) -> dict[str, Any]:
    """The metadata fields a source carries, type-checked."""
    out: dict[str, Any] = {}
    for key, kind in _FIELDS.items():
        value = src.attrs.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MaskStoreError(f"{src.label}: attribute {key} is {value!r}, not a "
                                 f"{getattr(kind, '__name__', 'number')}", src.label)
        out[key] = value
    return out


def _mask_id(registry: Home, src: MaskSource) -> str:
    """The source's own id when it has a valid one that no mask uses, else a new one."""
    own = src.attrs.get("id")
    if own is None:
        return uuid.uuid4().hex
    if not isinstance(own, str) or not _MASK_ID.fullmatch(own):
        raise MaskStoreError(f"{src.label}: attribute id is {own!r}, not 32 hex digits "
                             "(leave it out to get a new one)", src.label)
    with registry.index.connect(write=False) as con:
        row = con.execute("SELECT name FROM masks WHERE id = ?", [own]).fetchone()
    if row is not None:
        raise MaskStoreError(f"{src.label}: its id {own} is already registered as mask "
                             f"{row[0]!r}", src.label)
    return own


def _write(src: MaskSource, writer: MaskWriter, progress: ProgressFn | None
           ) -> list[TensorStats]:
    """Read and store every tensor; return their stats."""
    stats: list[TensorStats] = []
    for i, name in enumerate(src.names):
        t = src.read(name)
        layer, module = parse_tensor_name(name)
        st = TensorStats(name, t.shape, t.numel, t.n_updated, layer, module)
        writer.add(st, t.packed)
        stats.append(st)
        if progress is not None:  # sizes are unknown before reading: count tensors
            progress(i + 1, len(src.names), i + 1, len(src.names), name)
    return stats


def _metadata(src: MaskSource, mask_id: str, fields: dict[str, Any], tags: Sequence[str],
              stats: Sequence[TensorStats]) -> MaskMetadata:
    """The imported mask's metadata: the fields, the counts from the bits (checked against
    what the source says), provenance."""
    n_params = sum(s.numel for s in stats)
    n_updated = sum(s.n_updated for s in stats)
    for key, value in (("n_params", n_params), ("n_updated", n_updated)):
        claimed = src.attrs.get(key)
        if claimed is not None and claimed != value:
            raise MaskStoreError(f"{src.label}: its tensors hold {key} = {value}, its "
                                 f"attributes say {claimed}", src.label)
    own_tags = src.attrs.get("tags") or []
    if not isinstance(own_tags, list) or not all(isinstance(t, str) for t in own_tags):
        raise MaskStoreError(f"{src.label}: attribute tags is not a list of strings",
                             src.label)
    return MaskMetadata(
        id=mask_id, name=fields["name"], base_model=fields["base_model"],
        target_model=fields.get("target_model") or fields["name"],
        n_params=n_params, n_updated=n_updated, tol=float(fields.get("tol", 1e-5)),
        base_revision=fields.get("base_revision"),
        target_revision=fields.get("target_revision"), algorithm=fields.get("algorithm"),
        seed=fields.get("seed"), dataset=fields.get("dataset"), dtype=fields.get("dtype", ""),
        created_at=fields.get("created_at") or timestamp(),
        tags=tuple(dict.fromkeys([*own_tags, *tags])), operation=OPERATION,
        notes=fields.get("notes"),
        extra={"import": {"format": src.kind, "source": src.label}})


def _validate(src: MaskSource, tmp: Path | str) -> None:
    """Check the written store like a pulled one: every array against its shape and count,
    the totals against the metadata."""
    try:
        MaskStore(tmp).validate()
    except MaskStoreError as exc:
        raise MaskStoreError(str(exc).replace(str(tmp), src.label), src.label) from exc
