"""Thin layer over huggingface_hub: downloads of checkpoints and error translation.

huggingface_hub honours ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME`` and ``HF_HUB_OFFLINE``
itself; maskhub never reads or prints the token.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from maskhub.errors import (
    CheckpointError,
    EnvironmentFailure,
    HubError,
    environment_failure,
)

CHECKPOINT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json"]
#: How many times huggingface_hub resumes a download whose connection dropped.
DOWNLOAD_RETRIES = 5
_DOWNLOAD_FAILED = "Error while downloading from "
_BACKOFF = re.compile(r"(Rate limited\.)?.*\[Retry (\d+)/(\d+)\]")


class _HubLog(logging.Handler):
    """huggingface_hub's log records as short lines: each retry number once ("retrying 2/5
    after a dropped connection", however many files retry in parallel), its final "Max
    retries exceeded" not at all (maskhub's one error line follows), anything else as its
    first line."""

    def __init__(self, notice: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.notice = notice
        self._lock = threading.Lock()
        self._per_url: dict[str, int] = {}
        self._shown: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:  # noqa: D102
        try:
            line = self.translate(record.getMessage())
        except Exception:  # a log message must never break a download
            return
        if line:
            self.notice(line)

    def _once(self, kind: str, n: int, total: int, reason: str) -> str | None:
        with self._lock:
            if n <= self._shown.get(kind, 0) or n > total:
                return None
            self._shown[kind] = n
        return f"retrying {n}/{total} after {reason}"

    def translate(self, message: str) -> str | None:
        """The line for one record of huggingface_hub (``None``: say nothing)."""
        first = message.strip().splitlines()[0] if message.strip() else ""
        if message.startswith(_DOWNLOAD_FAILED):
            if message.rstrip().endswith("Max retries exceeded."):
                return None
            url = message[len(_DOWNLOAD_FAILED):].split(": ", 1)[0]
            with self._lock:
                n = self._per_url[url] = self._per_url.get(url, 0) + 1
            return self._once("download", n, DOWNLOAD_RETRIES, "a dropped connection")
        if "thrown while requesting" in message:
            return None  # the "Retrying in ..." record that follows says it
        match = _BACKOFF.search(first)
        if match:
            reason = "the Hub rate-limited the request" if match.group(1) else \
                "a failed request"
            return self._once("request", int(match.group(2)), int(match.group(3)), reason)
        return first[:200] or None


@contextmanager
def hub_messages(notice: Callable[[str], None] | None = None, progress: bool = True
                 ) -> Iterator[None]:
    """While the block runs, what huggingface_hub logs or warns goes to ``notice`` as short
    lines (see :class:`_HubLog`) instead of its own stderr handler; ``notice=None``: to the
    ``maskhub.hub`` logger. ``progress=False`` also hides its progress bars. For ``--quiet``,
    pass a ``notice`` that discards."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from huggingface_hub.utils import logging as hf_logging

    handler = _HubLog(notice or logging.getLogger("maskhub.hub").warning)
    logger = hf_logging.get_logger()
    saved, propagate = logger.handlers[:], logger.propagate
    for h in saved:
        logger.removeHandler(h)
    logger.addHandler(handler)
    logger.propagate = False
    hide_bars = not progress and not are_progress_bars_disabled()
    if hide_bars:
        disable_progress_bars()
    with warnings.catch_warnings():
        show = warnings.showwarning

        def showwarning(message: Any, category: type[Warning], filename: str, lineno: int,
                        file: Any = None, line: str | None = None) -> None:
            if "huggingface_hub" in filename:
                text = str(message).strip().splitlines()
                handler.notice(f"warning: {text[0] if text else category.__name__}")
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        try:
            with offline_if_unresolvable():
                yield
        finally:
            logger.removeHandler(handler)
            for h in saved:
                logger.addHandler(h)
            logger.propagate = propagate
            if hide_bars:
                enable_progress_bars()


# -- issue 26: no retries against a Hub whose name does not resolve ----------------------

#: The Hub host found unresolvable by :func:`offline_if_unresolvable` while its block runs.
_FORCED_OFFLINE: list[str] = []


def unresolvable_host() -> str | None:
    """The Hub host that :func:`offline_if_unresolvable` found unresolvable, while its block
    runs (else ``None``)."""
    return _FORCED_OFFLINE[0] if _FORCED_OFFLINE else None


