"""Thin layer over huggingface_hub: downloads of checkpoints and error translation.

huggingface_hub honours ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME`` and ``HF_HUB_OFFLINE``
itself; maskhub never reads or prints the token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from maskhub.errors import CheckpointError, HubError

CHECKPOINT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json"]


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into one-line :class:`HubError`."""
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except hf_errors.RevisionNotFoundError as exc:
        raise HubError(f"revision {revision!r} not found in Hub repo {repo_id}", repo_id) from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise HubError(f"Hub repo {repo_id} not found (or it is private and no valid HF_TOKEN "
                       "is set)", repo_id) from exc
    except hf_errors.OfflineModeIsEnabled as exc:
        raise HubError(f"{where}: HF_HUB_OFFLINE is set and this needs the network",
                       repo_id) from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        raise HubError(f"{where}: not in the local Hub cache and the Hub cannot be reached "
                       f"({_first_line(exc)})", repo_id) from exc
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
