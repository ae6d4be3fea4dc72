"""Migration 20: every table, view and column of the index carries a DuckDB ``COMMENT``
saying what it means, readable through ``maskhub sql`` and any duckdb client (the oldest
allowed duckdb reads them too: tests/test_duckdb_versions.py)."""

from __future__ import annotations

import duckdb
from clitools import run_json

from maskhub import Registry
from maskhub.schemas.comments import TABLES, VIEWS


def test_every_table_view_and_column_has_its_comment() -> None:
    reg = Registry()
    reg.sql("select 1")  # creates the index
    con = duckdb.connect(str(reg.index.path), read_only=True)
    try:
        tables = dict(con.execute("select table_name, comment from duckdb_tables() "
                                  "where not internal").fetchall())
        views = dict(con.execute("select view_name, comment from duckdb_views() "
                                 "where not internal").fetchall())
        columns = {(t, c): m for t, c, m in con.execute(
            "select table_name, column_name, comment from duckdb_columns() "
            "where not internal and table_name in (select table_name from duckdb_tables())"
        ).fetchall()}
    finally:
        con.close()
    assert tables == {t: what for t, (what, _) in TABLES.items()}
    assert views == VIEWS
    assert columns == {(t, c): m for t, (_, cols) in TABLES.items() for c, m in cols.items()}
    assert columns[("masks", "sparsity")] == "1 - n_updated / n_params, a fraction in [0, 1]"


def test_comments_through_maskhub_sql() -> None:
    got = run_json("sql", "select column_name, comment from duckdb_columns() where "
                          "table_name = 'overlaps' and column_name in ('o1', 'jaccard') "
                          "order by 1")
    assert got == [{"column_name": "jaccard", "comment": "n_both / (n_a + n_b - n_both)"},
                   {"column_name": "o1", "comment": "n_both / n_a (NULL for an empty mask)"}]
