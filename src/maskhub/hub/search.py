"""``search``: mask repos on the Hub (tag ``maskhub``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from maskhub.checkpoints.hubio import hub_errors, hub_messages
from maskhub.errors import UsageError
from maskhub.hub.layout import (
    BASE_TAGS,
    REPO_TYPES,
    hf_api,
)

if TYPE_CHECKING:

    pass


def search(*, base_model: str | None = None, algorithm: str | None = None,
           repo_type: str = "model", limit: int = 50, token: str | None = None,
           notice: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Mask repos on the Hub (tag ``maskhub``), optionally of one base model
    (``base_model:<id>`` tag) and one algorithm (its tag); most recent first where the Hub
    sorts. Each hit: ``repo_id, repo_type, base_model, algorithm, sparsity, n_params, tags,
    last_modified, downloads, likes``. ``notice``: where huggingface_hub's own messages go,
    as short lines (see :func:`~maskhub.checkpoints.hubio.hub_messages`); offline, the one
    error line comes at once (no retries against a host name that does not resolve)."""
    if repo_type not in REPO_TYPES:
        raise UsageError(f"repo type must be one of {', '.join(REPO_TYPES)}, not {repo_type!r}")
    if limit < 1:
        raise UsageError(f"--limit must be at least 1, not {limit}")
    filters = ["maskhub"]
    if base_model:
        filters.append(f"base_model:{base_model}")
    if algorithm:
        filters.append(algorithm.strip().lower())
    api = hf_api(token)
    with hub_messages(notice, progress=False), hub_errors("Hub search"):
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
