"""Share masks on the Hugging Face Hub: :func:`push`, :func:`pull` and :func:`search`.

A mask's Hub repo holds (the contract of DESIGN.md, documented in ``docs/hub.md``):

* ``mask.zarr/``: the Zarr v3 store, byte for byte as in the registry;
* ``maskhub.json``: the schema version, the mask metadata (the store's group attributes)
  and the sha256 and size of every other file maskhub wrote;
* ``tensors.parquet``: per-tensor stats (and tolerance-sweep counts), for the Hub's viewer
  and for readers without Zarr;
* ``README.md``: a model card with YAML front matter (``library_name: maskhub``, tags,
  ``base_model``...) so that the Hub's search finds the mask.

Every generated file is a pure function of the mask and the target repo (no timestamps), so
pushing an unchanged mask again uploads nothing and makes no commit. A pull trusts nothing it
downloads: paths, versions, checksums and the arrays' counts are all checked before anything
is registered. huggingface_hub reads ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME`` and
``HF_HUB_OFFLINE`` itself; maskhub never reads, prints or logs the token.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from maskhub.checkpoints.hubio import hub_errors
from maskhub.checkpoints.sources import split_revision
from maskhub.errors import HubError, MaskStoreError, NameTakenError, UsageError
from maskhub.schemas.analysis import TensorAnalysis
from maskhub.schemas.metadata import FORMAT_VERSION, MaskMetadata, TensorStats
from maskhub.schemas.names import invalid_mask_name_message, mask_name_from, valid_mask_name
from maskhub.storage.files import remove_tree
from maskhub.storage.store import MaskStore

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from maskhub.core.home import Home
    from maskhub.core.record import MaskRecord

#: Version of the repo layout (``maskhub.json``). Readers refuse repos with a newer one.
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

_SHA1 = re.compile(r"[0-9a-f]{40}")
_MASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_BUF = 8 << 20
# Types of the metadata fields a pull relies on (checked before anything is indexed).
_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "base_model": str, "target_model": str, "created_at": str,
    "n_params": int, "n_updated": int, "tol": (int, float)}


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    """What :func:`push` did. ``changed`` is False when the Hub already had these files."""

    mask_id: str
    name: str
    repo_id: str
    repo_type: str
    branch: str
    commit: str
    url: str
    changed: bool
    files: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` did: ``status`` is ``"registered"`` or ``"already registered"``."""

    mask: MaskRecord
    repo_id: str
    repo_type: str
    commit: str
    status: str
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        m = self.mask
        return {"status": self.status, "id": m.id, "name": m.name, "repo_id": self.repo_id,
                "repo_type": self.repo_type, "commit": self.commit, "n_params": m.n_params,
                "n_updated": m.n_updated, "sparsity": m.sparsity, "notes": list(self.notes)}


