"""The SQL index: ``registry.duckdb``, opened briefly per operation under a file lock.

DuckDB lets one process at a time open a database file for writing. maskhub therefore
serialises access with ``flock`` on ``registry.lock``: exclusive for writes, shared for
reads, waiting (up to ``timeout`` seconds) instead of failing when another maskhub process
holds it. Connections are never kept open between operations, so a long diff in one process
does not block ``maskhub ls`` in another.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from maskhub.errors import AmbiguousMaskError, RegistryBusyError, UsageError
from maskhub.schemas.ddl import MIGRATIONS, MIGRATIONS_TABLE
from maskhub.schemas.metadata import MaskMetadata, TensorStats

LOCK_TIMEOUT_S = 600.0

MASK_COLUMNS = (
    "id", "name", "base_model", "base_revision", "target_model", "target_revision",
    "algorithm", "seed", "dataset", "tol", "dtype", "n_params", "n_updated", "sparsity",
    "created_at", "hub_repo", "hub_revision", "tags", "n_tensors", "format_version",
    "operation", "parents", "notes",
)


class Index:
    """Access to ``registry.duckdb`` with migrations applied on first use."""

    def __init__(self, path: Path, timeout: float = LOCK_TIMEOUT_S) -> None:
        """``path`` is the database file; its lock file lies beside it."""
        self.path = Path(path)
        self.lock_path = self.path.with_suffix(".lock")
        self.timeout = timeout
        self._migrated = False

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
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
        """A connection under the registry lock; writes run in one transaction."""
        if not self._migrated:
            self.migrate()
        with self._locked(exclusive=write):
            con = duckdb.connect(str(self.path), read_only=not write)
            try:
                if write:
                    con.execute("BEGIN TRANSACTION")
                    try:
                        yield con
                    except BaseException:
                        con.execute("ROLLBACK")
                        raise
                    con.execute("COMMIT")
                else:
                    yield con
            finally:
                con.close()

    def migrate(self) -> list[int]:
        """Apply pending migrations; return the numbers applied."""
        applied: list[int] = []
        with self._locked(exclusive=True):
            con = duckdb.connect(str(self.path))
            try:
                con.execute(MIGRATIONS_TABLE)
                rows = con.execute("SELECT number FROM schema_migrations").fetchall()
                done = {r[0] for r in rows}
                for m in sorted(MIGRATIONS, key=lambda m: m.number):
                    if m.number in done:
                        continue
                    con.execute("BEGIN TRANSACTION")
                    con.execute(m.sql)
                    con.execute("INSERT INTO schema_migrations (number, name) VALUES (?, ?)",
                                [m.number, m.name])
                    con.execute("COMMIT")
                    applied.append(m.number)
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
        con.executemany(
            "INSERT INTO tensors VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [[meta.id, t.tensor, t.layer, t.module, list(t.shape), t.numel, t.n_updated,
              t.sparsity, t.base_dtype or None, t.target_dtype or None] for t in tensors],
        )
        if sweep:
            con.executemany("INSERT INTO tensor_sweep VALUES (?, ?, ?, ?)",
                            [[meta.id, name, tol, n] for name, tol, n in sweep])

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

    def find(self, ref: str) -> dict[str, Any] | None:
        """The mask row whose name is ``ref``, or whose id starts with ``ref``.

        Returns ``None`` when nothing matches; raises ``AmbiguousMaskError`` for an id prefix
        that matches several masks.
        """
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

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Run a read-only SQL query; return ``(columns, rows)``."""
        with self.connect(write=False) as con:
            try:
                cur = con.execute(sql)
            except duckdb.Error as exc:
                raise UsageError(f"SQL error: {str(exc).splitlines()[0]}") from exc
            if cur.description is None:
                return [], []
            return [d[0] for d in cur.description], cur.fetchall()

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
