"""The layout of a mask repo on the Hub (``mask.zarr/``, ``maskhub.json``, ``tensors.parquet``,
``README.md``), its manifest of checksums, and the checks shared by push and pull.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskhub.checkpoints.validate import check_mask_counts, load_json, short
from maskhub.errors import MaskStoreError, UsageError
from maskhub.schemas.metadata import FORMAT_VERSION, MaskMetadata
from maskhub.schemas.names import valid_mask_name

if TYPE_CHECKING:
    from huggingface_hub import HfApi



HUB_SCHEMA_VERSION = 1
#: ``kind`` of ``maskhub.json``, telling a maskhub repo from any other repo.
HUB_KIND = "maskhub.hub-repo"
METADATA_FILE = "maskhub.json"
STORE_DIR = "mask.zarr"
TENSORS_FILE = "tensors.parquet"
CARD_FILE = "README.md"
REPO_TYPES = ("model", "dataset")
#: Card tags every mask repo carries (the algorithm, when known, is appended).
BASE_TAGS = ("maskhub", "update-mask")

SHA1 = re.compile(r"[0-9a-f]{40}")
_MASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
COPY_BUF = 8 << 20
# Types of the metadata fields a pull relies on (checked before anything is indexed).
_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "base_model": str, "target_model": str, "created_at": str,
    "n_params": int, "n_updated": int, "tol": (int, float)}


def hub_ref(repo_id: str, repo_type: str = "model") -> str:
    """The value of ``masks.hub_repo`` for a repo: its id, prefixed ``datasets/`` for a
    dataset repo (as in Hub URLs)."""
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


def is_hub_repo_id(name: str | None) -> bool:
    """Whether ``name`` looks like a Hub repo id ``org/name`` (not a local path)."""
    return name is not None and _HUB_ID.fullmatch(name) is not None and ".." not in name


def is_offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def safe_relpath(path: Any, what: str = "file", where: str = "") -> str:
    """Return ``path`` if it is a relative POSIX path that stays inside its directory.

    Refuses (``MaskStoreError``) absolute paths, ``..`` or ``.`` components, empty
    components, backslashes and control characters: a Hub repo must not make maskhub read or
    write outside the target directory. ``where`` names the repo in the message.
    """
    ok = isinstance(path, str) and 0 < len(path) <= 1024 and not path.startswith("/")
    if ok:
        parts = path.split("/")
        ok = (all(p not in ("", ".", "..") for p in parts) and "\\" not in path
              and not any(ord(c) < 32 for c in path) and not re.match(r"[A-Za-z]:", path))
    if not ok:
        prefix = f"Hub repo {where}: " if where else ""
        raise MaskStoreError(f"{prefix}refusing {what} path {path!r}: it would escape the "
                             "target directory", where or None)
    return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(COPY_BUF):
            h.update(block)
    return h.hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub reports for a small, non-LFS file)."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def check_repo(repo_id: str, repo_type: str) -> None:
    """Raise :class:`UsageError` unless ``repo_id`` is a valid ``org/name`` of a known type."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_type not in REPO_TYPES:
        raise UsageError(f"repo type must be one of {', '.join(REPO_TYPES)}, not {repo_type!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"invalid Hub repo id {repo_id!r}: use org/name") from exc
    if "/" not in repo_id:
        raise UsageError(f"invalid Hub repo id {repo_id!r}: use org/name")


def hf_api(token: str | None) -> HfApi:
    """A huggingface_hub client for ``token`` (None: the user's own login)."""
    # Created per call, never at import: the endpoint and token are read when it is built.
    from huggingface_hub import HfApi

    return HfApi(token=token)


def store_files(store: Path) -> list[tuple[str, Path]]:
    """``(path in repo, local path)`` of every file of a Zarr store, sorted by path."""
    out = []
    for root, _dirs, files in os.walk(store):
        for f in files:
            local = Path(root) / f
            rel = local.relative_to(store).as_posix()
            out.append((f"{STORE_DIR}/{rel}", local))
    return sorted(out)


def as_str(value: Any) -> str | None:
    """A card field as one string (a one-item list counts), else None."""
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else None
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class Manifest:
    """A parsed and checked ``maskhub.json``."""

    meta: MaskMetadata
    attrs: dict[str, Any]  # the store's group attributes, as pushed
    files: dict[str, tuple[str, int]]  # path in repo -> (sha256, size)


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Parse ``maskhub.json`` and check its kind, versions, mask id, tensor names and paths.

    Raises :class:`MaskStoreError` with one line naming ``where`` for anything wrong.
    """
    try:
        doc = load_json(data, f"Hub repo {where}: {METADATA_FILE}")
    except MaskStoreError:
        doc = None
    if not isinstance(doc, dict) or doc.get("kind") != HUB_KIND:
        raise MaskStoreError(f"Hub repo {where} is not a maskhub mask: its {METADATA_FILE} is "
                             "not a maskhub repo manifest", where)
    version, attrs = doc.get("schema_version"), doc.get("mask")
    if not isinstance(version, int) or version > HUB_SCHEMA_VERSION:
        raise MaskStoreError(f"Hub repo {where} has repo schema_version {version!r}; this maskhub "
                             f"reads up to {HUB_SCHEMA_VERSION} (upgrade maskhub)", where)
    if not isinstance(attrs, dict):
        raise MaskStoreError(f"Hub repo {where}: {METADATA_FILE} has no mask metadata", where)
    fmt = attrs.get("format_version")
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise MaskStoreError(f"Hub repo {where} has mask format_version {fmt!r}; this maskhub "
                             f"reads up to {FORMAT_VERSION} (upgrade maskhub)", where)
    try:
        meta = MaskMetadata.from_dict(attrs)
    except (TypeError, ValueError) as exc:
        raise MaskStoreError(f"Hub repo {where}: bad mask metadata: {exc}", where) from exc
    if not isinstance(meta.id, str) or not _MASK_ID.fullmatch(meta.id):
        raise MaskStoreError(f"Hub repo {where}: invalid mask id {meta.id!r}", where)
    wrong = [k for k, kind in _META_TYPES.items()
             if not isinstance(getattr(meta, k), kind) or isinstance(getattr(meta, k), bool)]
    if wrong:
        raise MaskStoreError(f"Hub repo {where}: bad mask metadata: {', '.join(wrong)} has the "
                             "wrong type", where)
    check_mask_counts(attrs, f"Hub repo {where}")
    if not valid_mask_name(meta.name):
        raise MaskStoreError(f"Hub repo {where}: bad mask metadata: name {short(meta.name)} "
                             "breaks the mask-name rules (letters, digits, '.', '_' and '-', "
                             "starting with a letter or digit, at most 200 characters)", where)
    tensors = attrs.get("tensors")
    if not isinstance(tensors, list):
        raise MaskStoreError(f"Hub repo {where}: the mask metadata lists no tensors", where)
    for t in tensors:
        safe_relpath(t, "tensor", where)
    listed = doc.get("files")
    if not isinstance(listed, dict):
        raise MaskStoreError(f"Hub repo {where}: {METADATA_FILE} has no file list", where)
    files: dict[str, tuple[str, int]] = {}
    for path, entry in listed.items():
        safe_relpath(path, f"{METADATA_FILE} file", where)
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)
                and isinstance(size, int) and size >= 0):
            raise MaskStoreError(f"Hub repo {where}: bad checksum entry for {path!r} in "
                                 f"{METADATA_FILE}", where)
        files[path] = (sha, size)
    for required in (f"{STORE_DIR}/zarr.json", TENSORS_FILE):
        if required not in files:
            raise MaskStoreError(f"Hub repo {where}: {METADATA_FILE} does not list {required}",
                                 where)
    return Manifest(meta, attrs, files)
