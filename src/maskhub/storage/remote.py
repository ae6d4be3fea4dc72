"""Mask stores at a URL (``s3://bucket/prefix``...) through fsspec, as zarr supports them.

A store root given as a URL holds the same layout as a local home's ``masks/`` directory:
``<root>/masks/<id>.zarr/``. Object stores have no atomic rename, so a remote store is
written directly under its final key prefix and becomes visible only when its row is
inserted into the (always local) DuckDB index: the index row is the commit point. A failed
write deletes the prefix; nothing half-written is ever registered.

Endpoint and credentials come from the filesystem's own configuration: for ``s3://`` that
is s3fs/botocore's (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ``~/.aws/config``...). ``MASKHUB_STORAGE_OPTIONS``
may hold a JSON object of extra fsspec options (e.g. ``{"anon": true}``).

fsspec and the protocol's library (s3fs) are imported here only, on first use.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from maskhub.errors import MaskStoreError, UsageError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
#: Extras that bring a protocol's fsspec implementation.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}


def is_url(location: object) -> bool:
    """True when ``location`` is a URL with a scheme other than ``file://``."""
    return isinstance(location, str) and bool(_URL.match(location)) \
        and not location.startswith("file://")


def join(url: str, *parts: str) -> str:
    """``url`` with ``parts`` appended, one ``/`` between each."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def storage_options() -> dict[str, Any]:
    """Extra fsspec options from ``MASKHUB_STORAGE_OPTIONS`` (a JSON object), if set."""
    raw = os.environ.get("MASKHUB_STORAGE_OPTIONS")
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"MASKHUB_STORAGE_OPTIONS is not valid JSON: {exc}") from None
    if not isinstance(opts, dict):
        raise UsageError("MASKHUB_STORAGE_OPTIONS must be a JSON object")
    return opts


def _missing(url: str, exc: ImportError) -> UsageError:
    scheme = url.split("://", 1)[0].lower()
    extra = _EXTRAS.get(scheme)
    hint = f"pip install 'maskhub[{extra}]'" if extra == "s3" else \
        f"install the fsspec implementation of {scheme}://"
    return UsageError(f"a {scheme}:// mask store needs {exc.name or 'fsspec'}: {hint}")


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` of ``url``; a one-line error when the library
    for its protocol is missing or the URL is malformed."""
    try:
        import fsspec
    except ImportError as exc:
        raise _missing(url, exc) from None
    try:
        fs, path = fsspec.url_to_fs(url, **storage_options())
    except ImportError as exc:
        raise _missing(url, exc) from None
    except ValueError as exc:
        scheme = url.split("://", 1)[0]
        if "protocol" in str(exc).lower():
            raise UsageError(f"unknown storage protocol {scheme!r} in {url!r}") from None
        raise UsageError(f"bad store URL {url!r}: {exc}") from None
    return fs, path.rstrip("/")


def zarr_store(url: str, read_only: bool) -> Any:
    """A zarr ``FsspecStore`` rooted at ``url``."""
    from zarr.storage import FsspecStore

    filesystem(url)  # the library check and the one-line errors
    try:
        return FsspecStore.from_url(url, storage_options=storage_options() or None,
                                    read_only=read_only)
    except ImportError as exc:
        raise _missing(url, exc) from None


def put_files(url: str, files: Mapping[str, bytes]) -> None:
    """Write ``{relative key: bytes}`` under ``url`` (concurrently where fsspec can)."""
    if not files:
        return
    fs, root = filesystem(url)
    try:
        fs.pipe({f"{root}/{key}": data for key, data in files.items()})
    except OSError as exc:
        raise OSError(f"cannot write to {url}: {exc}") from exc


def list_keys(url: str) -> list[str]:
    """Every key under ``url``, relative to it (empty when nothing is there)."""
    fs, root = filesystem(url)
    fs.invalidate_cache(root)
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return []
    return [k[len(root) + 1:] for k in found if k.startswith(root + "/")]


def list_names(url: str) -> list[str]:
    """The names of the entries directly under ``url`` (keys and prefixes; empty when nothing
    is there)."""
    fs, root = filesystem(url)
    fs.invalidate_cache(root)
    try:
        found = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    return sorted({str(k).rstrip("/").rsplit("/", 1)[-1] for k in found} - {""})


def remove_keys(url: str, keys: list[str]) -> None:
    """Delete the given keys (relative to ``url``)."""
    if keys:
        fs, root = filesystem(url)
        fs.rm([f"{root}/{k}" for k in keys])
        fs.invalidate_cache(root)


def remove_prefix(url: str) -> None:
    """Delete everything under ``url`` (no error when nothing is there)."""
    fs, root = filesystem(url)
    fs.invalidate_cache(root)
    try:
        fs.rm(root, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(root)


def check_writable(url: str) -> None:
    """Fail early, with one line, when the store root cannot be reached (no bucket, no
    endpoint, bad credentials)."""
    fs, root = filesystem(url)
    bucket = root.split("/", 1)[0]
    try:
        if not fs.exists(bucket):
            raise UsageError(f"store {url!r}: bucket or directory {bucket!r} does not exist")
    except UsageError:
        raise
    except Exception as exc:  # botocore/aiohttp errors: connection, auth
        text = str(exc).strip().splitlines()
        raise MaskStoreError(f"store {url!r} is not reachable: "
                             f"{text[0] if text else type(exc).__name__}", url) from None