@contextmanager
def offline_if_unresolvable() -> Iterator[None]:
    """Run the block in huggingface_hub's offline mode when the Hub's host name does not
    resolve (no network, no DNS): a request then fails at once, or is served from the local
    cache, instead of being retried with back-off (five retries, ~26 s) for a failure that
    retrying cannot fix. One DNS lookup; nothing changes when the name resolves or
    ``HF_HUB_OFFLINE`` is already set. :func:`hub_errors` then says why in its one line."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    unresolvable = False
    if host and not constants.HF_HUB_OFFLINE and not _FORCED_OFFLINE:
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror:
            unresolvable = True
        except OSError:  # anything else: let huggingface_hub find out
            pass
    if not unresolvable:
        yield
        return
    constants.HF_HUB_OFFLINE = True
    _FORCED_OFFLINE.append(host)
    try:
        yield
    finally:
        _FORCED_OFFLINE.clear()
        constants.HF_HUB_OFFLINE = False


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into one-line :class:`HubError`; the disk
    refusing a write (a full Hugging Face cache...) is an
    :class:`~maskhub.errors.EnvironmentFailure` naming the file, or the cache, instead."""
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        try:
            yield
        except Exception as exc:
            failure = hub_cache_failure(exc)
            if failure is not None:
                raise failure from exc
            raise
    except EnvironmentFailure:
        raise
    except hf_errors.RevisionNotFoundError as exc:
        raise HubError(f"revision {revision!r} not found in Hub repo {repo_id}", repo_id) from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise HubError(f"Hub repo {repo_id} not found (or it is private and no valid HF_TOKEN "
                       "is set)", repo_id) from exc
    except hf_errors.OfflineModeIsEnabled as exc:
        if _FORCED_OFFLINE:
            raise HubError(f"{where}: the Hub cannot be reached ({_FORCED_OFFLINE[0]} does "
                           "not resolve: offline?)", repo_id) from exc
        raise HubError(f"{where}: HF_HUB_OFFLINE is set and this needs the network",
                       repo_id) from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        why = (f"{_FORCED_OFFLINE[0]} does not resolve: offline?" if _FORCED_OFFLINE
               else _first_line(exc))
        raise HubError(f"{where}: not in the local Hub cache and the Hub cannot be reached "
                       f"({why})", repo_id) from exc
    # LocalEntryNotFoundError subclasses EntryNotFoundError: it must be caught first.
    except hf_errors.EntryNotFoundError as exc:
        raise HubError(f"{where}: file not found on the Hub: {_first_line(exc)}",
                       repo_id) from exc
    except hf_errors.HfHubHTTPError as exc:
        raise HubError(f"{where}: Hub request failed: {_first_line(exc)}", repo_id) from exc
    except (OSError, ConnectionError) as exc:
        raise HubError(f"{where}: network error talking to the Hub: {_first_line(exc)}",
                       repo_id) from exc
    except Exception as exc:
        # httpx-style transport errors do not subclass OSError.
        if type(exc).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore", "requests",
                                                   "urllib3"}:
            raise HubError(f"{where}: network error talking to the Hub: {_first_line(exc)}",
                           repo_id) from exc
        raise


def hub_cache_failure(exc: BaseException) -> Exception | None:
    """What :func:`~maskhub.errors.environment_failure` makes of ``exc`` met while
    huggingface_hub read or wrote its cache: the file it names, else the cache directory
    (``HF_HUB_CACHE``, the variable the advice names); ``None`` for any other error."""
    failure = environment_failure(exc, setting="HF_HUB_CACHE")
    if failure is not None and failure.path is None:
        from huggingface_hub import constants

        failure = environment_failure(exc, constants.HF_HUB_CACHE, setting="HF_HUB_CACHE")
    return failure


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def download_checkpoint(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """Download the safetensors files of a Hub repo; return ``(snapshot_dir, commit_sha)``.

    Uses the huggingface_hub cache (resumable; works offline for a cached revision).
    """
    from huggingface_hub import HfApi, snapshot_download

    with hub_errors(repo_id, revision):
        folder = Path(snapshot_download(repo_id, revision=revision,
                                        allow_patterns=CHECKPOINT_PATTERNS))
        if not any(folder.glob("*.safetensors")):
            files = HfApi().list_repo_files(repo_id, revision=revision)
            pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            if pickles:
                raise CheckpointError(
                    f"Hub repo {repo_id} has only pickle weights ({pickles[0]}), which maskhub "
                    "never loads; convert them to safetensors and push them first", repo_id)
            raise CheckpointError(f"Hub repo {repo_id} holds no .safetensors file", repo_id)
    return folder, folder.name
