"""The maskhub library: diff, store, index, overlap, hub and training of update masks."""

from maskhub.registry.api import Mask, Registry

__all__ = ["Mask", "Registry"]