# -- small helpers -------------------------------------------------------------------------


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
        while block := f.read(_BUF):
            h.update(block)
    return h.hexdigest()


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def _check_repo(repo_id: str, repo_type: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_type not in REPO_TYPES:
        raise UsageError(f"repo type must be one of {', '.join(REPO_TYPES)}, not {repo_type!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"invalid Hub repo id {repo_id!r}: use org/name") from exc
    if "/" not in repo_id:
        raise UsageError(f"invalid Hub repo id {repo_id!r}: use org/name")


def _api(token: str | None) -> HfApi:
    # Created per call, never at import: the endpoint and token are read when it is built.
    from huggingface_hub import HfApi

    return HfApi(token=token)


@contextmanager
def _write_errors(repo_id: str, where: str) -> Iterator[None]:
    """:func:`hub_errors`, plus a clear line for a write the Hub refuses (401/403) and a hint
    after a network error (the push is safe to repeat)."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        with hub_errors(repo_id, where):
            try:
                yield
            except HfHubHTTPError as exc:
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if status in (401, 403) and not isinstance(exc, RepositoryNotFoundError):
                    raise HubError(
                        f"the Hub refused to write to {repo_id} (HTTP {status}): set HF_TOKEN "
                        "to a token with write access to it, or log in with `hf auth login`",
                        repo_id) from None
                raise
    except HubError as exc:
        if "network error" not in str(exc):
            raise
        raise HubError(f"{exc} (nothing was recorded; push again: it uploads only what the Hub "
                       "lacks and makes no commit if the mask is already there)",
                       repo_id) from exc


# -- the files of a mask repo --------------------------------------------------------------


def store_files(store: Path) -> list[tuple[str, Path]]:
    """``(path in repo, local path)`` of every file of a Zarr store, sorted by path."""
    out = []
    for root, _dirs, files in os.walk(store):
        for f in files:
            local = Path(root) / f
            rel = local.relative_to(store).as_posix()
            out.append((f"{STORE_DIR}/{rel}", local))
    return sorted(out)


#: The ``diff --rank/--stats`` figures carried in ``tensors.parquet`` (column ``analysis``).
ANALYSIS_FIELDS = (("rank", pa.int64()), ("max_rank", pa.int64()), ("rank_rtol", pa.float64()),
                   ("sign_flips", pa.int64()), ("mean_abs_delta", pa.float64()),
                   ("max_abs_delta", pa.float64()), ("mean_rel_delta", pa.float64()),
                   ("max_rel_delta", pa.float64()), ("n_sub_bf16_step", pa.int64()))


def tensors_table(stats: Sequence[TensorStats],
                  sweep: Sequence[tuple[str, float, int]] = (),
                  analysis: Sequence[TensorAnalysis] = ()) -> pa.Table:
    """Per-tensor stats as an Arrow table (the schema of ``tensors.parquet``); ``analysis``
    fills the nullable ``analysis`` column for the tensors it covers."""
    by_name = {a.tensor: {f: getattr(a, f) for f, _ in ANALYSIS_FIELDS} for a in analysis}
    by_tensor: dict[str, list[dict[str, Any]]] = {}
    for tensor, tol, n in sorted(sweep, key=lambda s: (s[0], s[1])):
        by_tensor.setdefault(tensor, []).append({"tol": float(tol), "n_updated": int(n)})
    schema = pa.schema([
        ("tensor", pa.string()), ("layer", pa.int32()), ("module", pa.string()),
        ("shape", pa.list_(pa.int64())), ("numel", pa.int64()), ("n_updated", pa.int64()),
        ("sparsity", pa.float64()), ("base_dtype", pa.string()), ("target_dtype", pa.string()),
        ("sweep", pa.list_(pa.struct([("tol", pa.float64()), ("n_updated", pa.int64())]))),
        ("analysis", pa.struct(list(ANALYSIS_FIELDS))),
    ])
    rows = [{"tensor": t.tensor, "layer": t.layer, "module": t.module, "shape": list(t.shape),
             "numel": t.numel, "n_updated": t.n_updated, "sparsity": t.sparsity,
             "base_dtype": t.base_dtype, "target_dtype": t.target_dtype,
             "sweep": by_tensor.get(t.tensor, []), "analysis": by_name.get(t.tensor)}
            for t in stats]
    return pa.Table.from_pylist(rows, schema=schema)


def _module_rows(stats: Sequence[TensorStats]) -> list[tuple[str, int, int, int]]:
    """``(module, tensors, numel, n_updated)`` in order of first layer, then name."""
    acc: dict[str, list[int]] = {}
    for t in stats:
        a = acc.setdefault(t.module, [0, 0, 0, t.layer if t.layer is not None else -1])
        a[0] += 1
        a[1] += t.numel
        a[2] += t.n_updated
        a[3] = min(a[3], t.layer if t.layer is not None else -1)
    order = sorted(acc, key=lambda m: (acc[m][3], m))
    return [(m, acc[m][0], acc[m][1], acc[m][2]) for m in order]


def render_card(meta: MaskMetadata, name: str, stats: Sequence[TensorStats], repo_id: str,
                repo_type: str = "model", license: str | None = None) -> str:
    """The model card (README.md): YAML front matter for the Hub's search, then a summary,
    the per-module table and a snippet to pull and apply the mask."""
    from huggingface_hub import ModelCardData

    algorithm = (meta.algorithm or "").strip().lower() or None
    tags = [*BASE_TAGS, *([algorithm] if algorithm else [])]
    details = {"mask_id": meta.id, "name": name, "algorithm": meta.algorithm,
               "base_model": meta.base_model, "base_revision": meta.base_revision,
               "target_model": meta.target_model, "target_revision": meta.target_revision,
               "seed": meta.seed, "dataset": meta.dataset, "tol": meta.tol,
               "n_params": meta.n_params, "n_updated": meta.n_updated,
               "sparsity": round(meta.sparsity, 6), "format_version": meta.format_version}
    card = ModelCardData(
        library_name="maskhub", license=license,
        base_model=meta.base_model if is_hub_repo_id(meta.base_model) else None,
        tags=tags, maskhub={k: v for k, v in details.items() if v is not None},
    )
    kind = f"{meta.algorithm} " if meta.algorithm else ""
    summary = [
        ("base model", _code(meta.base_model, meta.base_revision)),
        ("fine-tuned model", _code(meta.target_model, meta.target_revision)),
        ("algorithm", meta.algorithm), ("seed", meta.seed), ("dataset", meta.dataset),
        ("tolerance", f"updated iff \\|θ1 − θ0\\| > {meta.tol:g}"), ("dtype", meta.dtype),
        ("parameters", f"{meta.n_params:,}"), ("updated", f"{meta.n_updated:,}"),
        ("sparsity", f"{100 * meta.sparsity:.2f}%"), ("mask id", f"`{meta.id}`"),
    ]
    lines = [
        "---", card.to_yaml(), "---", "",
        f"# {name}: update mask", "",
        f"Which parameters the {kind}fine-tuning of `{meta.target_model}` changed, relative "
        f"to `{meta.base_model}`: a boolean mask per parameter tensor, made with "
        "[maskhub](https://github.com/maskhub/maskhub). "
        f"{100 * meta.density:.2f}% of the parameters were updated.", "",
        "| | |", "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in summary if v not in (None, "")), "",
        "## Per module", "",
        "| module | tensors | parameters | updated | sparsity |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for module, n, numel, upd in _module_rows(stats):
        sp = 1 - upd / numel if numel else 1.0
        lines.append(f"| {module} | {n} | {numel:,} | {upd:,} | {100 * sp:.2f}% |")
    rt = "" if repo_type == "model" else f', repo_type="{repo_type}"'
    rt_cli = "" if repo_type == "model" else f" --repo-type {repo_type}"
    lines += [
        "", "## Use it", "",
        "Train only the parameters this mask marks (gradient masking):", "",
        "```python",
        "from maskhub import Mask",
        f'mask = Mask.from_hub("{repo_id}"{rt})', "",
        "from maskhub.torch import apply_mask",
        "apply_mask(model, mask)  # train only the entries the mask marks as updated",
        "```", "",
        "or from the command line:", "",
        "```bash", f"pip install maskhub && maskhub pull {repo_id}{rt_cli}", "```", "",
        "## Files", "",
        f"- `{STORE_DIR}/`: the Zarr v3 store, one packed-bit `uint8` array per tensor "
        "(attributes `shape`, `bitorder`; `np.unpackbits(a[:], count=prod(shape), "
        "bitorder=...)`).",
        f"- `{TENSORS_FILE}`: per-tensor counts.",
        f"- `{METADATA_FILE}`: metadata and the sha256 of every file; `maskhub pull` checks "
        "them all.", "",
    ]
    return "\n".join(lines)


def _code(model: str, revision: str | None) -> str:
    return f"`{model}`" + (f" @ `{revision}`" if revision else "")


def write_repo_files(registry: Home, mask: MaskRecord, dest: Path, repo_id: str,
                     repo_type: str = "model", license: str | None = None) -> dict[str, Path]:
    """Write ``maskhub.json``, ``tensors.parquet`` and ``README.md`` into ``dest``; return every
    file of the repo as ``{path in repo: local path}`` (the store files stay where they are)."""
    dest.mkdir(parents=True, exist_ok=True)
    store = mask.store
    stats = list(store.iter_stats())
    with registry.index.connect(write=False) as con:
        sweep = con.execute("SELECT tensor, tol, n_updated FROM tensor_sweep WHERE mask_id = ?",
                            [mask.id]).fetchall()
        fields = ", ".join(f for f, _ in ANALYSIS_FIELDS)
        analysis = [TensorAnalysis(**r) for r in registry.index.rows(
            con, f"SELECT tensor, {fields} FROM tensor_analysis WHERE mask_id = ?", [mask.id])]
    files = dict(store_files(mask.path))
    pq.write_table(tensors_table(stats, sweep, analysis), dest / TENSORS_FILE,
                   compression="zstd")
    files[TENSORS_FILE] = dest / TENSORS_FILE
    license = license or (store.metadata.extra or {}).get("license")
    card = render_card(store.metadata, mask.name, stats, repo_id, repo_type, license)
    (dest / CARD_FILE).write_text(card, encoding="utf-8")
    files[CARD_FILE] = dest / CARD_FILE
    doc = {
        "kind": HUB_KIND,
        "schema_version": HUB_SCHEMA_VERSION,
        "store": STORE_DIR,
        "mask": dict(store.group.attrs),
        "files": {p: {"sha256": sha256_file(f), "size": f.stat().st_size}
                  for p, f in sorted(files.items())},
    }
    (dest / METADATA_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n",
                                      encoding="utf-8")
    files[METADATA_FILE] = dest / METADATA_FILE
    return files


# -- push ----------------------------------------------------------------------------------


def push(registry: Home, ref: str, repo_id: str, *, private: bool = False,
         revision: str | None = None, commit_message: str | None = None,
         repo_type: str = "model", license: str | None = None,
         token: str | None = None) -> PushResult:
    """Upload mask ``ref`` to ``repo_id`` in one commit, creating the repo (and the branch
    ``revision``) if needed, and record the repo and commit in the index.

    Pushing an unchanged mask again makes no commit (``changed=False``). ``token`` defaults
    to huggingface_hub's (``HF_TOKEN`` or the stored login).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    _check_repo(repo_id, repo_type)
    if is_offline():
        raise HubError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set and pushing needs "
                       "the network (unset HF_HUB_OFFLINE)", repo_id)
    mask = registry.get(ref)
    mask.store.validate()  # never publish a store that disagrees with its own metadata
    branch = revision or "main"
    stage = registry.staging_path(f"push-{mask.id}")
    remove_tree(stage)
    api = _api(token)
    try:
        with _write_errors(repo_id, branch):
            api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
            if branch != "main":
                api.create_branch(repo_id, branch=branch, repo_type=repo_type, exist_ok=True)
            info = api.repo_info(repo_id, revision=branch, repo_type=repo_type)
        head = info.sha
        # A license set by an earlier push (or on the Hub) stays unless a new one is given.
        card = info.card_data.to_dict() if getattr(info, "card_data", None) else {}
        license = license or _as_str(card.get("license"))
        files = write_repo_files(registry, mask, stage, repo_id, repo_type, license)
        n_bytes = sum(f.stat().st_size for f in files.values())
        remote = {s.rfilename for s in info.siblings or []}
        stale = sorted(p for p in remote if p.startswith(STORE_DIR + "/") and p not in files)
        ops: list[Any] = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f))
                          for p, f in sorted(files.items())]
        ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
        message = commit_message or f"Upload update mask {mask.name} with maskhub"
        with _write_errors(repo_id, branch), warnings.catch_warnings():
            # tensors.parquet is part of the mask, not a dataset uploaded by mistake
            warnings.filterwarnings("ignore", message=".*about to commit a data file")
            commit = api.create_commit(repo_id, ops, repo_type=repo_type, revision=branch,
                                       parent_commit=head, commit_message=message)
    finally:
        remove_tree(stage)
    sha = str(commit.oid)
    with registry.index.connect() as con:
        con.execute("UPDATE masks SET hub_repo = ?, hub_revision = ? WHERE id = ?",
                    [hub_ref(repo_id, repo_type), sha, mask.id])
    return PushResult(mask_id=mask.id, name=mask.name, repo_id=repo_id, repo_type=repo_type,
                      branch=branch, commit=sha, url=str(commit.commit_url),
                      changed=sha != head, files=len(files), bytes=n_bytes)


