"""SQL schema of the registry index, as an ordered list of numbered migrations.

A migration is applied exactly once, in order, the first time an index is opened by a
maskhub that knows it; ``schema_migrations`` records which ones ran. Never edit a released
migration: append a new one.
"""

from __future__ import annotations

from dataclasses import dataclass

from maskhub.schemas.comments import comment_sql


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

M002_OVERLAPS = Migration(
    2,
    "overlap analytics: overlaps, tensor_overlaps, mask_lineage and their views",
    """
    CREATE TABLE "overlaps" (
        mask_a              VARCHAR NOT NULL,
        mask_b              VARCHAR NOT NULL,
        n_params            BIGINT NOT NULL,
        n_tensors           INTEGER NOT NULL,
        n_a                 BIGINT NOT NULL,
        n_b                 BIGINT NOT NULL,
        n_both              BIGINT NOT NULL,
        o1                  DOUBLE,
        o2                  DOUBLE,
        o1_random           DOUBLE,
        o2_random           DOUBLE,
        o1_stratified       DOUBLE,
        o2_stratified       DOUBLE,
        jaccard             DOUBLE,
        expected_random     DOUBLE NOT NULL,
        expected_stratified DOUBLE NOT NULL,
        var_stratified      DOUBLE NOT NULL,
        z_score             DOUBLE,
        p_value             DOUBLE,
        log10_p_value       DOUBLE,
        computed_at         TIMESTAMP NOT NULL,
        PRIMARY KEY (mask_a, mask_b)
    );
    CREATE TABLE tensor_overlaps (
        mask_a   VARCHAR NOT NULL,
        mask_b   VARCHAR NOT NULL,
        position INTEGER NOT NULL,
        tensor   VARCHAR NOT NULL,
        layer    INTEGER,
        module   VARCHAR NOT NULL,
        numel    BIGINT NOT NULL,
        n_a      BIGINT NOT NULL,
        n_b      BIGINT NOT NULL,
        n_both   BIGINT NOT NULL,
        PRIMARY KEY (mask_a, mask_b, tensor)
    );
    CREATE TABLE mask_lineage (
        mask_id   VARCHAR NOT NULL,
        position  INTEGER NOT NULL,
        parent_id VARCHAR NOT NULL,
        operation VARCHAR NOT NULL,
        min_count INTEGER,
        PRIMARY KEY (mask_id, position)
    );
    CREATE VIEW overlap_pairs AS
        SELECT mask_a, mask_b, n_params, n_tensors, n_a, n_b, n_both, o1, o2, o1_random,
               o2_random, o1_stratified, o2_stratified, jaccard, expected_random,
               expected_stratified, var_stratified, z_score, p_value, log10_p_value,
               computed_at
        FROM "overlaps"
        UNION ALL
        SELECT o.mask_b, o.mask_a, o.n_params, o.n_tensors, o.n_b, o.n_a, o.n_both, o.o2, o.o1,
               o.o2_random, o.o1_random, o.o2_stratified, o.o1_stratified, o.jaccard,
               o.expected_random, o.expected_stratified, o.var_stratified, o.z_score,
               o.p_value, o.log10_p_value, o.computed_at
        FROM "overlaps" o
        WHERE NOT EXISTS (SELECT 1 FROM "overlaps" r
                          WHERE r.mask_a = o.mask_b AND r.mask_b = o.mask_a);
    CREATE VIEW overlap_summary AS
        SELECT a.name AS name_a, b.name AS name_b, a.base_model,
               a.algorithm AS algorithm_a, b.algorithm AS algorithm_b,
               p.*,
               p.n_both / nullif(p.expected_random, 0) AS lift_random,
               p.n_both / nullif(p.expected_stratified, 0) AS lift_stratified,
               p.o1 - p.o1_stratified AS o1_excess,
               p.o2 - p.o2_stratified AS o2_excess
        FROM overlap_pairs p
        JOIN masks a ON a.id = p.mask_a
        JOIN masks b ON b.id = p.mask_b;
    CREATE VIEW tensor_overlap_pairs AS
        SELECT mask_a, mask_b, position, tensor, layer, module, numel, n_a, n_b, n_both
        FROM tensor_overlaps
        UNION ALL
        SELECT t.mask_b, t.mask_a, t.position, t.tensor, t.layer, t.module, t.numel, t.n_b,
               t.n_a, t.n_both
        FROM tensor_overlaps t
        WHERE NOT EXISTS (SELECT 1 FROM "overlaps" r
                          WHERE r.mask_a = t.mask_b AND r.mask_b = t.mask_a);
    CREATE VIEW module_overlaps AS
        SELECT a.name AS name_a, b.name AS name_b, t.mask_a, t.mask_b, t.module,
               count(*) AS n_tensors, sum(t.numel) AS numel, sum(t.n_a) AS n_a,
               sum(t.n_b) AS n_b, sum(t.n_both) AS n_both,
               sum(t.n_both) / nullif(sum(t.n_a), 0) AS o1,
               sum(t.n_both) / nullif(sum(t.n_b), 0) AS o2,
               sum(t.n_b) / nullif(sum(t.numel), 0) AS o1_random,
               sum(t.n_a) / nullif(sum(t.numel), 0) AS o2_random,
               sum(t.n_a::DOUBLE * t.n_b / nullif(t.numel, 0)) / nullif(sum(t.n_a), 0)
                   AS o1_stratified,
               sum(t.n_a::DOUBLE * t.n_b / nullif(t.numel, 0)) / nullif(sum(t.n_b), 0)
                   AS o2_stratified
        FROM tensor_overlap_pairs t
        JOIN masks a ON a.id = t.mask_a
        JOIN masks b ON b.id = t.mask_b
        GROUP BY a.name, b.name, t.mask_a, t.mask_b, t.module;
    CREATE VIEW layer_overlaps AS
        SELECT a.name AS name_a, b.name AS name_b, t.mask_a, t.mask_b, t.layer,
               count(*) AS n_tensors, sum(t.numel) AS numel, sum(t.n_a) AS n_a,
               sum(t.n_b) AS n_b, sum(t.n_both) AS n_both,
               sum(t.n_both) / nullif(sum(t.n_a), 0) AS o1,
               sum(t.n_both) / nullif(sum(t.n_b), 0) AS o2,
               sum(t.n_b) / nullif(sum(t.numel), 0) AS o1_random,
               sum(t.n_a) / nullif(sum(t.numel), 0) AS o2_random,
               sum(t.n_a::DOUBLE * t.n_b / nullif(t.numel, 0)) / nullif(sum(t.n_a), 0)
                   AS o1_stratified,
               sum(t.n_a::DOUBLE * t.n_b / nullif(t.numel, 0)) / nullif(sum(t.n_b), 0)
                   AS o2_stratified
        FROM tensor_overlap_pairs t
        JOIN masks a ON a.id = t.mask_a
        JOIN masks b ON b.id = t.mask_b
        WHERE t.layer IS NOT NULL
        GROUP BY a.name, b.name, t.mask_a, t.mask_b, t.layer;
    """,
)


