"""An in-process fake of the Hugging Face Hub HTTP protocol, for tests.

`HubServer` speaks enough of the Hub's protocol for the *real* `huggingface_hub` client
(2.x, with `HF_HUB_DISABLE_XET=1`) to create repos, upload (regular and LFS files), commit,
list, search and download, with no mocking of the client. It runs on 127.0.0.1 on an
ephemeral port in a background thread and keeps everything in memory.

Endpoints (``{t}``: ``models``/``datasets``/``spaces``; ``{p}``: ``""``/``datasets/``/``spaces/``):

- ``POST /api/repos/create``, ``DELETE /api/repos/delete``
- ``GET /api/whoami-v2``, ``POST /api/validate-yaml``
- ``GET /api/{t}`` (search: ``filter``, ``search``, ``author``, ``limit``, ``sort``, ``direction``)
- ``GET /api/{t}/{repo}`` and ``GET /api/{t}/{repo}/revision/{rev}`` (repo info)
- ``POST /api/{t}/{repo}/preupload/{rev}``, ``POST /api/{t}/{repo}/commit/{rev}`` (ndjson)
- ``GET /api/{t}/{repo}/tree/{rev}[/{path}]``, ``POST /api/{t}/{repo}/paths-info/{rev}``
- ``GET /api/{t}/{repo}/refs``, ``GET /api/{t}/{repo}/commits/{rev}``
- ``POST|DELETE /api/{t}/{repo}/branch/{branch}``, ``POST|DELETE /api/{t}/{repo}/tag/{rev|tag}``
- ``POST /{p}{repo}.git/info/lfs/objects/batch`` and ``.../verify`` (basic transfer)
- ``PUT /lfs-upload/{ticket}`` (the "presigned" upload URL handed out by the batch API)
- ``GET|HEAD /{p}{repo}/resolve/{rev}/{path}`` (with ``Range`` support)

Semantics worth knowing:

- A new repo gets an initial commit holding a ``.gitattributes`` file, like the real Hub.
- Revisions: branch names, tag names, ``refs/heads/X``, ``refs/tags/X``, ``refs/pr/N`` and
  full or (unique, >= 7 chars) abbreviated commit ids.
- A file is stored as LFS when it is larger than ``lfs_threshold`` bytes, when its first 512
  bytes contain a NUL byte, or when its extension is a usual LFS one (``.safetensors``...).
- ETag of a regular file: its git blob sha1; of an LFS file: its sha256 (also sent as
  ``X-Linked-Etag``, with ``X-Linked-Size``). Files are served directly (no CDN redirect).
- Auth: with ``require_token`` set, every write needs ``Authorization: Bearer <token>``
  (else 401 "Invalid credentials in Authorization header"). Private repos are readable only
  with a valid token (with no ``require_token``: any bearer token); otherwise 401 with
  ``X-Error-Code: RepoNotFound``, as the real Hub does. The LFS ``PUT`` needs no token (it
  stands for a presigned storage URL).
- Errors are JSON ``{"error": ...}`` with the ``X-Error-Code`` header the client maps to its
  exceptions: ``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``.
- The model card's YAML front matter (README.md) is parsed with PyYAML (a dependency of
  huggingface_hub) into ``cardData``; repo ``tags`` = card ``tags`` + ``library_name`` +
  ``base_model:<id>`` + ``dataset:<id>`` + ``license:<id>``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_TYPES_BY_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_EXTENSIONS = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npy", ".npz",
    ".pkl", ".pickle", ".parquet", ".arrow", ".zst", ".zip", ".gz", ".tar", ".7z", ".tflite",
)  # fmt: skip
GITATTRIBUTES = "".join(
    f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_EXTENSIONS
).encode()
FAULT_KINDS = frozenset({"upload", "commit", "commit_response", "download", "download_short"})
"""Faults for `HubServer.fail_next`:

- ``upload``: the next LFS ``PUT``: read half of the body, then drop the connection. The client
  retries LFS PUTs itself (5 retries, backoff 1, 2, 4, 8, 8 s), so one such fault only costs
  one second and shows as a second ``PUT`` in the log.
- ``commit``: the next commit ``POST``: read the body, make *no* commit, drop the connection
  without a response. The client does not retry commits: the call raises.
- ``commit_response``: the next commit is *made*, but the connection is dropped instead of
  the response (the client raises although the commit exists).
- ``download``: the next resolve ``GET``: send the headers and half of the body, then drop.
  The client resumes with a ``Range`` request after one second.
- ``download_short``: the next resolve ``GET`` answers with a consistent but truncated body
  (``Content-Length`` = half); the client raises ``OSError("Consistency check failed...")``.
"""
DEFAULT_USER = "testuser"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


class HubError(Exception):
    """An HTTP error answered by the fake Hub, in the real Hub's format."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


# ----------------------------------------------------------------------------------------------
# Hashing and card helpers
# ----------------------------------------------------------------------------------------------