def _as_str(value: Any) -> str | None:
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else None
    return value if isinstance(value, str) and value else None


# -- pull ----------------------------------------------------------------------------------


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
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
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


@contextmanager
def _read_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """:func:`hub_errors`, with the cases a pull meets told apart (no maskhub.json on the
    Hub; not in the local cache)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    where = f"{repo_id}@{revision}" if revision else repo_id
    with hub_errors(repo_id, revision):
        try:
            yield
        except RemoteEntryNotFoundError as exc:
            raise MaskStoreError(f"Hub repo {where} is not a maskhub mask: it has no "
                                 f"{METADATA_FILE}", where) from exc
        except LocalEntryNotFoundError as exc:
            why = ("HF_HUB_OFFLINE is set" if is_offline()
                   else "the Hub cannot be reached or the download failed")
            raise HubError(f"{where} is not (completely) in the local Hugging Face cache and "
                           f"{why}", repo_id) from exc


def _evict(snapshot_file: Path) -> None:
    """Remove a file from the huggingface_hub cache: the snapshot entry and the blob it
    points to, so that the next download fetches it again instead of trusting it."""
    blob = snapshot_file.resolve() if snapshot_file.is_symlink() else None
    snapshot_file.unlink(missing_ok=True)
    if blob is not None and blob.parent.name == "blobs":
        blob.unlink(missing_ok=True)


def _copy_verified(src: Path, dst: Path | None, sha256: str, size: int) -> tuple[bool, bytes]:
    """Copy ``src`` to ``dst`` (or read it, when ``dst`` is None) while hashing it.

    Returns ``(matches, content_when_read)``.
    """
    if src.stat().st_size != size:
        return False, b""
    h = hashlib.sha256()
    chunks: list[bytes] = []
    if dst is not None:
        dst.parent.mkdir(parents=True, exist_ok=True)
    sink = open(dst, "wb") if dst is not None else nullcontext(None)
    with open(src, "rb") as f, sink as out:
        while block := f.read(_BUF):
            h.update(block)
            if out is not None:
                out.write(block)
            else:
                chunks.append(block)
    return h.hexdigest() == sha256, b"".join(chunks)


def _check_listing(listing: dict[str, Any], manifest_bytes: bytes, manifest_path: Path,
                   where: str) -> None:
    """Check the repo listing's paths and that ``maskhub.json`` is what the Hub says it is."""
    for path in listing:
        safe_relpath(path, "repo file", where)
    sib = listing.get(METADATA_FILE)
    if sib is None:
        return
    if sib.lfs is not None:
        ok = hashlib.sha256(manifest_bytes).hexdigest() == sib.lfs.sha256
    else:
        ok = sib.blob_id is None or _git_blob_sha1(manifest_bytes) == sib.blob_id
    if not ok:
        _evict(manifest_path)
        raise MaskStoreError(f"Hub repo {where}: the downloaded {METADATA_FILE} does not match "
                             "the Hub's checksum of it (removed from the cache; retry)", where)


