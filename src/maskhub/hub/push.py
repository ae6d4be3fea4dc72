"""``push``: publish a registered mask to a Hub repo in one commit.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskhub.checkpoints.hubio import hub_errors, hub_messages
from maskhub.errors import HubError, UsageError, environment_errors
from maskhub.hub.card import (
    ANALYSIS_FIELDS,
    render_card,
    tensors_rows,
    write_tensors_parquet,
)
from maskhub.hub.layout import (
    CARD_FILE,
    HUB_KIND,
    HUB_SCHEMA_VERSION,
    METADATA_FILE,
    STORE_DIR,
    TENSORS_FILE,
    as_str,
    check_repo,
    hf_api,
    hub_ref,
    is_offline,
    sha256_file,
    store_files,
)
from maskhub.schemas.analysis import TensorAnalysis
from maskhub.storage.files import remove_tree
from maskhub.storage.remote import is_url

if TYPE_CHECKING:

    from maskhub.core.home import Home
    from maskhub.core.record import MaskRecord


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
                if status == 404 and "xet-write-token" in _request_url(exc):
                    raise _no_xet(_request_url(exc), repo_id) from None
                if status in (401, 403) and not isinstance(exc, RepositoryNotFoundError):
                    raise HubError(
                        f"the Hub refused to write to {repo_id} (HTTP {status}): set HF_TOKEN "
                        "to a token with write access to it, or log in with `hf auth login`",
                        repo_id) from None
                raise
    except HubError as exc:
        text = str(exc)
        if "xet-write-token" in text and "404" in text:  # hf_xet's own (Rust) error
            raise _no_xet(text, repo_id) from None
        if "network error" not in text:
            raise
        raise HubError(f"{exc} (nothing was recorded; push again: it uploads only what the Hub "
                       "lacks and makes no commit if the mask is already there)",
                       repo_id) from exc


def _request_url(exc: BaseException) -> str:
    """The URL of the request behind a huggingface_hub HTTP error (else its message)."""
    request = getattr(getattr(exc, "response", None), "request", None)
    return str(getattr(request, "url", "") or exc)


def _no_xet(text: str, repo_id: str) -> HubError:
    """The error for an endpoint that answers 404 to the Xet token request (``hf_xet``
    installed, talking to a self-hosted Hub or a mirror that has no Xet storage)."""
    match = re.search(r"[a-z]+://[^/\s]+", text)
    where = match.group(0) if match else "HF_ENDPOINT"
    return HubError(f"the Hub endpoint at {where} does not speak Xet (its xet-write-token "
                    "request answered HTTP 404): set HF_HUB_DISABLE_XET=1 to upload through "
                    "plain LFS", repo_id)


#: A mask's sweep, ``diff --rank/--stats`` and magnitude-strata rows from the index.
IndexRows = tuple[list[tuple[Any, ...]], list[TensorAnalysis], list[tuple[Any, ...]]]


def index_rows(registry: Home, mask: MaskRecord) -> IndexRows:
    """The rows of ``mask`` that ``tensors.parquet`` carries besides the store's stats."""
    with registry.index.connect(write=False) as con:
        sweep = con.execute("SELECT tensor, tol, n_updated FROM tensor_sweep WHERE mask_id = ?",
                            [mask.id]).fetchall()
        fields = ", ".join(f for f, _ in ANALYSIS_FIELDS)
        analysis = [TensorAnalysis(**r) for r in registry.index.rows(
            con, f"SELECT tensor, {fields} FROM tensor_analysis WHERE mask_id = ?", [mask.id])]
        strata = con.execute("SELECT tensor, stratum, numel, n_updated FROM tensor_strata "
                             "WHERE mask_id = ?", [mask.id]).fetchall()
    return sweep, analysis, strata