M004_ANALYSIS = Migration(
    4,
    "analysis: tensor_analysis, trajectories, trajectory_points",
    """
    CREATE TABLE tensor_analysis (
        mask_id         VARCHAR NOT NULL,
        tensor          VARCHAR NOT NULL,
        rank            BIGINT,
        max_rank        BIGINT,
        rank_fraction   DOUBLE,
        rank_rtol       DOUBLE,
        sign_flips      BIGINT,
        mean_abs_delta  DOUBLE,
        max_abs_delta   DOUBLE,
        mean_rel_delta  DOUBLE,
        max_rel_delta   DOUBLE,
        n_sub_bf16_step BIGINT,
        PRIMARY KEY (mask_id, tensor)
    );
    CREATE TABLE trajectories (
        id             VARCHAR PRIMARY KEY,
        name           VARCHAR NOT NULL,
        tol            DOUBLE NOT NULL,
        n_checkpoints  INTEGER NOT NULL,
        n_params       BIGINT NOT NULL,
        n_never        BIGINT NOT NULL,
        n_cancelled    BIGINT NOT NULL,
        n_subnetwork   BIGINT NOT NULL,
        final_mask_id  VARCHAR NOT NULL,
        ever_mask_id   VARCHAR NOT NULL,
        created_at     TIMESTAMP NOT NULL
    );
    CREATE TABLE trajectory_points (
        trajectory_id      VARCHAR NOT NULL,
        idx                INTEGER NOT NULL,
        step               BIGINT NOT NULL,
        checkpoint         VARCHAR NOT NULL,
        revision           VARCHAR,
        n_updated_vs_first BIGINT NOT NULL,
        n_updated_vs_prev  BIGINT NOT NULL,
        n_ever             BIGINT NOT NULL,
        PRIMARY KEY (trajectory_id, idx)
    );
    """,
)