def _check_parquet(data: bytes, stats: Sequence[TensorStats], where: str
                   ) -> tuple[list[tuple[str, float, int]], list[TensorAnalysis]]:
    """Check ``tensors.parquet`` against the store's stats; return its sweep rows and its
    ``diff --rank/--stats`` rows (none for repos pushed without them)."""
    try:
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise MaskStoreError(f"Hub repo {where}: {TENSORS_FILE} is unreadable: {exc}",
                             where) from exc
    if [r.get("tensor") for r in rows] != [t.tensor for t in stats]:
        raise MaskStoreError(f"Hub repo {where}: {TENSORS_FILE} does not list the store's "
                             "tensors", where)
    sweep: list[tuple[str, float, int]] = []
    analysis: list[TensorAnalysis] = []
    for r, t in zip(rows, stats, strict=True):
        got = (tuple(r.get("shape") or ()), r.get("numel"), r.get("n_updated"), r.get("layer"),
               r.get("module"))
        if got != (t.shape, t.numel, t.n_updated, t.layer, t.module):
            raise MaskStoreError(f"Hub repo {where}: {TENSORS_FILE} disagrees with the store "
                                 f"on tensor {t.tensor!r}", where)
        sweep += [(t.tensor, float(s["tol"]), int(s["n_updated"])) for s in r.get("sweep") or []]
        extra = r.get("analysis")
        if extra:
            try:
                analysis.append(TensorAnalysis(t.tensor, **{f: extra.get(f) for f, _ in
                                                            ANALYSIS_FIELDS}))
            except TypeError as exc:
                raise MaskStoreError(f"Hub repo {where}: {TENSORS_FILE} has a malformed "
                                     f"analysis row for {t.tensor!r}", where) from exc
    return sweep, analysis


