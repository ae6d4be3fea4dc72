"""The facade: :class:`Registry` and :class:`Mask`, the public Python API on top of the
features (see docs/architecture.md)."""

from maskhub.registry.api import Mask, Registry

__all__ = ["Mask", "Registry"]