M005_STORE_URL = Migration(
    5,
    "masks.store_url: the URL of a store kept outside the home (s3://...)",
    """
    ALTER TABLE masks ADD COLUMN store_url VARCHAR;
    """,
)

M006_MAGNITUDE_STRATA = Migration(
    6,
    "tensor_strata (entries and updated entries per exponent of |θ0|) and the "
    "magnitude-stratified baseline in overlaps",
    """
    CREATE TABLE tensor_strata (
        mask_id   VARCHAR NOT NULL,
        tensor    VARCHAR NOT NULL,
        stratum   INTEGER NOT NULL,
        numel     BIGINT NOT NULL,
        n_updated BIGINT NOT NULL,
        PRIMARY KEY (mask_id, tensor, stratum)
    );
    ALTER TABLE "overlaps" ADD COLUMN expected_magnitude DOUBLE;
    ALTER TABLE "overlaps" ADD COLUMN var_magnitude DOUBLE;
    ALTER TABLE "overlaps" ADD COLUMN o1_magnitude DOUBLE;
    ALTER TABLE "overlaps" ADD COLUMN o2_magnitude DOUBLE;
    ALTER TABLE "overlaps" ADD COLUMN z_magnitude DOUBLE;
    ALTER TABLE "overlaps" ADD COLUMN log10_p_magnitude DOUBLE;
    DROP VIEW overlap_summary;
    DROP VIEW overlap_pairs;
    CREATE VIEW overlap_pairs AS
        SELECT mask_a, mask_b, n_params, n_tensors, n_a, n_b, n_both, o1, o2, o1_random,
               o2_random, o1_stratified, o2_stratified, jaccard, expected_random,
               expected_stratified, var_stratified, z_score, p_value, log10_p_value,
               computed_at, expected_magnitude, var_magnitude, o1_magnitude, o2_magnitude,
               z_magnitude, log10_p_magnitude
        FROM "overlaps"
        UNION ALL
        SELECT o.mask_b, o.mask_a, o.n_params, o.n_tensors, o.n_b, o.n_a, o.n_both, o.o2, o.o1,
               o.o2_random, o.o1_random, o.o2_stratified, o.o1_stratified, o.jaccard,
               o.expected_random, o.expected_stratified, o.var_stratified, o.z_score,
               o.p_value, o.log10_p_value, o.computed_at, o.expected_magnitude,
               o.var_magnitude, o.o2_magnitude, o.o1_magnitude, o.z_magnitude,
               o.log10_p_magnitude
        FROM "overlaps" o
        WHERE NOT EXISTS (SELECT 1 FROM "overlaps" r
                          WHERE r.mask_a = o.mask_b AND r.mask_b = o.mask_a);
    CREATE VIEW overlap_summary AS
        SELECT a.name AS name_a, b.name AS name_b, a.base_model,
               a.algorithm AS algorithm_a, b.algorithm AS algorithm_b,
               p.*,
               p.n_both / nullif(p.expected_random, 0) AS lift_random,
               p.n_both / nullif(p.expected_stratified, 0) AS lift_stratified,
               p.n_both / nullif(p.expected_magnitude, 0) AS lift_magnitude,
               p.o1 - p.o1_stratified AS o1_excess,
               p.o2 - p.o2_stratified AS o2_excess,
               p.o1 - p.o1_magnitude AS o1_excess_magnitude,
               p.o2 - p.o2_magnitude AS o2_excess_magnitude
        FROM overlap_pairs p
        JOIN masks a ON a.id = p.mask_a
        JOIN masks b ON b.id = p.mask_b;
    """,
)