def write_tensors_file(registry: Home, mask: MaskRecord, dest: Path,
                       rows: IndexRows | None = None) -> Path:
    """Write the mask's ``tensors.parquet`` into ``dest`` and return its path: the store's
    stats and the mask's :func:`index_rows` (read here when ``rows`` is None), written by
    DuckDB on the registry's connection (opened here unless one is open already)."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / TENSORS_FILE
    with registry.index.connect(write=False) as con:
        sweep, analysis, strata = rows if rows is not None else index_rows(registry, mask)
        write_tensors_parquet(con, path, tensors_rows(list(mask.store.iter_stats()), sweep,
                                                      analysis, strata))
    return path


def write_repo_files(registry: Home, mask: MaskRecord, dest: Path, repo_id: str,
                     repo_type: str = "model", license: str | None = None,
                     digests: Callable[[dict[str, Path]], dict[str, str]] | None = None,
                     rows: IndexRows | None = None) -> dict[str, Path]:
    """Write ``maskhub.json``, ``tensors.parquet`` and ``README.md`` into ``dest``; return every
    file of the repo as ``{path in repo: local path}`` (the store files stay where they are).

    ``digests({path in repo: local path})``: the hex sha256 of those files for
    ``maskhub.json`` (default: read and hashed here; a push passes the hashes huggingface_hub
    computes anyway for its upload, so that every file is hashed once). ``rows``: the
    mask's :func:`index_rows`, when the caller read them already. A ``tensors.parquet``
    already in ``dest`` (:func:`write_tensors_file`, which a push calls on the connection that
    found the mask) is kept."""
    dest.mkdir(parents=True, exist_ok=True)
    store = mask.store
    stats = list(store.iter_stats())
    files = dict(store_files(mask.path))
    # The published store names the repo it lives in (the local one stays as registered):
    # the same bytes at every push of an unchanged mask, so a second push commits nothing.
    group = json.loads(Path(mask.path, "zarr.json").read_text(encoding="utf-8"))
    group["attributes"] = {**group.get("attributes", {}),
                           "hub_repo": hub_ref(repo_id, repo_type)}
    (dest / "zarr.json").write_text(json.dumps(group, indent=2), encoding="utf-8")
    files[f"{STORE_DIR}/zarr.json"] = dest / "zarr.json"
    if not (dest / TENSORS_FILE).is_file():
        write_tensors_file(registry, mask, dest, rows)
    files[TENSORS_FILE] = dest / TENSORS_FILE
    license = license or (store.metadata.extra or {}).get("license")
    card = render_card(store.metadata, mask.name, stats, repo_id, repo_type, license)
    (dest / CARD_FILE).write_text(card, encoding="utf-8")
    files[CARD_FILE] = dest / CARD_FILE
    sha = digests(files) if digests else {p: sha256_file(f) for p, f in files.items()}
    doc = {
        "kind": HUB_KIND,
        "schema_version": HUB_SCHEMA_VERSION,
        "store": STORE_DIR,
        "mask": group["attributes"],
        "files": {p: {"sha256": sha[p], "size": f.stat().st_size}
                  for p, f in sorted(files.items())},
    }
    (dest / METADATA_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n",
                                      encoding="utf-8")
    files[METADATA_FILE] = dest / METADATA_FILE
    return files


class _Preparation:
    """The registry's part of a push, run on a worker thread while the main thread imports
    and sets up huggingface_hub (~0.2 CPU-s, most of a small push): the mask looked up on
    one read connection (DuckDB opens it without holding the GIL), its ``tensors.parquet``
    staged, then its store validated. The checks keep their order: a mask that is not
    found wins over a bad repo id, which wins over anything the staging meets."""

    def __init__(self, pool: ThreadPoolExecutor, registry: Home, ref: str) -> None:
        """Start the lookup on ``pool`` (one worker: the tasks run in order)."""
        self.registry = registry
        self._found: Future[MaskRecord] = Future()
        self._go: Future[bool] = Future()
        self._cancelled = threading.Event()  # set by discard: the validation stops early
        self._staged = pool.submit(self._stage, ref)
        self._checked = pool.submit(self._validate)  # next on the worker, once staged

    def _stage(self, ref: str) -> tuple[MaskRecord, Path] | None:
        """(worker) Find the mask; once :meth:`proceed` says so, stage its tensors.parquet
        on the same connection and return ``(mask, staging directory)``."""
        registry = self.registry
        try:
            with registry.index.connect(write=False):
                mask = registry.get(ref)
                if is_url(mask.path):
                    raise UsageError(f"mask {ref!r} is stored at {mask.path}; push publishes "
                                     "local stores only (copy it under HOME/masks first)")
                self._found.set_result(mask)
                if not self._go.result():
                    return None
                stage = registry.staging_path(f"push-{mask.id}")
                remove_tree(stage)
                try:
                    with environment_errors(stage):  # the repo's files are staged in tmp/
                        write_tensors_file(registry, mask, stage)
                except BaseException:
                    remove_tree(stage)
                    raise
        except BaseException as exc:
            if not self._found.done():
                self._found.set_exception(exc)
            raise
        return mask, stage

    def _validate(self) -> None:
        """(worker) Validate the staged mask's store (nothing when the staging failed)."""
        try:
            done = self._staged.result()
        except BaseException:
            return
        if done is not None:
            done[0].store.validate(stop=self._cancelled.is_set)

    def proceed(self, ok: bool) -> None:
        """Tell the worker whether to stage (False: the main thread's checks failed)."""
        if not self._go.done():
            self._go.set_result(ok)

    def lookup_error(self) -> None:
        """Raise the lookup's error, if it met one (waiting for it)."""
        self._found.result()

    def staged(self) -> tuple[MaskRecord, Path]:
        """``(mask, staging directory)``, waiting for the worker (which then validates the
        store, :meth:`validated`)."""
        done = self._staged.result()
        assert done is not None
        return done

    def validated(self) -> None:
        """Wait for the store's validation; raise its error."""
        self._checked.result()

    def discard(self) -> None:
        """After a failure (a Ctrl-C too): stop the worker's validation at the next array,
        let it finish, and remove what it staged."""
        self._cancelled.set()
        self.proceed(False)
        try:
            done = self._staged.result()
        except BaseException:
            return
        try:
            self._checked.result()
        except BaseException:
            pass
        if done is not None:
            remove_tree(done[1])


