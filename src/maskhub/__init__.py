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

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # Mask and Registry pull in torch, zarr and duckdb: imported on first use, so that
    # `import maskhub.errors` (and the CLI's start, see maskhub.entry) stays light.
    if name in ("Mask", "Registry"):
        from maskhub.registry import api

        return getattr(api, name)
    if name in _SUBMODULES:  # `maskhub.integrations.transformers...` after `import maskhub`
        import importlib

        return importlib.import_module(f"maskhub.{name}")
    raise AttributeError(f"module 'maskhub' has no attribute {name!r}")

#: Subpackages reachable as attributes after a plain ``import maskhub`` (imported then).
_SUBMODULES = ("integrations", "torch")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


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