def _row(registry: Home, sql: str, params: list[Any]) -> dict[str, Any] | None:
    with registry.index.connect(write=False) as con:
        rows = registry.index.rows(con, sql, params)
    return rows[0] if rows else None



def pull(registry: Home, repo_id: str, revision: str | None = None, *,
         name: str | None = None, repo_type: str = "model",
         token: str | None = None) -> PullResult:
    """Download the mask of Hub repo ``repo_id`` at ``revision`` (default: main) through the
    huggingface_hub cache, verify it and register it with the repo and resolved commit.

    Checks, in order: the repo listing's paths, ``maskhub.json`` (kind, versions, paths, its
    own checksum against the Hub's), every needed file's size and sha256 (a corrupt file is
    evicted from the cache so that a retry downloads it again), the arrays against the
    metadata, and ``tensors.parquet`` against the arrays. Pulling a commit already pulled
    is a no-op. ``name`` defaults to the mask's own name, suffixed ``-2``... when taken.
    ``repo_id`` may carry the revision (``org/name@rev``).
    Works offline (``HF_HUB_OFFLINE=1``) for a revision already in the cache.
    """
    if revision is None:
        repo_id, revision = split_revision(repo_id)
    _check_repo(repo_id, repo_type)
    if name is not None and not valid_mask_name(name):
        raise UsageError(invalid_mask_name_message(name))
    api = _api(token)
    offline = is_offline()
    with _read_errors(repo_id, revision):
        manifest_path = Path(api.hf_hub_download(repo_id, METADATA_FILE, repo_type=repo_type,
                                                 revision=revision))
    sha = manifest_path.parent.name  # the cache keeps each commit's files under its sha
    if not _SHA1.fullmatch(sha):
        raise HubError(f"{repo_id}: unexpected huggingface_hub cache layout at {manifest_path}",
                       repo_id)
    where = f"{repo_id}@{sha[:12]}"
    ref = hub_ref(repo_id, repo_type)
    done = _row(registry, "SELECT id FROM masks WHERE hub_repo = ? AND hub_revision = ?",
                [ref, sha])
    if done is not None:
        return PullResult(registry.get(done["id"]), repo_id, repo_type, sha, "already registered")

    data = manifest_path.read_bytes()
    listing: dict[str, Any] | None = None
    if not offline:
        with _read_errors(repo_id, sha):
            info = api.repo_info(repo_id, revision=sha, repo_type=repo_type, files_metadata=True)
        listing = {s.rfilename: s for s in info.siblings or []}
        _check_listing(listing, data, manifest_path, where)
    manifest = parse_manifest(data, where)
    meta = manifest.meta

    same_id = _row(registry, "SELECT name FROM masks WHERE id = ?", [meta.id])
    if same_id is not None:
        local = registry.get(meta.id)
        if dict(local.store.group.attrs) != manifest.attrs:
            raise MaskStoreError(
                f"Hub repo {where} holds mask id {meta.id}, which the local mask "
                f"{same_id['name']!r} already uses with different content; remove it first "
                f"(`maskhub rm {same_id['name']}`)", where)
        return PullResult(local, repo_id, repo_type, sha, "already registered",
                          (f"this mask (id {meta.id[:12]}) is already registered as "
                           f"{local.name!r}",))

    needed = sorted(p for p in manifest.files if p.startswith(STORE_DIR + "/") or p == TENSORS_FILE)
    if listing is not None:
        missing = [p for p in needed if p not in listing]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MaskStoreError(f"Hub repo {where}: {missing[0]}{more} is listed in "
                                 f"{METADATA_FILE} but missing from the repo", where)
    with _read_errors(repo_id, sha):
        folder = Path(api.snapshot_download(repo_id, repo_type=repo_type, revision=sha,
                                            allow_patterns=[glob.escape(p) for p in needed]))

    tmp = registry.staging_path(meta.id)
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    try:
        parquet = _fetch(folder, needed, manifest, tmp, where)
        store = _open_checked(tmp, manifest, where)
        stats = list(store.iter_stats())
        sweep, analysis = _check_parquet(parquet, stats, where)
        notes: tuple[str, ...] = ()
        if name is None:
            stem = mask_name_from(meta.name, "hub-mask") if isinstance(meta.name, str) \
                else "hub-mask"
            name = registry.free_name(stem)
            if name != meta.name:
                notes = (f"a mask named {meta.name!r} already exists: registered this one as "
                         f"{name!r} (choose another with --name)",)
        elif _row(registry, "SELECT 1 AS x FROM masks WHERE name = ?", [name]) is not None:
            raise NameTakenError(name)
        local_meta = replace(meta, name=name, hub_repo=ref, hub_revision=sha)
    except BaseException:
        remove_tree(tmp)
        raise
    try:
        mask = registry.register_store(tmp, local_meta, stats, sweep, analysis)
    except duckdb.Error as exc:  # metadata the index cannot hold (a bad date...): refuse it
        raise MaskStoreError(f"Hub repo {where}: the mask metadata cannot be indexed: "
                             f"{str(exc).splitlines()[0]}", where) from exc
    return PullResult(mask, repo_id, repo_type, sha, "registered", notes)


