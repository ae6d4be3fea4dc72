"""SQL schema of the registry index, as an ordered list of numbered migrations.

A migration is applied exactly once, in order, the first time an index is opened by a
maskhub that knows it; ``schema_migrations`` records which ones ran. Never edit a released
migration: append a new one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    """One numbered schema change."""

    number: int
    name: str
    sql: str


M001_CORE = Migration(
    1,
    "core tables: masks, tensors, tensor_sweep",
    """
    CREATE TABLE masks (
        id              VARCHAR PRIMARY KEY,
        name            VARCHAR NOT NULL UNIQUE,
        base_model      VARCHAR NOT NULL,
        base_revision   VARCHAR,
        target_model    VARCHAR NOT NULL,
        target_revision VARCHAR,
        algorithm       VARCHAR,
        seed            BIGINT,
        dataset         VARCHAR,
        tol             DOUBLE NOT NULL,
        dtype           VARCHAR,
        n_params        BIGINT NOT NULL,
        n_updated       BIGINT NOT NULL,
        sparsity        DOUBLE NOT NULL,
        created_at      TIMESTAMP NOT NULL,
        hub_repo        VARCHAR,
        hub_revision    VARCHAR,
        tags            VARCHAR[],
        n_tensors       INTEGER NOT NULL,
        format_version  INTEGER NOT NULL,
        operation       VARCHAR,
        parents         VARCHAR[],
        notes           VARCHAR
    );
    CREATE TABLE tensors (
        mask_id      VARCHAR NOT NULL,
        tensor       VARCHAR NOT NULL,
        layer        INTEGER,
        module       VARCHAR NOT NULL,
        shape        BIGINT[] NOT NULL,
        numel        BIGINT NOT NULL,
        n_updated    BIGINT NOT NULL,
        sparsity     DOUBLE NOT NULL,
        base_dtype   VARCHAR,
        target_dtype VARCHAR,
        PRIMARY KEY (mask_id, tensor)
    );
    CREATE TABLE tensor_sweep (
        mask_id   VARCHAR NOT NULL,
        tensor    VARCHAR NOT NULL,
        tol       DOUBLE NOT NULL,
        n_updated BIGINT NOT NULL,
        PRIMARY KEY (mask_id, tensor, tol)
    );
    """,
)

#: Every migration, in order. Append only.
MIGRATIONS: list[Migration] = [M001_CORE]

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    number     INTEGER PRIMARY KEY,
    name       VARCHAR NOT NULL,
    applied_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
)
"""