def git_blob_oid(data: bytes) -> str:
    """Git's blob sha1 of ``data`` (what the Hub calls ``oid``/``blobId`` of a regular file)."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS object."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    ).encode()


def is_lfs_candidate(path: str, size: int, sample: bytes, threshold: int) -> bool:
    """Whether the Hub would store a file as LFS (large, binary-looking, or LFS extension)."""
    return size > threshold or b"\x00" in sample[:512] or path.lower().endswith(LFS_EXTENSIONS)


_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


def parse_card(readme: bytes) -> dict[str, Any] | None:
    """The YAML front matter of a model card, or None when absent or not a mapping."""
    match = _FRONT_MATTER.match(readme.decode("utf-8", errors="replace"))
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def card_tags(card: Mapping[str, Any] | None) -> list[str]:
    """Repo tags derived from card data, like the Hub's (tags, library, base model, ...)."""
    if not card:
        return []
    tags = _as_list(card.get("tags")) + _as_list(card.get("library_name"))
    tags += [f"base_model:{b}" for b in _as_list(card.get("base_model"))]
    tags += [f"dataset:{d}" for d in _as_list(card.get("datasets"))]
    tags += [f"license:{lic}" for lic in _as_list(card.get("license"))]
    return list(dict.fromkeys(tags))


# ----------------------------------------------------------------------------------------------
# Storage model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredFile:
    """One file of one commit. ``blob_key`` points into `HubState.blobs`."""

    path: str
    size: int
    sha256: str
    git_oid: str
    lfs: bool
    blob_key: str

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "type": "file",
            "oid": self.git_oid,
            "size": self.size,
            "path": self.path,
        }
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    def sibling(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"rfilename": self.path, "size": self.size, "blobId": self.git_oid}
        if self.lfs:
            entry["lfs"] = {
                "sha256": self.sha256,
                "size": self.size,
                "pointerSize": self.pointer_size,
            }
        return entry