def _fetch(folder: Path, needed: Sequence[str], manifest: Manifest, tmp: Path,
           where: str) -> bytes:
    """Copy the store files from the snapshot into ``tmp`` checking every size and sha256;
    return the verified bytes of ``tensors.parquet``. Corrupt files are evicted from the
    cache before the error is raised."""
    bad: list[str] = []
    parquet = b""
    for p in needed:
        src = folder / p
        if not src.is_file():
            raise MaskStoreError(f"Hub repo {where}: {p} is listed in {METADATA_FILE} but "
                                 "missing from the download", where)
        sha, size = manifest.files[p]
        dst = None if p == TENSORS_FILE else tmp / p[len(STORE_DIR) + 1:]
        ok, content = _copy_verified(src, dst, sha, size)
        if not ok:
            bad.append(p)
            _evict(src)
        elif dst is None:
            parquet = content
    if bad:
        more = f" and {len(bad) - 1} more file(s)" if len(bad) > 1 else ""
        raise MaskStoreError(
            f"Hub repo {where}: checksum mismatch for {bad[0]}{more} (sha256 differs from "
            f"{METADATA_FILE}); the corrupt download was removed from the Hugging Face cache, "
            "so a retry downloads it again", where)
    return parquet


def _open_checked(tmp: Path, manifest: Manifest, where: str) -> MaskStore:
    """Open the staged store; check its metadata against ``maskhub.json`` and its arrays
    against its metadata (shapes and popcounts)."""
    try:
        store = MaskStore(tmp)
        if dict(store.group.attrs) != manifest.attrs:
            raise MaskStoreError(f"Hub repo {where}: {METADATA_FILE} and {STORE_DIR}/zarr.json "
                                 "disagree on the mask metadata", where)
        store.validate()
    except MaskStoreError as exc:
        msg = str(exc).replace(str(tmp), f"Hub repo {where} ({STORE_DIR})")
        raise MaskStoreError(msg, where) from exc
    return store


