"""The SQL sandbox: where SQL written by a user (``maskhub sql``, ``ls --where``) runs.

A user's query runs on its own DuckDB instance: an in-memory database that attaches
``registry.duckdb`` read-only (under the registry's own name, so that ``masks``,
``tensors``, ``"overlaps"``, the views... resolve as on a direct connection) and then turns
off, through DuckDB's own settings, everything that reaches outside it:

- ``enable_external_access = false``: no file other than the attached registry can be read
  or written (``read_text``, ``read_blob``, ``glob``, ``read_csv``, ``COPY ... TO``,
  ``EXPORT``, ``PRAGMA import_database``, ``ATTACH``), no URL (``read_json_auto('http://')``),
  no extension installed or loaded;
- ``autoinstall_known_extensions`` / ``autoload_known_extensions`` /
  ``allow_community_extensions`` / ``allow_unsigned_extensions = false``: no extension
  fetched or loaded behind the query's back;
- ``temp_directory = ''``: nothing spilled to disk;
- ``lock_configuration = true`` last: the query cannot ``SET``/``RESET``/``PRAGMA`` any of
  these back (nor any other setting).

The statement filter of :func:`maskhub.storage.index.check_read_only` still refuses
non-queries with a clearer line, but the settings are the defence: a statement that slips
past the filter still cannot reach the machine. A query runs at most ``timeout`` seconds:
a timer thread calls ``interrupt()`` on the connection.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maskhub.errors import UsageError
from maskhub.storage.engine import duckdb

#: Default ``--timeout`` of a user query, in seconds.
DEFAULT_TIMEOUT_S = 30.0

#: Set, in this order, after the registry is attached; ``lock_configuration`` comes last.
#: A setting missing from an older duckdb (``allow_community_extensions`` came in 1.0) is
#: skipped only when that duckdb has no such feature to turn off.
SANDBOX_SETTINGS: tuple[tuple[str, str], ...] = (
    ("temp_directory", "''"),
    ("autoinstall_known_extensions", "false"),
    ("autoload_known_extensions", "false"),
    ("allow_community_extensions", "false"),
    ("allow_unsigned_extensions", "false"),
    ("enable_external_access", "false"),
    ("lock_configuration", "true"),
)
_OPTIONAL = frozenset({"allow_community_extensions"})

#: What the one error line adds when the sandbox refused something.
REACH = ("maskhub sql reads the registry only: no other file, no network, no extension, "
         "no setting")


def open_sandbox(path: Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that sees the index at ``path`` (attached read-only as the
    default database) and nothing else (see the module's docstring). The caller holds the
    registry's shared lock while it is open; ``duckdb.IOException`` (another process holding
    the file) is left to the caller."""
    con = duckdb.connect(":memory:")
    try:
        alias = path.stem.replace('"', '""')
        con.execute(f"ATTACH '{str(path).replace(chr(39), chr(39) * 2)}' AS \"{alias}\" "
                    "(READ_ONLY)")
        con.execute(f'USE "{alias}"')
        for name, value in SANDBOX_SETTINGS:
            try:
                con.execute(f"SET {name} = {value}")
            except duckdb.CatalogException:
                if name not in _OPTIONAL:
                    raise
        return con
    except BaseException:
        con.close()
        raise


def sandbox_error(exc: BaseException) -> UsageError:
    """The one-line user error for a DuckDB error raised by user-written SQL."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else type(exc).__name__
    if isinstance(exc, duckdb.PermissionException) or "configuration has been locked" in first:
        return UsageError(f"SQL error: {first} ({REACH})")
    return UsageError(f"SQL error: {first}")


def run_query(con: duckdb.DuckDBPyConnection, sql: str, timeout: float | None,
              params: Sequence[Any] = ()) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` on ``con`` for at most ``timeout`` seconds (``None`` or ``0``: no limit)
    and fetch its rows; return ``(columns, rows)``. A DuckDB error, or the time running out,
    is a one-line :class:`UsageError`."""
    timer = None
    fired = threading.Event()
    if timeout:
        def stop() -> None:
            fired.set()
            con.interrupt()

        timer = threading.Timer(timeout, stop)
        timer.daemon = True
        timer.start()
    try:
        cur = con.execute(sql, list(params))
        if cur.description is None:
            return [], []
        return [d[0] for d in cur.description], cur.fetchall()
    except duckdb.Error as exc:
        if fired.is_set() and isinstance(exc, duckdb.InterruptException):
            raise UsageError(f"SQL error: the query ran longer than --timeout {timeout:g} s and "
                             "was stopped (raise --timeout, or 0 for no limit)") from None
        raise sandbox_error(exc) from None
    finally:
        if timer is not None:
            timer.cancel()