@dataclass
class Commit:
    """An immutable snapshot (``files`` only changes through `HubServer.tamper`)."""

    oid: str
    parents: tuple[str, ...]
    title: str
    message: str
    date: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    """A repository: commits, branches, tags and the LFS objects uploaded to it."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs_oids: set[str] = field(default_factory=set)
    pr_count: int = 0

    @property
    def url_path(self) -> str:
        return URL_PREFIXES[self.repo_type] + self.repo_id

    def resolve(self, revision: str) -> Commit:
        """The commit a branch, tag, ref or (abbreviated) commit id points to."""
        for prefix, table in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if revision.startswith(prefix) and revision[len(prefix) :] in table:
                return self.commits[table[revision[len(prefix) :]]]
        for table in (self.branches, self.tags):
            if revision in table:
                return self.commits[table[revision]]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [oid for oid in self.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return self.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def history(self, commit: Commit) -> list[Commit]:
        """First-parent history, newest first."""
        out = [commit]
        while out[-1].parents:
            out.append(self.commits[out[-1].parents[0]])
        return out

    def last_commit_touching(self, commit: Commit, path: str) -> Commit:
        """The newest commit (first-parent) that changed ``path``."""
        current = commit
        while current.parents:
            parent = self.commits[current.parents[0]]
            if parent.files.get(path) != current.files.get(path):
                return current
            current = parent
        return current


# A commit operation: ("add", StoredFile) | ("delete_file", path) | ("delete_folder", path)
CommitOp = tuple[str, Any]


class HubState:
    """All repos and blobs, plus the git-like logic. Not thread-safe: callers hold `lock`."""

    def __init__(self, *, user: str, lfs_threshold: int, require_token: str | None) -> None:
        self.lock = threading.RLock()
        self.user = user
        self.lfs_threshold = lfs_threshold
        self.require_token = require_token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.uploads: dict[str, tuple[str, str, str, int]] = {}  # ticket -> (type, id, oid, size)
        self._last_time = datetime.now(timezone.utc)
        self._sequence = 0

    # -- time and ids ---------------------------------------------------------------------------

    def now(self) -> str:
        """A strictly increasing ISO-8601 UTC timestamp (millisecond resolution)."""
        moment = max(datetime.now(timezone.utc), self._last_time + timedelta(milliseconds=1))
        self._last_time = moment
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

    def _commit_oid(
        self, parents: Iterable[str], files: Mapping[str, StoredFile], title: str
    ) -> str:
        self._sequence += 1
        listing = sorted((path, f.git_oid) for path, f in files.items())
        payload = json.dumps([list(parents), listing, title, self._sequence, self.now()])
        return hashlib.sha1(payload.encode()).hexdigest()

    # -- blobs ----------------------------------------------------------------------------------

    def store_file(self, path: str, data: bytes, *, lfs: bool | None = None) -> StoredFile:
        """Store ``data`` and describe it as the file ``path`` (LFS decided if not given)."""
        if lfs is None:
            lfs = len(data) > 0 and is_lfs_candidate(path, len(data), data, self.lfs_threshold)
        sha256 = hashlib.sha256(data).hexdigest()
        self.blobs[sha256] = data
        git_oid = git_blob_oid(lfs_pointer(sha256, len(data)) if lfs else data)
        return StoredFile(path, len(data), sha256, git_oid, lfs, blob_key=sha256)

    def lfs_file(self, repo: Repo, path: str, oid: str, size: int | None) -> StoredFile:
        """Describe an already uploaded LFS object as the file ``path``."""
        data = self.blobs.get(oid)
        if oid not in repo.lfs_oids or data is None:
            raise HubError(422, f"LFS object {oid} for '{path}' was never uploaded to this repo")
        if size is not None and size != len(data):
            raise HubError(422, f"LFS object {oid}: size {size} != uploaded size {len(data)}")
        return StoredFile(
            path, len(data), oid, git_blob_oid(lfs_pointer(oid, len(data))), True, oid
        )

    def read(self, stored: StoredFile) -> bytes:
        return self.blobs[stored.blob_key]

    def card_of(self, commit: Commit) -> dict[str, Any] | None:
        readme = commit.files.get("README.md")
        return parse_card(self.read(readme)) if readme is not None else None

    # -- repos ----------------------------------------------------------------------------------

    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, *, private: bool) -> Repo:
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, f"You already created this {repo_type} repo")
        repo = Repo(repo_type, repo_id, private, created_at=self.now())
        initial = self.store_file(".gitattributes", GITATTRIBUTES, lfs=False)
        files = {initial.path: initial}
        oid = self._commit_oid((), files, "initial commit")
        repo.commits[oid] = Commit(oid, (), "initial commit", "", self.now(), files)
        repo.branches["main"] = oid
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        self.get_repo(repo_type, repo_id)
        del self.repos[(repo_type, repo_id)]

    # -- commits --------------------------------------------------------------------------------

    def commit(
        self,
        repo: Repo,
        branch: str,
        ops: Iterable[CommitOp],
        *,
        title: str,
        message: str = "",
        parent: str | None = None,
    ) -> Commit:
        """Apply ``ops`` in order on top of ``branch`` and move the branch to the new commit."""
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
        head = repo.commits[repo.branches[branch]]
        if parent is not None and not head.oid.startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for kind, value in ops:
            _apply_op(files, kind, value)
        oid = self._commit_oid((head.oid,), files, title)
        commit = Commit(oid, (head.oid,), title, message, self.now(), files)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit


def _apply_op(files: dict[str, StoredFile], kind: str, value: Any) -> None:
    """Apply one commit operation to a mutable file table."""
    if kind == "add":
        files[value.path] = value
    elif kind == "delete_file":
        if value not in files:
            raise HubError(404, f"A file with this name doesn't exist: {value}", "EntryNotFound")
        del files[value]
    elif kind == "delete_folder":
        prefix = value.strip("/") + "/"
        doomed = [path for path in files if path.startswith(prefix)]
        if not doomed:
            raise HubError(404, f"A folder with this name doesn't exist: {value}", "EntryNotFound")
        for path in doomed:
            del files[path]
    else:
        raise HubError(400, f"Unknown commit operation {kind!r}")


def list_tree(commit: Commit, path: str, recursive: bool) -> list[dict[str, Any]]:
    """Tree entries under ``path`` (folders first), like ``GET /api/.../tree``."""
    prefix = f"{path}/" if path else ""
    folders: set[str] = set()
    files: list[StoredFile] = []
    for file_path, stored in commit.files.items():
        if not file_path.startswith(prefix):
            continue
        parts = file_path[len(prefix) :].split("/")
        if len(parts) == 1:
            files.append(stored)
            continue
        depth = len(parts) - 1 if recursive else 1
        for i in range(1, depth + 1):
            folders.add(prefix + "/".join(parts[:i]))
        if recursive:
            files.append(stored)
    entries = [folder_entry(commit, folder) for folder in sorted(folders)]
    return entries + [f.tree_entry() for f in sorted(files, key=lambda f: f.path)]


def folder_entry(commit: Commit, path: str) -> dict[str, Any]:
    oid = hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest()
    return {"type": "directory", "oid": oid, "path": path}


def is_folder(commit: Commit, path: str) -> bool:
    return any(p.startswith(path.rstrip("/") + "/") for p in commit.files)


# ----------------------------------------------------------------------------------------------
# HTTP plumbing: requests, responses, routes
# ----------------------------------------------------------------------------------------------


@dataclass
class Request:
    """A parsed HTTP request, with a lazily read body."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    read_body: Callable[[], bytes]

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return (self.arg(name) or "").lower() in ("1", "true", "yes")

    def json(self) -> Any:
        body = self.read_body()
        try:
            return json.loads(body) if body else {}
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    @property
    def token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        if not auth.startswith("Bearer "):
            return None
        return auth[len("Bearer ") :].strip() or None


