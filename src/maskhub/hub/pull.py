"""``pull``: download a mask repo through the huggingface_hub cache, verify every file and
array, and register it.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskhub.checkpoints.hubio import (
    hub_cache_failure,
    hub_errors,
    hub_messages,
    unresolvable_host,
)
from maskhub.checkpoints.sources import split_revision
from maskhub.checkpoints.validate import load_json
from maskhub.errors import (
    HomeError,
    HubError,
    MaskStoreError,
    NameTakenError,
    UsageError,
    environment_errors,
)
from maskhub.hub.card import ANALYSIS_FIELDS, read_tensors_parquet
from maskhub.hub.layout import (
    COPY_BUF,
    METADATA_FILE,
    SHA1,
    STORE_DIR,
    TENSORS_FILE,
    Manifest,
    check_repo,
    git_blob_sha1,
    hf_api,
    hub_ref,
    is_offline,
    parse_manifest,
    safe_relpath,
)
from maskhub.kernels.precision import settle_null
from maskhub.schemas.analysis import TensorAnalysis
from maskhub.schemas.metadata import TensorStats
from maskhub.schemas.names import invalid_mask_name_message, mask_name_from, valid_mask_name
from maskhub.storage.engine import duckdb
from maskhub.storage.files import remove_tree
from maskhub.storage.store import MaskStore

if TYPE_CHECKING:

    from maskhub.core.home import Home
    from maskhub.core.record import MaskRecord


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
            failure = hub_cache_failure(exc)  # the cache could not be written: not the network
            if failure is not None:
                raise failure from exc
            host = unresolvable_host()
            why = (f"the Hub cannot be reached ({host} does not resolve: offline?)" if host
                   else "HF_HUB_OFFLINE is set" if is_offline()
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


def _copy_verified(src: Path, dst: Path, sha256: str, size: int) -> bool:
    """Copy ``src`` to ``dst`` while hashing it; whether its size and sha256 match."""
    if src.stat().st_size != size:
        return False
    h = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f, open(dst, "wb") as out:
        while block := f.read(COPY_BUF):
            h.update(block)
            out.write(block)
    return h.hexdigest() == sha256


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
        ok = sib.blob_id is None or git_blob_sha1(manifest_bytes) == sib.blob_id
    if not ok:
        _evict(manifest_path)
        raise MaskStoreError(f"Hub repo {where}: the downloaded {METADATA_FILE} does not match "
                             "the Hub's checksum of it (removed from the cache; retry)", where)


def _check_parquet(rows: Sequence[dict[str, Any]], stats: Sequence[TensorStats], where: str
                   ) -> tuple[list[tuple[str, float, int]], list[TensorAnalysis],
                              list[tuple[str, int, int, int]]]:
    """Check the rows of ``tensors.parquet`` against the store's stats; return its sweep
    rows, its ``diff --rank/--stats`` rows and its magnitude strata (none for repos pushed
    without them; strata must add up to each tensor's counts)."""
    if [r.get("tensor") for r in rows] != [t.tensor for t in stats]:
        raise MaskStoreError(f"Hub repo {where}: {TENSORS_FILE} does not list the store's "
                             "tensors", where)
    sweep: list[tuple[str, float, int]] = []
    analysis: list[TensorAnalysis] = []
    strata: list[tuple[str, int, int, int]] = []
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
        cells = [(t.tensor, int(c["stratum"]), int(c["numel"]), int(c["n_updated"]))
                 for c in r.get("strata") or []]
        if cells and (sum(c[2] for c in cells) != t.numel
                      or sum(c[3] for c in cells) != t.n_updated
                      or len({c[1] for c in cells}) != len(cells)):
            raise MaskStoreError(f"Hub repo {where}: {TENSORS_FILE} has magnitude strata for "
                                 f"{t.tensor!r} that do not add up to its counts", where)
        strata += cells
    if strata and {c[0] for c in strata} != {t.tensor for t in stats if t.numel}:
        raise MaskStoreError(f"Hub repo {where}: {TENSORS_FILE} has magnitude strata for "
                             "some tensors only", where)
    return sweep, analysis, strata


def _content(attrs: dict[str, Any]) -> dict[str, Any]:
    """A mask's attributes without where it was published (a pushed store names its repo)."""
    return {k: v for k, v in attrs.items() if k not in ("hub_repo", "hub_revision")}


def _claimed_id(manifest: bytes) -> str | None:
    """The mask id ``maskhub.json`` names, read leniently before it is checked (for a
    registry lookup only; :func:`parse_manifest` checks it and reports what is wrong)."""
    try:
        doc = load_json(manifest, METADATA_FILE)  # nesting bounded before json.loads
    except MaskStoreError:
        return None
    mask = doc.get("mask") if isinstance(doc, dict) else None
    value = mask.get("id") if isinstance(mask, dict) else None
    return value if isinstance(value, str) else None


def pull(registry: Home, repo_id: str, revision: str | None = None, *,
         name: str | None = None, repo_type: str = "model", token: str | None = None,
         notice: Callable[[str], None] | None = None, progress: bool = True) -> PullResult:
    """Download the mask of Hub repo ``repo_id`` at ``revision`` (default: main) through the
    huggingface_hub cache, verify it and register it with the repo and resolved commit.

    Checks, in order: the repo listing's paths, ``maskhub.json`` (kind, versions, paths, its
    own checksum against the Hub's), every needed file's size and sha256 (a corrupt file is
    evicted from the cache so that a retry downloads it again), the arrays against the
    metadata, and ``tensors.parquet`` against the arrays. Pulling a commit already pulled
    is a no-op. ``name`` defaults to the mask's own name, suffixed ``-2``... when taken.
    ``repo_id`` may carry the revision (``org/name@rev``).
    Works offline (``HF_HUB_OFFLINE=1``) for a revision already in the cache.
    ``notice``: where huggingface_hub's messages go, as short lines (a retry after a
    dropped connection: "retrying 2/5 after a dropped connection"); ``progress``: whether
    its progress bars are drawn (see :func:`~maskhub.checkpoints.hubio.hub_messages`).
    """
    with hub_messages(notice, progress):
        return _pull(registry, repo_id, revision, name=name, repo_type=repo_type, token=token)


def _pull(registry: Home, repo_id: str, revision: str | None = None, *,
         name: str | None = None, repo_type: str = "model",
         token: str | None = None) -> PullResult:
    """:func:`pull`, huggingface_hub's messages already routed."""
    if revision is None:
        repo_id, revision = split_revision(repo_id)
    check_repo(repo_id, repo_type)
    if name is not None and not valid_mask_name(name):
        raise UsageError(invalid_mask_name_message(name))
    api = hf_api(token)
    offline = is_offline()
    with _read_errors(repo_id, revision):
        manifest_path = Path(api.hf_hub_download(repo_id, METADATA_FILE, repo_type=repo_type,
                                                 revision=revision))
    sha = manifest_path.parent.name  # the cache keeps each commit's files under its sha
    if not SHA1.fullmatch(sha):
        raise HubError(f"{repo_id}: unexpected huggingface_hub cache layout at {manifest_path}",
                       repo_id)
    where = f"{repo_id}@{sha[:12]}"
    ref = hub_ref(repo_id, repo_type)
    data = manifest_path.read_bytes()
    # One read connection answers both "pulled already?" questions: this commit, and a
    # local mask with the id the manifest names (used once the manifest is checked below).
    with registry.index.connect(write=False) as con:
        claimed = _claimed_id(data)
        found = registry.index.rows(
            con, "SELECT id, name, hub_repo, hub_revision FROM masks "
                 "WHERE (hub_repo = ? AND hub_revision = ?) OR id = ? ORDER BY id",
            [ref, sha, claimed])
        done = next((r for r in found if (r["hub_repo"], r["hub_revision"]) == (ref, sha)),
                    None)
        if done is not None:
            return PullResult(registry.get(done["id"]), repo_id, repo_type, sha,
                              "already registered")
        same_id = next((r for r in found if r["id"] == claimed), None)
        local = registry.get(claimed) if same_id is not None and claimed else None

    listing: dict[str, Any] | None = None
    if not offline:
        with _read_errors(repo_id, sha):
            info = api.repo_info(repo_id, revision=sha, repo_type=repo_type, files_metadata=True)
        listing = {s.rfilename: s for s in info.siblings or []}
        _check_listing(listing, data, manifest_path, where)
    manifest = parse_manifest(data, where)
    meta = manifest.meta

    if local is not None and same_id is not None and meta.id == claimed:  # checked now
        if _content(local.store.attributes) != _content(manifest.attrs):
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
                                            allow_patterns=_patterns(needed, listing)))

    tmp = registry.staging_path(meta.id)
    side = registry.staging_path(f"{meta.id}-stats")  # the verified tensors.parquet
    for d in (tmp, side):
        remove_tree(d)
        d.mkdir(parents=True)
    try:
        with environment_errors(tmp):  # the copy into staging met a full disk
            _fetch(folder, needed, manifest, tmp, side / TENSORS_FILE, where)
        # Validated before the write connection opens: the registry's exclusive lock is
        # never held while a (large) store's bits are counted.
        stats = _checked_stats(tmp, manifest, where)
    except BaseException:
        remove_tree(tmp)
        remove_tree(side)
        raise
    opened = False
    try:
        # One write connection: tensors.parquet read (by DuckDB), the name, the registration.
        with registry.index.connect() as con:
            opened = True
            notes: tuple[str, ...] = ()
            try:
                try:
                    rows = read_tensors_parquet(con, side / TENSORS_FILE)
                except duckdb.Error as exc:
                    raise MaskStoreError(f"Hub repo {where}: {TENSORS_FILE} is unreadable: "
                                         f"{str(exc).splitlines()[0]}", where) from exc
                finally:
                    remove_tree(side)
                sweep, analysis, strata = _check_parquet(rows, stats, where)
                null = meta.extra.get("precision_null")
                if isinstance(null, dict) and isinstance(null.get("budget"), (int, float)):
                    stats, _ = settle_null(stats, strata, float(null["budget"]))  # per tensor
                if name is None:
                    stem = mask_name_from(meta.name, "hub-mask") if isinstance(meta.name, str) \
                        else "hub-mask"
                    name = registry.free_name(stem)
                    if name != meta.name:
                        notes = (f"a mask named {meta.name!r} already exists: registered this "
                                 f"one as {name!r} (choose another with --name)",)
                elif con.execute("SELECT 1 FROM masks WHERE name = ?",
                                 [name]).fetchone() is not None:
                    raise NameTakenError(name)
                local_meta = replace(meta, name=name, hub_repo=ref, hub_revision=sha)
            except BaseException:
                remove_tree(tmp)
                raise
            mask = registry.register_store(tmp, local_meta, stats, sweep, analysis, strata)
    except BaseException as exc:
        if not opened:  # the write connection did not open: nothing of this pull stays
            remove_tree(tmp)
            remove_tree(side)
        if isinstance(exc, duckdb.Error):
            first = str(exc).splitlines()[0] if str(exc) else repr(exc)
            if opened:  # metadata the index cannot hold (a bad date...)
                raise MaskStoreError(f"Hub repo {where}: the mask metadata cannot be "
                                     f"indexed: {first}", where) from exc
            raise HomeError(registry.home, f"its registry cannot be opened for writing "
                            f"(nothing of Hub repo {where} was registered): {first}") from exc
        raise
    return PullResult(mask, repo_id, repo_type, sha, "registered", notes)