M007_TRAJECTORY_FIG6 = Migration(
    7,
    "trajectory_points.n_not_in_final (the paper's Figure 6) and tensors.param_kind",
    """
    ALTER TABLE trajectory_points ADD COLUMN n_not_in_final BIGINT;
    ALTER TABLE tensors ADD COLUMN param_kind VARCHAR;
    UPDATE tensors SET param_kind = CASE
        WHEN tensor LIKE '%.weight' THEN 'weight'
        WHEN tensor LIKE '%.bias' THEN 'bias'
        ELSE regexp_extract(tensor, '[^.]+$') END;
    """,
)

M008_MASK_TENSORS = Migration(
    8,
    "mask_tensors: tensors joined to their mask, every column named without ambiguity",
    """
    CREATE VIEW mask_tensors AS
        SELECT m.id AS mask_id, m.name AS mask_name, m.base_model, m.target_model,
               m.algorithm, m.seed, m.dataset, m.tol, m.n_params AS mask_n_params,
               m.n_updated AS mask_n_updated, m.sparsity AS mask_sparsity,
               t.tensor, t.layer, t.module, t.param_kind, t.shape, t.numel,
               t.n_updated AS tensor_n_updated, t.sparsity AS tensor_sparsity,
               t.base_dtype, t.target_dtype
        FROM masks m
        JOIN tensors t ON t.mask_id = m.id;
    """,
)

M009_HAS_VALUES = Migration(
    9,
    "masks.has_values: the store is a patch (it holds the target's values at the set bits)",
    """
    ALTER TABLE masks ADD COLUMN has_values BOOLEAN DEFAULT false;
    UPDATE masks SET has_values = false WHERE has_values IS NULL;
    """,
)

M016_LIVE_TRAJECTORY = Migration(
    16,
    "trajectory_points.n_updated_vs_prev may be NULL: a live recording that does not keep "
    "the previous values cannot count them",
    """
    ALTER TABLE trajectory_points ALTER COLUMN n_updated_vs_prev DROP NOT NULL;
    """,
)

M010_PRECISION_NULL = Migration(
    10,
    "precision null: masks and tensors record the entries that could not have changed at "
    "the run's movement budget (maskhub.kernels.precision)",
    """
    ALTER TABLE masks ADD COLUMN max_abs_update DOUBLE;
    ALTER TABLE masks ADD COLUMN null_budget DOUBLE;
    ALTER TABLE masks ADD COLUMN null_budget_source VARCHAR;
    ALTER TABLE masks ADD COLUMN n_null BIGINT;
    ALTER TABLE masks ADD COLUMN n_null_updated BIGINT;
    ALTER TABLE masks ADD COLUMN null_share DOUBLE;
    ALTER TABLE masks ADD COLUMN sparsity_movable DOUBLE;
    ALTER TABLE tensors ADD COLUMN max_abs_update DOUBLE;
    ALTER TABLE tensors ADD COLUMN n_null BIGINT;
    ALTER TABLE tensors ADD COLUMN n_null_updated BIGINT;
    ALTER TABLE tensors ADD COLUMN sparsity_movable DOUBLE;
    """,
)

M012_FINGERPRINTS = Migration(
    12,
    "masks.base_fingerprint, masks.target_fingerprint (content identity of each checkpoint) "
    "and masks.edited_at / masks.edits (maskhub edit)",
    """
    ALTER TABLE masks ADD COLUMN base_fingerprint VARCHAR;
    ALTER TABLE masks ADD COLUMN target_fingerprint VARCHAR;
    ALTER TABLE masks ADD COLUMN edited_at TIMESTAMP;
    ALTER TABLE masks ADD COLUMN edits VARCHAR[];
    """,
)

M020_COMMENTS = Migration(
    20,
    "COMMENT ON every table, view and column of the index (issue 26): what each column "
    "means, for duckdb CLI and client users",
    comment_sql(),
)

#: Every migration, in order. Append only.
MIGRATIONS: list[Migration] = [M001_CORE, M002_OVERLAPS, M004_ANALYSIS, M005_STORE_URL,
                               M006_MAGNITUDE_STRATA, M007_TRAJECTORY_FIG6, M008_MASK_TENSORS,
                               M009_HAS_VALUES, M010_PRECISION_NULL, M012_FINGERPRINTS,
                               M016_LIVE_TRAJECTORY, M020_COMMENTS]

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    number     INTEGER PRIMARY KEY,
    name       VARCHAR NOT NULL,
    applied_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')
)
"""