@dataclass
class Response:
    """What to answer. ``drop_after`` / ``truncate`` implement the injected faults."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None  # read this many body bytes, then drop without answering
    truncate: bool = False  # send headers and half of the body, then drop


def json_response(
    obj: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    body = json.dumps(obj, default=str).encode()
    return Response(status, body, {"Content-Type": "application/json", **(headers or {})})


def error_response(err: HubError) -> Response:
    headers = {"X-Error-Message": err.message.encode("ascii", "replace").decode(), **err.headers}
    if err.code:
        headers["X-Error-Code"] = err.code
    return json_response({"error": err.message, **err.extra}, err.status, headers)


@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    pattern: re.Pattern[str]
    endpoint: str
    write: bool = False


def _route(methods: str, pattern: str, endpoint: str, *, write: bool = False) -> Route:
    return Route(frozenset(methods.split()), re.compile(pattern), endpoint, write)


_API = r"^/api/(?P<type>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)"
_GIT = r"^/(?:(?P<type>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+?)\.git/info/lfs/objects"
ROUTES = (
    _route("POST", r"^/api/repos/create$", "create_repo", write=True),
    _route("DELETE", r"^/api/repos/delete$", "delete_repo", write=True),
    _route("GET", r"^/api/whoami-v2$", "whoami"),
    _route("POST", r"^/api/validate-yaml$", "validate_yaml"),
    _route("GET", r"^/api/(?P<type>models|datasets|spaces)$", "list_repos"),
    _route("GET", _API + r"$", "repo_info"),
    _route("GET", _API + r"/revision/(?P<rev>.+)$", "repo_info"),
    _route("POST", _API + r"/preupload/(?P<rev>.+)$", "preupload", write=True),
    _route("POST", _API + r"/commit/(?P<rev>.+)$", "commit", write=True),
    _route("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", "tree"),
    _route("POST", _API + r"/paths-info/(?P<rev>.+)$", "paths_info"),
    _route("GET", _API + r"/refs$", "refs"),
    _route("GET", _API + r"/commits/(?P<rev>.+)$", "commits"),
    _route("POST DELETE", _API + r"/branch/(?P<rev>.+)$", "branch", write=True),
    _route("POST DELETE", _API + r"/tag/(?P<rev>.+)$", "tag", write=True),
    _route("POST", _GIT + r"/batch$", "lfs_batch", write=True),
    _route("POST", _GIT + r"/verify$", "lfs_verify", write=True),
    _route("PUT", r"^/lfs-upload/(?P<ticket>[^/]+)$", "lfs_upload"),
    _route(
        "GET HEAD",
        r"^/(?:(?P<type>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+)"
        r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$",
        "resolve",
    ),
)


class Faults:
    """Thread-safe counters of pending injected faults."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}

    def add(self, kind: str, count: int) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"Unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        with self._lock:
            self._pending[kind] = self._pending.get(kind, 0) + count

    def take(self, kind: str) -> bool:
        with self._lock:
            if self._pending.get(kind, 0) <= 0:
                return False
            self._pending[kind] -= 1
            return True

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()


# ----------------------------------------------------------------------------------------------
# The Hub application: one method per endpoint
# ----------------------------------------------------------------------------------------------