def _patterns(needed: Sequence[str], listing: dict[str, Any] | None) -> list[str]:
    """``allow_patterns`` that select exactly ``needed`` in the repo: the store folder and
    ``tensors.parquet`` when the listing shows no other file there (huggingface_hub matches
    every file against every pattern: one escaped name per file costs files² matches, seconds
    for a large model's store), else every name escaped."""
    if listing is not None:
        wanted = {p for p in listing if p.startswith(STORE_DIR + "/") or p == TENSORS_FILE}
        if wanted == set(needed):
            return [glob.escape(STORE_DIR) + "/*", glob.escape(TENSORS_FILE)]
    return [glob.escape(p) for p in needed]


def _fetch(folder: Path, needed: Sequence[str], manifest: Manifest, tmp: Path,
           parquet: Path, where: str) -> None:
    """Copy the store files from the snapshot into ``tmp``, and ``tensors.parquet`` to
    ``parquet``, checking every size and sha256. Corrupt files are evicted from the cache
    before the error is raised."""
    bad: list[str] = []
    for p in needed:
        src = folder / p
        if not src.is_file():
            raise MaskStoreError(f"Hub repo {where}: {p} is listed in {METADATA_FILE} but "
                                 "missing from the download", where)
        sha, size = manifest.files[p]
        dst = parquet if p == TENSORS_FILE else tmp / p[len(STORE_DIR) + 1:]
        if not _copy_verified(src, dst, sha, size):
            bad.append(p)
            _evict(src)
    if bad:
        more = f" and {len(bad) - 1} more file(s)" if len(bad) > 1 else ""
        raise MaskStoreError(
            f"Hub repo {where}: checksum mismatch for {bad[0]}{more} (sha256 differs from "
            f"{METADATA_FILE}); the corrupt download was removed from the Hugging Face cache, "
            "so a retry downloads it again", where)


def _checked_stats(tmp: Path, manifest: Manifest, where: str) -> list[TensorStats]:
    """:func:`_open_checked`, then the staged store's per-tensor stats."""
    return list(_open_checked(tmp, manifest, where).iter_stats())


def _open_checked(tmp: Path, manifest: Manifest, where: str) -> MaskStore:
    """Open the staged store; check its metadata against ``maskhub.json`` and its arrays
    against its metadata (shapes and popcounts)."""
    try:
        store = MaskStore(tmp)
        if store.attributes != manifest.attrs:
            raise MaskStoreError(f"Hub repo {where}: {METADATA_FILE} and {STORE_DIR}/zarr.json "
                                 "disagree on the mask metadata", where)
        store.validate()
    except MaskStoreError as exc:
        msg = str(exc).replace(str(tmp), f"Hub repo {where} ({STORE_DIR})")
        raise MaskStoreError(msg, where) from exc
    return store