# -- search --------------------------------------------------------------------------------


def search(*, base_model: str | None = None, algorithm: str | None = None,
           repo_type: str = "model", limit: int = 50,
           token: str | None = None) -> list[dict[str, Any]]:
    """Mask repos on the Hub (tag ``maskhub``), optionally of one base model
    (``base_model:<id>`` tag) and one algorithm (its tag); most recent first where the Hub
    sorts. Each hit: ``repo_id, repo_type, base_model, algorithm, sparsity, n_params, tags,
    last_modified, downloads, likes``."""
    if repo_type not in REPO_TYPES:
        raise UsageError(f"repo type must be one of {', '.join(REPO_TYPES)}, not {repo_type!r}")
    if limit < 1:
        raise UsageError(f"--limit must be at least 1, not {limit}")
    filters = ["maskhub"]
    if base_model:
        filters.append(f"base_model:{base_model}")
    if algorithm:
        filters.append(algorithm.strip().lower())
    api = _api(token)
    with hub_errors("Hub search"):
        if repo_type == "model":
            items = list(api.list_models(filter=filters, cardData=True, limit=limit))
        else:
            items = list(api.list_datasets(filter=filters, full=True, limit=limit))
    return [_hit(item, repo_type) for item in items]


def _hit(item: Any, repo_type: str) -> dict[str, Any]:
    card = item.card_data.to_dict() if getattr(item, "card_data", None) else {}
    details = card.get("maskhub") if isinstance(card.get("maskhub"), dict) else {}
    tags = list(item.tags or [])
    base = card.get("base_model")
    if isinstance(base, list):
        base = base[0] if len(base) == 1 else ", ".join(map(str, base))
    if base is None:
        base = next((t.split(":", 1)[1] for t in tags if t.startswith("base_model:")), None)
    algorithm = details.get("algorithm") or next(
        (t for t in card.get("tags") or [] if t not in BASE_TAGS), None)
    modified = getattr(item, "last_modified", None)
    return {"repo_id": item.id, "repo_type": repo_type, "base_model": base,
            "algorithm": algorithm, "sparsity": details.get("sparsity"),
            "n_params": details.get("n_params"), "tags": tags,
            "last_modified": modified.isoformat() if modified is not None else None,
            "downloads": getattr(item, "downloads", None), "likes": getattr(item, "likes", None)}
