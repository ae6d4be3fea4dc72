"""The SQL index: ``registry.duckdb``, opened briefly per operation under a file lock.

DuckDB lets one process at a time open a database file for writing. maskhub therefore
serialises access with ``flock`` on ``registry.lock``: exclusive for writes, shared for
reads, waiting (up to ``timeout`` seconds) instead of failing when another maskhub process
holds it. Connections are never kept open between operations, so a long diff in one process
does not block ``maskhub ls`` in another.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from maskhub.config import foreign_lock_wait
from maskhub.errors import (
    AmbiguousMaskError,
    HomeError,
    ReadOnlyRegistryError,
    RegistryBusyError,
    UsageError,
    environment_errors,
    environment_failure,
)
from maskhub.schemas.ddl import MIGRATIONS, MIGRATIONS_TABLE
from maskhub.schemas.metadata import MaskMetadata, TensorStats
from maskhub.schemas.names import param_kind
from maskhub.storage.engine import duckdb
from maskhub.storage.sandbox import open_sandbox, run_query, sandbox_error

LOCK_TIMEOUT_S = 600.0
#: DuckDB storage format of a new index: the oldest duckdb allowed by pyproject.toml (1.1)
#: must open a registry written by the newest (duckdb 2.x writes ``v2.0.0+`` by default).
STORAGE_VERSION = "v1.0.0"

MASK_COLUMNS = (
    "id", "name", "base_model", "base_revision", "target_model", "target_revision",
    "algorithm", "seed", "dataset", "tol", "dtype", "n_params", "n_updated", "sparsity",
    "created_at", "hub_repo", "hub_revision", "tags", "n_tensors", "format_version",
    "operation", "parents", "notes",
)

#: The ``tensors`` columns :meth:`Index.insert_mask` writes, by name (later migrations add
#: columns filled separately, e.g. :meth:`Index.insert_precision_null`).
TENSOR_COLUMNS = ("mask_id", "tensor", "layer", "module", "shape", "numel", "n_updated",
                  "sparsity", "base_dtype", "target_dtype", "param_kind")

#: What ``maskhub sql`` (and ``ls --where``) may run: queries. To DuckDB ``SHOW``,
#: ``DESCRIBE``, ``SUMMARIZE``, ``FROM ...``, ``VALUES`` and ``WITH ... SELECT`` are SELECTs;
#: ``PRAGMA table_info(...)`` and friends are PRAGMAs (run, like everything, on a read-only
#: connection closed right after). ``EXPLAIN`` is allowed when what it explains is one of
#: these (``EXPLAIN ANALYZE`` runs its statement). ``COPY ... TO``, ``EXPORT``, ``ATTACH``,
#: ``SET``, ``INSTALL``/``LOAD``, ``CALL`` and every DDL/DML statement are refused.
READ_ONLY_STATEMENTS = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.PRAGMA})

# The head of an EXPLAIN statement: comments, EXPLAIN, then ANALYZE or an option list.
_EXPLAIN_HEAD = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/)*explain\b\s*(?:analyze\b|\([^()]*\))?",
                           re.IGNORECASE | re.DOTALL)

# "Conflicting lock is held in /usr/bin/python3.11 (PID 1234)", DuckDB's word for a process
# holding the database file open.
_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (.*?) \(PID (\d+)\)")

# errno values meaning "this process may not write there".
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def sql_error(exc: BaseException) -> UsageError:
    """The one-line user error for a DuckDB error raised by user-written SQL."""
    return sandbox_error(exc)


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise :class:`UsageError` unless ``sql`` is exactly one read-only statement (see
    :data:`READ_ONLY_STATEMENTS`)."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise sql_error(exc) from exc
    if not statements:
        raise UsageError("SQL error: the query is empty")
    if len(statements) > 1:
        raise UsageError(f"SQL error: one statement at a time, not {len(statements)} "
                         "(separated by ';')")
    kind = statements[0].type
    what = kind.name
    if kind == duckdb.StatementType.EXPLAIN:
        head = _EXPLAIN_HEAD.match(sql)
        try:
            inner = con.extract_statements(sql[head.end():]) if head else []
        except duckdb.Error:
            inner = []
        if len(inner) == 1 and inner[0].type in READ_ONLY_STATEMENTS:
            return
        what = f"EXPLAIN {inner[0].type.name}" if len(inner) == 1 else "this EXPLAIN"
    elif kind in READ_ONLY_STATEMENTS:
        return
    raise UsageError(f"SQL error: only read-only queries can run here (SELECT, SHOW, DESCRIBE, "
                     f"SUMMARIZE, PRAGMA, EXPLAIN), not {what}")


def _lock_holder(message: str) -> str | None:
    """``"1234 (python3.11)"`` from DuckDB's lock-conflict error, else ``None``."""
    match = _LOCK_HOLDER.search(message)
    if match is None:
        return None
    return f"{match.group(2)} ({os.path.basename(match.group(1)) or '?'})"


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _may(path: Path, mode: int) -> bool:
    """``os.access`` with the effective ids where the platform supports them."""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