class HubApp:
    """Routes requests to endpoint methods over a `HubState`."""

    def __init__(self, state: HubState, faults: Faults) -> None:
        self.state = state
        self.faults = faults
        self.base_url = ""
        self.errors: list[str] = []

    # -- dispatch -------------------------------------------------------------------------------

    def handle(self, req: Request) -> Response:
        """Answer one request (never raises for protocol errors)."""
        route, params = self._match(req)
        if route is None:
            return error_response(HubError(404 if params is None else 405, "Not Found"))
        if route.endpoint == "lfs_upload" and self.faults.take("upload"):
            length = int(req.headers.get("Content-Length") or 65536)
            return Response(drop_after=length // 2)
        req.read_body()  # always drain the body before answering (keep-alive)
        try:
            with self.state.lock:
                if route.write and not self._authorized(req):
                    raise HubError(401, INVALID_CREDENTIALS)
                return getattr(self, f"ep_{route.endpoint}")(req, params)
        except HubError as err:
            return error_response(err)
        except Exception as exc:  # a malformed request or a bug here: fail fast, keep a trace
            self.errors.append(f"{req.method} {req.path}: {traceback.format_exc()}")
            message = f"HubServer could not handle the request: {exc!r}"
            return error_response(HubError(400, message))

    def _match(self, req: Request) -> tuple[Route | None, dict[str, str] | None]:
        method_mismatch = False
        for route in ROUTES:
            match = route.pattern.match(req.path)
            if match is None:
                continue
            if req.method not in route.methods:
                method_mismatch = True
                continue
            params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            return route, params
        return None, ({} if method_mismatch else None)

    # -- auth and lookups -----------------------------------------------------------------------

    def _authorized(self, req: Request) -> bool:
        required = self.state.require_token
        return True if required is None else req.token == required

    def _authenticated(self, req: Request) -> bool:
        required = self.state.require_token
        return req.token is not None if required is None else req.token == required

    def _repo(self, req: Request, params: Mapping[str, str]) -> Repo:
        repo_type = REPO_TYPES_BY_PLURAL.get(params.get("type", "models"), "model")
        repo = self.state.get_repo(repo_type, f"{params['ns']}/{params['name']}")
        if repo.private and not self._authenticated(req):
            raise HubError(401, "Repository not found", code="RepoNotFound")
        return repo

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.base_url}/{repo.url_path}"

    # -- repos ----------------------------------------------------------------------------------

    def ep_create_repo(self, req: Request, params: Mapping[str, str]) -> Response:
        payload = req.json()
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        repo_id = f"{payload.get('organization') or self.state.user}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.base_url}/{URL_PREFIXES[repo_type]}{repo_id}"
        try:
            self.state.create_repo(repo_type, repo_id, private=private)
        except HubError as err:
            err.extra["url"] = url
            raise
        return json_response({"url": url, "name": repo_id, "id": repo_id})

    def ep_delete_repo(self, req: Request, params: Mapping[str, str]) -> Response:
        payload = req.json()
        repo_id = f"{payload.get('organization') or self.state.user}/{payload['name']}"
        self.state.delete_repo(payload.get("type") or "model", repo_id)
        return json_response({})

    def ep_whoami(self, req: Request, params: Mapping[str, str]) -> Response:
        if not self._authenticated(req):
            raise HubError(401, INVALID_CREDENTIALS)
        token_info = {"displayName": "test-token", "role": "write", "createdAt": self.state.now()}
        return json_response(
            {
                "type": "user",
                "id": hashlib.sha1(self.state.user.encode()).hexdigest()[:24],
                "name": self.state.user,
                "fullname": "Test User",
                "email": f"{self.state.user}@example.com",
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": token_info},
            }
        )

    def ep_validate_yaml(self, req: Request, params: Mapping[str, str]) -> Response:
        content = str(req.json().get("content", ""))
        match = _FRONT_MATTER.match(content)
        if match is not None:
            try:
                yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                errors = [{"message": f"Invalid YAML: {err}"}]
                return json_response({"errors": errors, "warnings": []}, 400)
        return json_response({"errors": [], "warnings": []})

    def _info(self, repo: Repo, commit: Commit, *, siblings: bool, card: bool) -> dict[str, Any]:
        card_data = self.state.card_of(commit)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": card_tags(card_data),
            "usedStorage": sum(f.size for f in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            info["library_name"] = (card_data or {}).get("library_name")
            info["pipeline_tag"] = (card_data or {}).get("pipeline_tag")
        if card and card_data is not None:
            info["cardData"] = card_data
        if siblings:
            info["siblings"] = [f.sibling() for f in sorted(commit.files.values(), key=_path)]
        return info

    def ep_repo_info(self, req: Request, params: Mapping[str, str]) -> Response:
        repo = self._repo(req, params)
        commit = repo.resolve(params.get("rev", "main"))
        return json_response(self._info(repo, commit, siblings=True, card=True))

    def ep_list_repos(self, req: Request, params: Mapping[str, str]) -> Response:
        repo_type = REPO_TYPES_BY_PLURAL[params["type"]]
        filters = [f for value in req.query.get("filter", []) for f in value.split(",") if f]
        search, author = (req.arg("search") or "").lower(), req.arg("author")
        full = req.flag("full")
        items = []
        for repo in self.state.repos.values():
            if repo.repo_type != repo_type or (repo.private and not self._authenticated(req)):
                continue
            info = self._info(repo, repo.resolve("main"), siblings=full, card=True)
            if author and info["author"] != author:
                continue
            if search not in repo.repo_id.lower() or not set(filters) <= set(info["tags"]):
                continue
            items.append(info)
        sort_key = {"lastModified": "lastModified", "createdAt": "createdAt"}.get(
            req.arg("sort", "")
        )
        if sort_key:
            items.sort(key=lambda item: item[sort_key], reverse=req.arg("direction") == "-1")
        limit = req.arg("limit")
        return json_response(items[: int(limit)] if limit else items)

    # -- uploads and commits --------------------------------------------------------------------

    def ep_preupload(self, req: Request, params: Mapping[str, str]) -> Response:
        repo = self._repo(req, params)
        commit = repo.resolve(params["rev"])
        answers = []
        for item in req.json().get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            sample = base64.b64decode(item.get("sample", ""))
            lfs = size > 0 and is_lfs_candidate(path, size, sample, self.state.lfs_threshold)
            answer = {
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
            }
            existing = commit.files.get(path)
            if existing is not None:
                answer["oid"] = existing.sha256 if existing.lfs else existing.git_oid
            answers.append(answer)
        return json_response({"files": answers, "commitOid": commit.oid})

    def ep_commit(self, req: Request, params: Mapping[str, str]) -> Response:
        repo = self._repo(req, params)
        if self.faults.take("commit"):
            return Response(drop_after=0)
        lines = [json.loads(line) for line in req.read_body().splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item.get("key") == "header"), {})
        ops = [self._commit_op(repo, item) for item in lines if item.get("key") != "header"]
        branch, pr_url = params["rev"], None
        if req.flag("create_pr"):
            repo.pr_count += 1
            branch = f"refs/pr/{repo.pr_count}"
            repo.branches[branch] = repo.resolve(params["rev"]).oid
            pr_url = f"{self._repo_url(repo)}/discussions/{repo.pr_count}"
        commit = self.state.commit(
            repo,
            branch,
            ops,
            title=header.get("summary", ""),
            message=header.get("description", ""),
            parent=header.get("parentCommit"),
        )
        if self.faults.take("commit_response"):
            return Response(drop_after=0)
        return json_response(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
                "commitMessage": commit.title,
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def _commit_op(self, repo: Repo, item: Mapping[str, Any]) -> CommitOp:
        key, value = item.get("key"), item.get("value") or {}
        if key == "file":
            content = value.get("content", "")
            is_b64 = value.get("encoding") == "base64"
            data = base64.b64decode(content) if is_b64 else content.encode()
            return ("add", self.state.store_file(value["path"], data, lfs=False))
        if key == "lfsFile":
            stored = self.state.lfs_file(repo, value["path"], value["oid"], value.get("size"))
            return ("add", stored)
        if key == "deletedFile":
            return ("delete_file", value["path"])
        if key == "deletedFolder":
            return ("delete_folder", value["path"])
        raise HubError(400, f"Unknown commit line key {key!r}")

    def ep_lfs_batch(self, req: Request, params: Mapping[str, str]) -> Response:
        repo = self._repo(req, params)
        payload = req.json()
        if payload.get("operation") != "upload":
            raise HubError(400, "This test Hub only implements the 'upload' LFS operation")
        objects = [
            self._batch_object(repo, obj["oid"], int(obj["size"])) for obj in payload["objects"]
        ]
        body = {"transfer": "basic", "objects": objects}
        return json_response(body, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _batch_object(self, repo: Repo, oid: str, size: int) -> dict[str, Any]:
        answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            answer["error"] = {"code": 422, "message": "oid must be a sha256 hex digest"}
        elif oid not in repo.lfs_oids or len(self.state.blobs.get(oid, b"")) != size:
            ticket = secrets.token_hex(12)
            self.state.uploads[ticket] = (repo.repo_type, repo.repo_id, oid, size)
            verify = f"{self._repo_url(repo)}.git/info/lfs/objects/verify"
            answer["actions"] = {
                "upload": {"href": f"{self.base_url}/lfs-upload/{ticket}"},
                "verify": {"href": verify},
            }
        return answer

    def ep_lfs_upload(self, req: Request, params: Mapping[str, str]) -> Response:
        ticket = self.state.uploads.get(params["ticket"])
        if ticket is None:
            raise HubError(404, "Unknown or expired upload URL")
        repo_type, repo_id, oid, size = ticket
        data = req.read_body()
        if len(data) != size:
            raise HubError(400, f"Size mismatch: got {len(data)} bytes, expected {size}")
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "sha256 of the uploaded content does not match the oid")
        self.state.blobs[oid] = data
        self.state.get_repo(repo_type, repo_id).lfs_oids.add(oid)
        return Response(200, b"", {"ETag": f'"{oid}"'})

    def ep_lfs_verify(self, req: Request, params: Mapping[str, str]) -> Response:
        repo = self._repo(req, params)
        payload = req.json()
        oid, size = payload.get("oid"), payload.get("size")
        if oid not in repo.lfs_oids or len(self.state.blobs.get(oid, b"")) != size:
            raise HubError(404, f"LFS object {oid} not found")
        return json_response({"oid": oid, "size": size})

    # -- listing --------------------------------------------------------------------------------

    def ep_tree(self, req: Request, params: Mapping[str, str]) -> Response:
        repo = self._repo(req, params)
        commit = repo.resolve(params["rev"])
        path = params.get("path", "").strip("/")
        if path and path not in commit.files and not is_folder(commit, path):
            raise HubError(404, f"{path} does not exist on {params['rev']}", "EntryNotFound")
        entries = list_tree(commit, path, recursive=req.flag("recursive"))
        if req.flag("expand"):
            for entry in entries:
                touched = repo.last_commit_touching(commit, entry["path"])
                entry["lastCommit"] = {
                    "id": touched.oid,
                    "title": touched.title,
                    "date": touched.date,
                }
        return json_response(entries)

    def ep_paths_info(self, req: Request, params: Mapping[str, str]) -> Response:
        repo = self._repo(req, params)
        commit = repo.resolve(params["rev"])
        if "json" in (req.headers.get("Content-Type") or ""):
            paths = _as_list(req.json().get("paths"))
        else:
            paths = parse_qs(req.read_body().decode()).get("paths", [])
        entries = []
        for path in (p.strip("/") for p in paths):
            if path in commit.files:
                entries.append(commit.files[path].tree_entry())
            elif is_folder(commit, path):
                entries.append(folder_entry(commit, path))
        return json_response(entries)

    def ep_refs(self, req: Request, params: Mapping[str, str]) -> Response:
        repo = self._repo(req, params)

        def refs(table: Mapping[str, str], prefix: str) -> list[dict[str, str]]:
            return [{"name": n, "ref": prefix + n, "targetCommit": t} for n, t in table.items()]

        branches = {n: t for n, t in repo.branches.items() if not n.startswith("refs/pr/")}
        prs = {n: t for n, t in repo.branches.items() if n.startswith("refs/pr/")}
        return json_response(
            {
                "branches": refs(branches, "refs/heads/"),
                "tags": refs(repo.tags, "refs/tags/"),
                "converts": [],
                "pullRequests": [{"name": n, "ref": n, "targetCommit": t} for n, t in prs.items()],
            }
        )

    def ep_commits(self, req: Request, params: Mapping[str, str]) -> Response:
        repo = self._repo(req, params)
        history = repo.history(repo.resolve(params["rev"]))
        return json_response(
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "authors": [{"user": self.state.user}],
                }
                for c in history
            ]
        )

    # -- refs -----------------------------------------------------------------------------------

    def ep_branch(self, req: Request, params: Mapping[str, str]) -> Response:
        repo, branch = self._repo(req, params), params["rev"]
        if req.method == "DELETE":
            if branch not in repo.branches or branch == "main":
                raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            del repo.branches[branch]
            return json_response({})
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = req.json().get("startingPoint") or "main"
        repo.branches[branch] = repo.resolve(start).oid
        return json_response({})

    def ep_tag(self, req: Request, params: Mapping[str, str]) -> Response:
        repo = self._repo(req, params)
        if req.method == "DELETE":
            if params["rev"] not in repo.tags:
                raise HubError(404, f"Invalid rev id: {params['rev']}", code="RevisionNotFound")
            del repo.tags[params["rev"]]
            return json_response({})
        tag = req.json().get("tag", "")
        if not tag:
            raise HubError(400, "Missing 'tag'")
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = repo.resolve(params["rev"]).oid
        return json_response({})

    # -- downloads ------------------------------------------------------------------------------

    def ep_resolve(self, req: Request, params: Mapping[str, str]) -> Response:
        repo = self._repo(req, params)
        commit = repo.resolve(params["rev"])
        stored = commit.files.get(params["path"])
        if stored is None:
            raise HubError(
                404,
                f"Entry not found: {params['path']}",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.oid},
            )
        data = self.state.read(stored)
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{stored.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if stored.lfs:
            headers["X-Linked-Etag"] = f'"{stored.sha256}"'
            headers["X-Linked-Size"] = str(stored.size)
        status, body = _apply_range(req.headers.get("Range"), data, headers)
        if req.method == "GET" and status < 400:
            if self.faults.take("download"):
                return Response(status, body, headers, truncate=True)
            if self.faults.take("download_short"):
                return Response(status, body[: len(body) // 2], headers)
        return Response(status, body, headers)


def _path(stored: StoredFile) -> str:
    return stored.path


def _apply_range(
    range_header: str | None, data: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    """Serve a single ``bytes=a-b`` range (206), or the whole content (200); 416 if invalid."""
    if not range_header:
        return 200, data
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", range_header)
    if match is None:
        return 200, data
    first, last = match.groups()
    size = len(data)
    if first:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    elif last:
        start, end = max(size - int(last), 0), size - 1
    else:
        return 200, data
    if start >= size or start > end:
        headers["Content-Range"] = f"bytes */{size}"
        return 416, b""
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return 206, data[start : end + 1]


# ----------------------------------------------------------------------------------------------
# The HTTP server
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    """One entry of `HubServer.request_log` (header names lower-cased).

    ``status`` is None when the server dropped the connection instead of answering.
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    status: int | None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: HubApp, log: list[RequestRecord]) -> None:
        super().__init__(address, _Handler)
        self.app = app
        self.log = log
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client hangs up; report anything else."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self.lock:
            connections = list(self.connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    """Thin HTTP layer: parse, call `HubApp.handle`, write (or sabotage) the answer."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else ~40 ms per request (Nagle + delayed ACK)
    server: _HTTPServer
    timeout = 30

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence the default stderr access log (see `HubServer.request_log`)."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._serve()

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve()

    def do_POST(self) -> None:  # noqa: N802
        self._serve()

    def do_PUT(self) -> None:  # noqa: N802
        self._serve()

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve()

    def _serve(self) -> None:
        self._body: bytes | None = None
        split = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers=self.headers,
            read_body=self._read_body,
        )
        response = self.server.app.handle(request)
        status = self._write(response)
        record = RequestRecord(
            self.command,
            unquote(split.path),
            split.query,
            {name.lower(): value for name, value in self.headers.items()},
            status,
        )
        with self.server.lock:
            self.server.log.append(record)

    def _read_body(self) -> bytes:
        if self._body is None:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                self._body = self._read_chunked()
            else:
                self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return self._body

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _write(self, response: Response) -> int | None:
        """Send ``response``; returns the status sent, or None if the connection was dropped."""
        if response.drop_after is not None:
            if self._body is None and response.drop_after > 0:
                self.rfile.read(response.drop_after)
            self._drop()
            return None
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command == "HEAD":
            return response.status
        if response.truncate:
            self.wfile.write(response.body[: len(response.body) // 2])
            self._drop()
            return None
        self.wfile.write(response.body)
        return response.status

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class HubServer:
    """A fake Hugging Face Hub on 127.0.0.1, for driving the real `huggingface_hub` client.

    Example::

        with HubServer() as hub:
            os.environ["HF_ENDPOINT"] = hub.url  # see hub_fixture.py for the full setup
            ...

    Args:
        require_token: if set, writes need ``Authorization: Bearer <require_token>`` and private
            repos are readable only with it. Can be changed while running (attribute).
        user: the namespace of repos created without an organization, and `whoami`'s name.
        lfs_threshold: files larger than this (bytes) are stored as LFS.
    """

    def __init__(
        self,
        *,
        require_token: str | None = None,
        user: str = DEFAULT_USER,
        lfs_threshold: int = 10 * 1024,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.state = HubState(user=user, lfs_threshold=lfs_threshold, require_token=require_token)
        self.faults = Faults()
        self.request_log: list[RequestRecord] = []
        self._app = HubApp(self.state, self.faults)
        self._address = (host, port)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> HubServer:
        """Bind (port 0 = ephemeral) and serve in a daemon thread. Returns self."""
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer(self._address, self._app, self.request_log)
        self._app.base_url = self.url
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"HubServer:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The endpoint to give the client, e.g. ``http://127.0.0.1:43817``."""
        return f"http://{self._address[0]}:{self.port}"

    # -- configuration --------------------------------------------------------------------------

    @property
    def require_token(self) -> str | None:
        return self.state.require_token

    @require_token.setter
    def require_token(self, token: str | None) -> None:
        self.state.require_token = token

    @property
    def user(self) -> str:
        return self.state.user

    @property
    def errors(self) -> list[str]:
        """Tracebacks of requests the server failed to handle (answered with a 400)."""
        return self._app.errors

    def fail_next(self, kind: str, count: int = 1) -> None:
        """Sabotage the next ``count`` requests of a kind; see `FAULT_KINDS` for the kinds."""
        self.faults.add(kind, count)

    def reset(self) -> None:
        """Forget all repos, blobs, pending faults and the request log."""
        with self.state.lock:
            self.state.repos.clear()
            self.state.blobs.clear()
            self.state.uploads.clear()
        self.faults.clear()
        self.request_log.clear()
        self._app.errors.clear()

    # -- inspection -----------------------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str]]:
        """``(method, path)`` of every request served so far (paths URL-decoded, no query)."""
        return [(record.method, record.path) for record in list(self.request_log)]

    def head(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """The commit id ``revision`` points to."""
        with self.state.lock:
            return self.state.get_repo(repo_type, repo_id).resolve(revision).oid

    def commit_ids(
        self, repo_id: str, revision: str = "main", *, repo_type: str = "model"
    ) -> list[str]:
        """First-parent history of ``revision``, newest first (the initial commit last)."""
        with self.state.lock:
            repo = self.state.get_repo(repo_type, repo_id)
            return [c.oid for c in repo.history(repo.resolve(revision))]

    def file_bytes(
        self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model"
    ) -> bytes:
        """The bytes served for ``path`` at ``revision``."""
        with self.state.lock:
            commit = self.state.get_repo(repo_type, repo_id).resolve(revision)
            return self.state.read(commit.files[path])

    # -- server-side setup and tampering --------------------------------------------------------

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> str:
        """Create a repo directly (no HTTP). Returns its initial commit id."""
        with self.state.lock:
            return self.state.create_repo(repo_type, repo_id, private=private).branches["main"]

    def commit_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        repo_type: str = "model",
        revision: str = "main",
        message: str = "server-side commit",
        delete: Iterable[str] = (),
    ) -> str:
        """Commit ``files`` (and delete paths) directly on a branch, creating the repo if needed.

        Handy to seed fixtures (e.g. checkpoints) without going through the client. Returns the
        new commit id.
        """
        with self.state.lock:
            if (repo_type, repo_id) not in self.state.repos:
                self.state.create_repo(repo_type, repo_id, private=False)
            repo = self.state.get_repo(repo_type, repo_id)
            ops: list[CommitOp] = [("delete_file", path) for path in delete]
            for path, data in files.items():
                stored = self.state.store_file(path, data)
                if stored.lfs:
                    repo.lfs_oids.add(stored.sha256)
                ops.append(("add", stored))
            return self.state.commit(repo, revision, ops, title=message).oid

    def tamper(
        self,
        repo_id: str,
        path: str,
        new_bytes: bytes,
        *,
        revision: str = "main",
        repo_type: str = "model",
    ) -> None:
        """Silently replace the bytes served for ``path`` in the commit ``revision`` points to.

        No commit is made and *all advertised metadata stays that of the committed content*:
        ``ETag``/``X-Linked-Etag``, ``X-Linked-Size``, tree/siblings ``size``, ``oid`` and
        ``lfs.sha256``. Only the served bytes (and so ``Content-Length``) change, simulating
        corrupted storage. Only that commit is affected, other revisions keep their bytes.
        Use ``new_bytes`` of the same length for a corruption only a sha256 check can catch (the
        client verifies sizes, not hashes); a different length makes the client raise a
        "Consistency check failed" ``OSError`` for LFS files.
        """
        with self.state.lock:
            commit = self.state.get_repo(repo_type, repo_id).resolve(revision)
            if path not in commit.files:
                raise KeyError(f"{path} not in {repo_id}@{revision}")
            key = f"tampered:{secrets.token_hex(8)}"
            self.state.blobs[key] = bytes(new_bytes)
            commit.files[path] = replace(commit.files[path], blob_key=key)
