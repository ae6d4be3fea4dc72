"""The one error hierarchy of maskhub.

Every error a user can cause derives from :class:`MaskhubError`; each subclass also derives
from the matching built-in so that ``except LookupError`` and friends keep working. The CLI
turns any ``MaskhubError`` into a one-line message and exit code 1, in one place.
"""

from __future__ import annotations


class MaskhubError(Exception):
    """Base class of every user-facing maskhub error."""


class CheckpointError(MaskhubError, ValueError):
    """A checkpoint cannot be read: missing, truncated, corrupt, pickled, or unsupported."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class CheckpointMismatchError(MaskhubError, ValueError):
    """The two checkpoints of a diff do not hold the same tensors with the same shapes."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


class MaskNotFoundError(MaskhubError, LookupError):
    """No registered mask matches the given name or id prefix."""

    def __init__(self, ref: str, message: str | None = None) -> None:
        super().__init__(message or f"no mask named {ref!r} (see `maskhub ls`)")
        self.ref = ref


class AmbiguousMaskError(MaskhubError, LookupError):
    """An id prefix matches several masks."""

    def __init__(self, ref: str, matches: list[str]) -> None:
        shown = ", ".join(matches[:5])
        super().__init__(f"{ref!r} matches {len(matches)} masks ({shown}); give more of the id")
        self.ref = ref
        self.matches = matches


class NameTakenError(MaskhubError, ValueError):
    """A mask name is already registered."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"a mask named {name!r} already exists; choose another --name or `maskhub rm {name}`"
        )
        self.name = name


class MaskStoreError(MaskhubError, ValueError):
    """A mask store on disk is unreadable, inconsistent with its metadata, or from the future."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class IncompatibleMasksError(MaskhubError, ValueError):
    """Two masks cannot be compared or combined (different models, tensors or shapes)."""


class RegistryBusyError(MaskhubError, TimeoutError):
    """The registry index stayed locked by another process for too long."""


class HubError(MaskhubError, RuntimeError):
    """A Hugging Face Hub operation failed (unknown repo/revision, network, auth, offline)."""

    def __init__(self, message: str, repo_id: str | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id


class UsageError(MaskhubError, ValueError):
    """An argument is invalid (bad tolerance, unknown device, malformed option...)."""


class MaskMismatchError(MaskhubError, LookupError):
    """A mask's tensors do not match a model's parameters or a checkpoint's tensors (names or
    shapes); lists what is missing on each side."""

    def __init__(self, message: str, missing_in_target: list[str] | None = None,
                 missing_in_mask: list[str] | None = None,
                 shape_mismatches: list[str] | None = None) -> None:
        super().__init__(message)
        self.missing_in_target = list(missing_in_target or [])
        self.missing_in_mask = list(missing_in_mask or [])
        self.shape_mismatches = list(shape_mismatches or [])


class HomeError(MaskhubError, OSError):
    """The maskhub home cannot be created or used (a file in the way, no permission...)."""

    def __init__(self, home: object, reason: str) -> None:
        super().__init__(f"cannot use {home} as the maskhub home: {reason}")
        self.home = home


class ReadOnlyRegistryError(MaskhubError, PermissionError):
    """The registry must be written (a new mask, a removal, a schema upgrade) but its home is
    read-only for this process; reading it still works."""

    def __init__(self, home: object, reason: str, detail: str | None = None) -> None:
        super().__init__(f"the registry at {home} is read-only ({reason}); "
                         + (detail or "it can be read (ls, show, sql...) but not written"))
        self.home = home
        self.reason = reason


class StudyInterruptedError(MaskhubError, RuntimeError):
    """``maskhub study`` was stopped (Ctrl-C) after registering some of its masks; the
    message names them (each one complete) and where the checkpoints are."""


# -- patches (issue 22: a mask plus the target's values) -----------------------------------

class PatchError(MaskhubError, ValueError):
    """A patch cannot be applied: the mask holds no values, or its values disagree with its
    bits (a wrong base is a :class:`MaskMismatchError`)."""

    def __init__(self, message: str, mask: str | None = None) -> None:
        super().__init__(message)
        self.mask = mask
