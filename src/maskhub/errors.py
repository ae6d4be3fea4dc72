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


# -- errors from the environment, translated in one place ---------------------------------
#
# The machine refusing an operation (a full disk, a quota, a permission, a read-only file
# system, too many open files, a failing disk) reaches maskhub as an ``OSError`` from Python,
# or as a library's own exception whose message carries the C library's text (DuckDB's
# ``IOException`` / ``TransactionException``: 'Could not write file "...": No space left on
# device'). :func:`environment_failure` maps either to one :class:`EnvironmentFailure` that
# names the cause, the path and what to do, the way ``httpx/_exceptions.py`` maps its
# transport's exceptions; the boundaries that touch the disk (the store writer, the index's
# connections and commits, the staging of a registration, the Hugging Face cache of a pull)
# call it through :func:`environment_errors`, and the CLI applies it once more to anything
# that escaped, so a full disk is one ``Error:`` line wherever it is met.


class EnvironmentFailure(MaskhubError, OSError):
    """The machine refused an operation (see :data:`ENVIRONMENT_ERRNOS`): ``cause`` (e.g.
    ``"no space left on device"``), ``path`` (what was being read or written), the original
    ``errno``; the message says what to do."""

    def __init__(self, message: str, *, cause: str = "", path: str | None = None,
                 code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause
        self.path = path
        self.code = code

    def __str__(self) -> str:
        return self.message


class DiskFullError(EnvironmentFailure):
    """No space left: a full disk, an exhausted quota or a file-size limit."""


class AccessDeniedError(EnvironmentFailure, PermissionError):
    """The operating system refused access: permission denied, or a read-only file system."""


class TooManyOpenFilesError(EnvironmentFailure):
    """The process or the system ran out of file descriptors."""


#: errno -> (the error class, the cause as the message says it, what to do: ``{setting}``
#: is the environment variable that moves the place, ``MASKHUB_HOME`` unless told).
ENVIRONMENT_ERRNOS: dict[int, tuple[type[EnvironmentFailure], str, str]] = {}


def _register_errnos() -> None:
    import errno

    space = "free space there or set {setting} to a disk with room"
    access = "fix its permissions or set {setting} to a directory you can write"
    read_only = "make it writable or set {setting} to a directory you can write"
    table = {
        "ENOSPC": (DiskFullError, "no space left on device", space),
        "EDQUOT": (DiskFullError, "disk quota exceeded", space),
        "EFBIG": (DiskFullError, "file too large for a file-size limit",
                  "raise the limit (ulimit -f) or set {setting} elsewhere"),
        "EACCES": (AccessDeniedError, "permission denied", access),
        "EPERM": (AccessDeniedError, "operation not permitted", access),
        "EROFS": (AccessDeniedError, "read-only file system", read_only),
        "EMFILE": (TooManyOpenFilesError, "too many open files",
                   "raise the limit (ulimit -n) and retry"),
        "ENFILE": (TooManyOpenFilesError, "too many open files in the system",
                   "close other programs' files and retry"),
        "EIO": (EnvironmentFailure, "input/output error", "check the disk and retry"),
    }
    for name, entry in table.items():
        code = getattr(errno, name, None)
        if code is not None:
            ENVIRONMENT_ERRNOS[code] = entry


_register_errnos()


def _errno_in_text(text: str) -> int | None:
    """The errno whose C library text (``os.strerror``) a library's message carries."""
    import os

    for code in ENVIRONMENT_ERRNOS:
        if os.strerror(code) in text:
            return code
    return None


def _path_in_text(text: str) -> str | None:
    """The first quoted absolute path of a library's message (DuckDB: ``file "/x/y"``)."""
    import re

    found = re.search(r"""["'](/[^"'\n]+)["']""", text)
    return found.group(1) if found else None


def environment_failure(exc: BaseException, path: object = None, doing: str = "writing",
                        setting: str = "MASKHUB_HOME") -> EnvironmentFailure | None:
    """The :class:`EnvironmentFailure` that ``exc`` (or an exception it was raised from) is,
    else ``None``. ``path``: what the caller was ``doing`` (default: the path the error names);
    ``setting``: the environment variable that moves that place elsewhere, named in the
    advice (e.g. "free space there or set MASKHUB_HOME to a disk with room").
    Other maskhub errors are never translated (they already say what happened)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, EnvironmentFailure):
            return current
        if isinstance(current, MaskhubError):
            return None
        code, named = None, None
        if isinstance(current, OSError) and current.errno in ENVIRONMENT_ERRNOS:
            code, named = current.errno, current.filename
        elif not isinstance(current, OSError):
            text = str(current)
            code = _errno_in_text(text)
            named = _path_in_text(text) if code is not None else None
        if code is not None:
            cls, cause, default_hint = ENVIRONMENT_ERRNOS[code]
            where = path if path is not None else named
            subject = f" {doing} {where}" if where is not None else ""
            advice = default_hint.format(setting=setting)
            return cls(f"{cause}{subject}: {advice}", cause=cause,
                       path=None if where is None else str(where), code=code)
        current = current.__cause__ or current.__context__
    return None


def environment_errors(path: object = None, doing: str = "writing",
                       setting: str = "MASKHUB_HOME") -> _EnvironmentErrors:
    """A context manager that raises what :func:`environment_failure` makes of an exception
    leaving it (``from`` the original), and lets every other exception through unchanged."""
    return _EnvironmentErrors(path, doing, setting)


class _EnvironmentErrors:
    def __init__(self, path: object, doing: str, setting: str) -> None:
        self.path, self.doing, self.setting = path, doing, setting

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> bool:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, MaskhubError):
            return False
        failure = environment_failure(exc, self.path, self.doing, self.setting)
        if failure is None:
            return False
        raise failure from exc


# -- patches (issue 22: a mask plus the target's values) -----------------------------------

class PatchError(MaskhubError, ValueError):
    """A patch cannot be applied: the mask holds no values, or its values disagree with its
    bits (a wrong base is a :class:`MaskMismatchError`)."""

    def __init__(self, message: str, mask: str | None = None) -> None:
        super().__init__(message)
        self.mask = mask