def push(registry: Home, ref: str, repo_id: str, *, private: bool = False,
         revision: str | None = None, commit_message: str | None = None,
         repo_type: str = "model", license: str | None = None,
         token: str | None = None, notice: Callable[[str], None] | None = None,
         progress: bool = True) -> PushResult:
    """Upload mask ``ref`` to ``repo_id`` in one commit, creating the repo (and the branch
    ``revision``) if needed, and record the repo and commit in the index.

    Pushing an unchanged mask again makes no commit (``changed=False``). ``token`` defaults
    to huggingface_hub's (``HF_TOKEN`` or the stored login).
    ``notice`` and ``progress``: as for :func:`maskhub.hub.pull.pull`.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="maskhub-push") as pool:
        prep = _Preparation(pool, registry, ref)
        try:
            with hub_messages(notice, progress):
                return _push(registry, prep, repo_id, private=private, revision=revision,
                             commit_message=commit_message, repo_type=repo_type,
                             license=license, token=token)
        except BaseException:
            prep.discard()
            raise


def _push(registry: Home, prep: _Preparation, repo_id: str, *, private: bool = False,
         revision: str | None = None, commit_message: str | None = None,
         repo_type: str = "model", license: str | None = None,
         token: str | None = None) -> PushResult:
    """:func:`push`, huggingface_hub's messages already routed and the registry's part
    started (``prep``)."""
    # One read connection for the mask, its rows and its tensors.parquet (on the worker);
    # one write at the end records the commit (a connection costs ~25 ms of CPU, and no
    # lock is held while the files upload).
    try:
        check_repo(repo_id, repo_type)
        if is_offline():
            raise HubError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set and pushing "
                           "needs the network (unset HF_HUB_OFFLINE)", repo_id)
    except BaseException:
        prep.proceed(False)
        prep.lookup_error()  # a mask that is not found wins, as it always did
        raise
    prep.proceed(True)
    # huggingface_hub's client is imported and built while the worker stages and validates
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    branch = revision or "main"
    api = hf_api(token)
    mask, stage = prep.staged()
    try:
        prep.validated()  # never publish a store that disagrees with its own metadata
        with _write_errors(repo_id, branch):
            api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
            if branch != "main":
                api.create_branch(repo_id, branch=branch, repo_type=repo_type, exist_ok=True)
            info = api.repo_info(repo_id, revision=branch, repo_type=repo_type)
        head = info.sha
        # A license set by an earlier push (or on the Hub) stays unless a new one is given.
        card = info.card_data.to_dict() if getattr(info, "card_data", None) else {}
        license = license or as_str(card.get("license"))
        adds: dict[str, Any] = {}

        def digests(files: dict[str, Path]) -> dict[str, str]:
            # The operations huggingface_hub uploads, hashed here (in parallel, as it would):
            # their hashes go into maskhub.json and the upload does not hash them again.
            from concurrent.futures import ThreadPoolExecutor

            from maskhub.kernels.threads import available_cpus

            for p, f in files.items():
                adds[p] = CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f))
            with ThreadPoolExecutor(max(2, available_cpus())) as pool:
                hexes = pool.map(lambda op: op.upload_info.sha256.hex(), adds.values())
                return dict(zip(adds, hexes, strict=True))

        with environment_errors(stage):  # the repo's files are staged in the home's tmp/
            files = write_repo_files(registry, mask, stage, repo_id, repo_type, license,
                                     digests)
        n_bytes = sum(f.stat().st_size for f in files.values())
        remote = {s.rfilename for s in info.siblings or []}
        stale = sorted(p for p in remote if p.startswith(STORE_DIR + "/") and p not in files)
        ops: list[Any] = [adds.get(p) or CommitOperationAdd(path_in_repo=p,
                                                            path_or_fileobj=str(f))
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
