"""The DuckDB engine the registry runs on, imported as cheaply as the installed DuckDB allows.

DuckDB 1.5+ ships its engine as the extension module ``_duckdb``, which the ``duckdb``
package re-exports together with Python-side APIs maskhub never calls (the relational and
expression builders, and a version lookup through ``importlib.metadata``). Importing the
package costs 55-90 ms on the 2-core machine of BENCHMARKS.md against 17 ms for the engine
alone, and every command that touches the registry pays it. Every name maskhub uses
(``connect``, ``DuckDBPyConnection``, the exception classes, ``StatementType``) is the same
object in both: the package's are the engine's. Older DuckDB (the engine at
``duckdb.duckdb``) gets the package.
"""

from __future__ import annotations

try:
    import _duckdb as duckdb
except ImportError:  # DuckDB before the engine moved to a top-level module
    import duckdb  # type: ignore[no-redef]

__all__ = ["duckdb"]
