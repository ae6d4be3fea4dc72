"""maskhub: a registry for the sparse parameter-update masks of RL fine-tuned LLMs."""

from maskhub.errors import (
    CheckpointError,
    CheckpointMismatchError,
    HubError,
    IncompatibleMasksError,
    MaskhubError,
    MaskNotFoundError,
    MaskStoreError,
    NameTakenError,
)
from maskhub.registry.api import Mask, Registry

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "HubError",
    "IncompatibleMasksError",
    "Mask",
    "MaskNotFoundError",
    "MaskStoreError",
    "MaskhubError",
    "NameTakenError",
    "Registry",
]