class Index:
    """Access to ``registry.duckdb`` with migrations applied on first use."""

    def __init__(self, path: Path, timeout: float = LOCK_TIMEOUT_S) -> None:
        """``path`` is the database file; its lock file lies beside it."""
        self.path = Path(path)
        self.lock_path = self.path.with_suffix(".lock")
        self.timeout = timeout
        #: Seconds to wait for a process outside maskhub holding DuckDB's lock on the file.
        self.foreign_wait = foreign_lock_wait()
        #: Where the one "waiting for process ..." line goes.
        self.notice: Callable[[str], None] = _to_stderr
        self._migrated = False
        #: The open connection of the current ``connect()`` block and whether it writes.
        self._session: tuple[duckdb.DuckDBPyConnection, bool] | None = None
        #: What to run when the current write transaction ends (see :meth:`on_exit`).
        self._exit_hooks: list[Callable[[bool | None], None]] = []

    @property
    def writable(self) -> bool:
        """Whether this process can write the index (its directory, and the database and lock
        files where they exist)."""
        return _may(self.path.parent, os.W_OK | os.X_OK) and all(
            _may(p, os.W_OK) for p in (self.path, self.lock_path) if p.exists())

    def _read_only(self, exc: OSError | duckdb.Error, detail: str | None = None
                   ) -> ReadOnlyRegistryError:
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
        else:
            reason = ("read-only file system" if "Read-only file system" in str(exc)
                      else "permission denied")
        return ReadOnlyRegistryError(self.path.parent, reason[:1].lower() + reason[1:], detail)

    def _open_lock(self, exclusive: bool) -> int | None:
        """A descriptor on the lock file; ``None`` for a reader of a directory where the lock
        file does not exist and cannot be made (no writer can work there either)."""
        if not exclusive:
            try:  # a reader needs no write access to the lock
                return os.open(self.lock_path, os.O_RDONLY)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno not in _NOT_WRITABLE:
                    raise
                return None  # another user's lock: readers need not wait for its writers
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno not in _NOT_WRITABLE:
                raise
            if exclusive:
                raise self._read_only(exc) from None
            return None

    def _connect_db(self, write: bool, sandbox: bool = False) -> duckdb.DuckDBPyConnection:
        """``duckdb.connect``, a refused write access becoming :class:`ReadOnlyRegistryError`;
        with ``sandbox``, the read-only connection of :func:`~maskhub.storage.sandbox.open_sandbox`
        on which user-written SQL runs.

        A process outside maskhub holding DuckDB's own lock on the file (a notebook's
        ``duckdb.connect(..., read_only=True)`` blocks every writer; a writable one, readers
        too) is waited for, up to :attr:`foreign_wait` seconds, with one line to
        :attr:`notice` naming it; then :class:`RegistryBusyError`. A new index is created in
        :data:`STORAGE_VERSION`, which every duckdb the package allows can open.
        """
        if write and self._unborn():
            self._discard_unborn()  # a creation cut short (a full disk, a kill): nothing in it
        new = write and not self.path.exists()
        config = {"storage_compatibility_version": STORAGE_VERSION} if new else {}
        try:
            return self._connect_waiting(write, config, sandbox)
        except duckdb.Error as exc:
            if new:
                self._discard_unborn()
            failure = environment_failure(exc, self.path)
            if failure is None:
                raise
            raise failure from exc

    def _unborn(self) -> bool:
        """Whether ``registry.duckdb`` is an empty file: its creation never wrote a header
        (the disk was full, or the process was killed at that instant)."""
        try:
            return self.path.stat().st_size == 0
        except OSError:
            return False

    def _discard_unborn(self) -> None:
        """Delete an index file whose creation failed (and its WAL), so that the next open
        creates it afresh instead of finding a file DuckDB cannot read. Called under the
        exclusive lock, only for a file this open found absent or empty."""
        for path in (self.path, self.path.with_name(self.path.name + ".wal")):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass

    def _connect_waiting(self, write: bool, config: dict[str, str], sandbox: bool = False
                         ) -> duckdb.DuckDBPyConnection:
        """``duckdb.connect``, waiting for a foreign holder of DuckDB's lock (see
        :meth:`_connect_db`)."""
        deadline: float | None = None
        while True:
            try:
                if sandbox:
                    return open_sandbox(self.path)
                return duckdb.connect(str(self.path), read_only=not write, config=config)
            except duckdb.IOException as exc:
                message = str(exc)
                if write and ("Permission denied" in message
                              or "Read-only file system" in message):
                    raise self._read_only(exc) from None
                holder = _lock_holder(message)
                if holder is None:
                    raise
            except duckdb.ConnectionException as exc:
                if "different configuration" not in str(exc):
                    raise
                raise RegistryBusyError(
                    f"this process holds {self.path} open through its own duckdb.connect() "
                    f"(read-only?), so maskhub cannot {'write' if write else 'read'} it; close "
                    "that connection, or query a snapshot that never blocks writers: "
                    "maskhub.Registry().connect()") from None
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.foreign_wait
                self.notice(f"waiting for process {holder}, which holds {self.path.name} open "
                            f"(up to {self.foreign_wait:g} s; set MASKHUB_LOCK_WAIT to "
                            "change)...")
            if now >= deadline:
                raise RegistryBusyError(
                    f"{self.path} is held open by process {holder} (a notebook or script's "
                    f"own duckdb.connect?); close that connection and retry, or query a "
                    "snapshot that never blocks writers: maskhub.Registry().connect()") from None
            time.sleep(min(0.1, max(0.0, deadline - now)))

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        fd = self._open_lock(exclusive)
        if fd is None:
            yield
            return
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RegistryBusyError(
                            f"the registry {self.path} stayed locked by another maskhub process "
                            f"for {self.timeout:.0f} s") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextmanager
    def connect(self, write: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection under the registry lock; writes run in one transaction.

        Re-entrant: inside an open ``connect()`` block of this index, a nested one (a write
        inside a write, or a read inside either) reuses the same connection, so an operation
        made of several queries costs one DuckDB connection (~10 ms each). Checking for
        pending migrations uses that connection too. The disk refusing DuckDB (full at the
        commit's WAL, read-only...) is an :class:`~maskhub.errors.EnvironmentFailure` naming
        ``registry.duckdb``; the transaction is then rolled back or, for a failed commit,
        left for DuckDB to discard at the next open.
        """
        if self._session is not None:
            con, con_writes = self._session
            if write and not con_writes:
                raise RuntimeError("a registry write inside a read-only connection")
            yield con
            return
        try:
            with ExitStack() as stack:
                with environment_errors(self.path):
                    con = self._open(stack, write)
                self._session = (con, write)
                self._exit_hooks = []
                try:
                    if write:
                        con.execute("BEGIN TRANSACTION")
                        try:
                            yield con
                        except BaseException:
                            try:
                                con.execute("ROLLBACK")
                            finally:
                                self._run_exit_hooks(False)
                            raise
                        try:
                            con.execute("COMMIT")
                        except BaseException:
                            self._run_exit_hooks(None)
                            raise
                        self._run_exit_hooks(True)
                    else:
                        yield con
                finally:
                    self._session = None
                    self._exit_hooks = []
                    con.close()
        except duckdb.Error as exc:  # BEGIN, COMMIT (its WAL), or a query of the block
            failure = environment_failure(exc, self.path)
            if failure is None:
                raise
            raise failure from exc

    def snapshot(self) -> duckdb.DuckDBPyConnection:
        """A read-only DuckDB connection to a copy of the index, for a notebook to keep open.

        The copy is taken under the shared lock (so it holds whole transactions only) into a
        temporary file that is unlinked right after it is opened: the connection holds no lock
        on ``registry.duckdb``, never blocks a writer, and sees the registry as it was when
        taken (take another for newer rows). Closing it frees the copy.
        """
        if not self._migrated:
            self.migrate()
        with tempfile.TemporaryDirectory(prefix="maskhub-snapshot-") as tmp:
            copy = Path(tmp) / self.path.name
            with self._locked(exclusive=False):
                shutil.copyfile(self.path, copy)
                wal = self.path.with_name(self.path.name + ".wal")
                if wal.exists():  # left by a writer that died before its checkpoint
                    shutil.copyfile(wal, copy.with_name(copy.name + ".wal"))
            # Opened, the copy stays readable through DuckDB's descriptor once unlinked.
            # The connection is the user's: the duckdb package, not only the engine that
            # maskhub itself imports, gives it its Python API (``con.sql(...).df()``...).
            import duckdb as package

            return package.connect(str(copy), read_only=True)

    def on_exit(self, hook: Callable[[bool | None], None]) -> None:
        """Run ``hook(committed)`` when the write transaction of the open ``connect()`` block
        ends, the exclusive lock still held: ``True`` after its COMMIT, ``False`` after a
        rollback, ``None`` when the COMMIT itself failed (outcome unknown: leave the evidence
        for recovery). Hooks run in the order added; a nested ``connect()`` adds to the
        outermost transaction, so work registered inside it is settled by the real commit."""
        if self._session is None or not self._session[1]:
            raise RuntimeError("Index.on_exit outside a write connection")
        self._exit_hooks.append(hook)

    def _run_exit_hooks(self, committed: bool | None) -> None:
        hooks, self._exit_hooks = self._exit_hooks, []
        failed: BaseException | None = None
        for hook in hooks:
            try:
                hook(committed)
            except BaseException as exc:  # the others still run; the first error is raised
                failed = failed or exc
        if failed is not None:
            raise failed

    def _open(self, stack: ExitStack, write: bool, sandbox: bool = False
              ) -> duckdb.DuckDBPyConnection:
        """A migrated connection, its lock held until ``stack`` closes (``sandbox``: a
        read-only one for user SQL, see :meth:`sandbox`)."""
        if not self._migrated and not write and (not self.path.is_file() or self._unborn()):
            self.migrate()  # a reader of a home without an index yet: create it first
        stack.enter_context(self._locked(exclusive=write))
        con = self._connect_db(write, sandbox)
        stack.callback(con.close)
        if self._migrated:
            return con
        done = _applied(con)
        if not [m for m in MIGRATIONS if m.number not in done]:
            self._migrated = True
            return con
        if write:  # the exclusive lock is held: migrate on this connection
            _apply_pending(con, done, self.path)
            self._migrated = True
            return con
        stack.close()  # a reader found pending migrations: apply them with write access
        self.migrate()
        stack.enter_context(self._locked(exclusive=False))
        con = self._connect_db(False, sandbox)
        stack.callback(con.close)
        return con

    def _pending(self) -> list[int] | None:
        """Numbers of the migrations not applied yet, read without write access; ``None``
        when there is no readable index (none yet, or one that the writer path must open)."""
        if not self.path.is_file():
            return None
        with self._locked(exclusive=False):
            try:
                con = self._connect_db(write=False)
            except duckdb.Error:
                return None
            try:
                done = _applied(con)
            finally:
                con.close()
        return sorted(m.number for m in MIGRATIONS if m.number not in done)

    def pending_migrations(self) -> list[int] | None:
        """Numbers of the known migrations not applied to the index yet, read without writing
        anything; ``None`` when there is no index file (or none readable) yet."""
        return self._pending()

    def migrate(self) -> list[int]:
        """Apply pending migrations; return the numbers applied.

        An index that is up to date is only read, so a read-only registry can be opened;
        one that needs creating or upgrading there is a :class:`ReadOnlyRegistryError`.
        """
        pending = self._pending()
        if pending == []:
            self._migrated = True
            return []
        try:
            return self._apply_migrations()
        except ReadOnlyRegistryError as exc:
            detail = (("its index cannot be opened read-only" if self.path.exists() else
                       "it holds no index (registry.duckdb) yet") if pending is None else
                      f"its index needs {len(pending)} schema migration(s) from this maskhub "
                      "version") + "; open it once with write access"
            raise ReadOnlyRegistryError(exc.home, exc.reason, detail) from None

    def _apply_migrations(self) -> list[int]:
        with environment_errors(self.path), self._locked(exclusive=True):
            con = self._connect_db(write=True)
            try:
                applied = _apply_pending(con, _applied(con), self.path)
            finally:
                con.close()
        self._migrated = True
        return applied

    # -- masks ---------------------------------------------------------------------------

    @staticmethod
    def insert_mask(con: duckdb.DuckDBPyConnection, meta: MaskMetadata,
                    tensors: Sequence[TensorStats],
                    sweep: Sequence[tuple[str, float, int]] = ()) -> None:
        """Insert one mask with its tensor rows and sweep rows (inside ``connect()``)."""
        row = {
            "id": meta.id, "name": meta.name, "base_model": meta.base_model,
            "base_revision": meta.base_revision, "target_model": meta.target_model,
            "target_revision": meta.target_revision, "algorithm": meta.algorithm,
            "seed": meta.seed, "dataset": meta.dataset, "tol": meta.tol, "dtype": meta.dtype,
            "n_params": meta.n_params, "n_updated": meta.n_updated, "sparsity": meta.sparsity,
            "created_at": meta.created_at, "hub_repo": meta.hub_repo,
            "hub_revision": meta.hub_revision, "tags": list(meta.tags),
            "n_tensors": len(tensors), "format_version": meta.format_version,
            "operation": meta.operation, "parents": list(meta.parents), "notes": meta.notes,
        }
        cols = ", ".join(MASK_COLUMNS)
        marks = ", ".join("?" for _ in MASK_COLUMNS)
        con.execute(f"INSERT INTO masks ({cols}) VALUES ({marks})", [row[c] for c in MASK_COLUMNS])
        if meta.has_values:  # migration 9; the column defaults to false
            con.execute("UPDATE masks SET has_values = true WHERE id = ?", [meta.id])
        # issue 26: content identity (migration 12)
        con.execute("UPDATE masks SET base_fingerprint = ?, target_fingerprint = ? WHERE id = ?",
                    [meta.base_fingerprint, meta.target_fingerprint, meta.id])
        # issue 26: a store made elsewhere (pull, import) keeps its edit history in the row,
        # so that the store's extra.edits and masks.edits agree from the start (fsck checks it)
        history = (meta.extra or {}).get("edits")
        if isinstance(history, list) and history and all(isinstance(x, str) for x in history):
            con.execute("UPDATE masks SET edits = ? WHERE id = ?", [history, meta.id])
        if tensors:
            insert_columns(con, "tensors", [meta.id], [
                [t.tensor for t in tensors], [t.layer for t in tensors],
                [t.module for t in tensors], [list(t.shape) for t in tensors],
                [t.numel for t in tensors], [t.n_updated for t in tensors],
                [t.sparsity for t in tensors], [t.base_dtype or None for t in tensors],
                [t.target_dtype or None for t in tensors],
                [param_kind(t.tensor) for t in tensors]], names=TENSOR_COLUMNS)
        if sweep:
            insert_columns(con, "tensor_sweep", [meta.id],
                           [list(c) for c in zip(*sweep, strict=True)])

    @staticmethod
    def insert_precision_null(con: duckdb.DuckDBPyConnection, meta: MaskMetadata,
                              tensors: Sequence[TensorStats]) -> None:
        """Fill the precision-null columns (migration 10) of a mask just inserted: the
        mask's from ``meta.extra["precision_null"]``, each tensor's from its stats. Written
        by name, after the positional row inserts."""
        null = meta.extra.get("precision_null")
        if null:
            con.execute(
                "UPDATE masks SET max_abs_update = ?, null_budget = ?, null_budget_source = ?, "
                "n_null = ?, n_null_updated = ?, null_share = ?, sparsity_movable = ? "
                "WHERE id = ?",
                [null.get("max_abs_delta"), null.get("budget"), null.get("budget_source"),
                 null.get("n_null"), null.get("n_null_updated"), null.get("null_share"),
                 null.get("sparsity_movable"), meta.id])
        rows = [t for t in tensors if t.max_abs_delta is not None or t.n_null is not None]
        if not rows:
            return
        con.execute(
            "UPDATE tensors SET max_abs_update = v.d, n_null = v.n, n_null_updated = v.u, "
            "sparsity_movable = v.s FROM (SELECT unnest(?) AS tensor, unnest(?) AS d, "
            "unnest(?) AS n, unnest(?) AS u, unnest(?) AS s) v "
            "WHERE tensors.mask_id = ? AND tensors.tensor = v.tensor",
            [[t.tensor for t in rows], [t.max_abs_delta for t in rows],
             [t.n_null for t in rows], [t.n_null_updated for t in rows],
             [t.sparsity_movable for t in rows], meta.id])

    @staticmethod
    def insert_analysis(con: duckdb.DuckDBPyConnection, mask_id: str,
                        rows: Sequence[dict[str, Any]]) -> None:
        """Insert ``tensor_analysis`` rows (dicts of :meth:`TensorAnalysis.to_row`)."""
        if not rows:
            return
        cols = list(rows[0])
        names = ", ".join(["mask_id", *cols])
        marks = ", ".join("?" for _ in range(len(cols) + 1))
        con.executemany(f"INSERT INTO tensor_analysis ({names}) VALUES ({marks})",
                        [[mask_id, *(r[c] for c in cols)] for r in rows])

    @staticmethod
    def insert_strata(con: duckdb.DuckDBPyConnection, mask_id: str,
                      rows: Sequence[tuple[str, int, int, int]]) -> None:
        """Insert ``tensor_strata`` rows ``(tensor, stratum, numel, n_updated)``."""
        if rows:
            insert_columns(con, "tensor_strata", [mask_id],
                           [list(c) for c in zip(*rows, strict=True)])

    def find(self, ref: str) -> dict[str, Any] | None:
        """The mask row whose name is ``ref``, or whose id starts with ``ref``.

        Returns ``None`` when nothing matches; raises ``AmbiguousMaskError`` for an id prefix
        that matches several masks, ``UsageError`` for an empty ``ref`` (a prefix of every id).
        """
        if not ref.strip():
            raise UsageError("a MASK must be a mask name or a prefix of its id, not an empty "
                             "string (see `maskhub ls`)")
        with self.connect(write=False) as con:
            rows = self.rows(con, "SELECT * FROM masks WHERE name = ?", [ref])
            if rows:
                return rows[0]
            rows = self.rows(con, "SELECT * FROM masks WHERE starts_with(id, ?) ORDER BY id",
                             [ref.lower()])
        if len(rows) > 1:
            raise AmbiguousMaskError(ref, [r["id"] for r in rows])
        return rows[0] if rows else None

    @staticmethod
    def rows(con: duckdb.DuckDBPyConnection, sql: str,
             params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run a query and return its rows as dicts."""
        cur = con.execute(sql, list(params))
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def query(self, sql: str, timeout: float | None = None) -> tuple[list[str], list[tuple]]:
        """Run one read-only SQL statement written by a user (see :func:`check_read_only`) in
        the SQL sandbox (:mod:`maskhub.storage.sandbox`: the registry and nothing else), for
        at most ``timeout`` seconds (``None``/``0``: no limit); return ``(columns, rows)``.
        Any problem with it is a one-line ``UsageError``."""
        with self.sandbox() as con:
            check_read_only(con, sql)
            return run_query(con, sql, timeout)

    def user_rows(self, sql: str, timeout: float | None = None) -> list[dict[str, Any]]:
        """:meth:`query`, for SQL holding user-written parts: the rows as dicts."""
        columns, rows = self.query(sql, timeout)
        return [dict(zip(columns, r, strict=True)) for r in rows]

    @contextmanager
    def sandbox(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A sandboxed read-only connection to the index (migrated first), held under the
        shared lock while the block runs: see :mod:`maskhub.storage.sandbox`. Refused inside
        this process's own write transaction (its rows are not committed yet)."""
        if self._session is not None and self._session[1]:
            raise RuntimeError("user SQL inside a registry write transaction")
        with ExitStack() as stack:
            yield self._open(stack, False, sandbox=True)

    def delete_mask(self, mask_id: str) -> None:
        """Remove a mask's rows from every table that refers to it.

        A table refers to a mask through a ``mask_id`` column, or through ``mask_a`` /
        ``mask_b`` (pair tables such as ``overlaps``). Views are skipped.
        """
        with self.connect() as con:
            found = con.execute(
                "SELECT c.table_name, c.column_name FROM information_schema.columns c "
                "JOIN information_schema.tables t "
                "ON t.table_schema = c.table_schema AND t.table_name = c.table_name "
                "WHERE t.table_type = 'BASE TABLE' "
                "AND c.column_name IN ('mask_id', 'mask_a', 'mask_b')"
            ).fetchall()
            columns: dict[str, list[str]] = {}
            for table, column in found:
                columns.setdefault(table, []).append(column)
            for table in sorted(columns):
                cond = " OR ".join(f"{c} = ?" for c in sorted(columns[table]))
                con.execute(f'DELETE FROM "{table}" WHERE {cond}', [mask_id] * len(columns[table]))
            con.execute("DELETE FROM masks WHERE id = ?", [mask_id])


def _applied(con: duckdb.DuckDBPyConnection) -> set[int]:
    """Numbers of the migrations applied to the database of ``con``."""
    try:
        return {r[0] for r in con.execute("SELECT number FROM schema_migrations").fetchall()}
    except duckdb.CatalogException:
        return set()


# A migration that meets a schema it does not expect; I/O failures keep their own errors.
_SCHEMA_ERRORS = (duckdb.CatalogException, duckdb.BinderException, duckdb.ParserException,
                  duckdb.ConstraintException, duckdb.ConversionException)


def _apply_pending(con: duckdb.DuckDBPyConnection, done: set[int], path: Path) -> list[int]:
    """Apply the migrations not in ``done`` on a write connection (under the exclusive lock),
    each in its own transaction; return their numbers. A migration that fails (an index
    changed by another maskhub version, say) is rolled back whole and is a one-line
    :class:`HomeError`: the migrations before it stay applied, nothing else changes."""
    con.execute(MIGRATIONS_TABLE)
    applied: list[int] = []
    for m in sorted(MIGRATIONS, key=lambda m: m.number):
        if m.number in done:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(m.sql)
            con.execute("INSERT INTO schema_migrations (number, name) VALUES (?, ?)",
                        [m.number, m.name])
            con.execute("COMMIT")
        except _SCHEMA_ERRORS as exc:
            with suppress(duckdb.Error):
                con.execute("ROLLBACK")
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HomeError(path.parent, f"its index cannot take schema migration {m.number} "
                            f"({m.name}): {first}; it was left as it was before that "
                            "migration (was it written by another maskhub version?)") from None
        applied.append(m.number)
    return applied


def insert_columns(con: duckdb.DuckDBPyConnection, table: str, constants: Sequence[Any],
                   columns: Sequence[list[Any]], names: Sequence[str] | None = None) -> None:
    """Insert rows given column-wise into ``table`` (its columns in order, or ``names``: the
    ``constants``, the same in every row, then ``columns``) in one statement: DuckDB's
    ``executemany`` costs ~0.1 ms per row, and a large model has thousands of rows."""
    marks = ", ".join(["?"] * len(constants) + ["unnest(?)"] * len(columns))
    target = f"{table} ({', '.join(names)})" if names else table
    con.execute(f"INSERT INTO {target} SELECT {marks}", [*constants, *columns])
