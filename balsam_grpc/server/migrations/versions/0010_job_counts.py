"""job_counts: jobs per (owner, site, state) kept by triggers; leaner job indexes

Revision ID: 0010
Revises: 0009

CountJobs grouped by state counted the owner's rows, which grows with the table (about
a second at 1,000,000 jobs). job_counts holds the counts, written by triggers on jobs in
the same transaction as every insert, state change and delete, cascades included (a
site, app or user deleted takes its jobs, and their counts, with it):

- PostgreSQL: statement triggers with transition tables add one row per (owner, site,
  state) and transaction (`shard` = the transaction id), so writers never wait on each
  other's counters; store.job_counts.compact folds committed rows into shard 0.
- SQLite (one writer): row triggers update shard 0 in place.

Indexes on jobs, reviewed against the queries that use them (EXPLAIN):
- ix_jobs_runnable (site, priority DESC, id; runnable jobs) is a prefix of
  ix_jobs_lease_order with the same predicate: every query it served uses that one.
- ix_jobs_session_id and ix_jobs_batch_job_id become partial (`IS NOT NULL`): every
  query on them asks for one value, and a new job has neither, so creating one no longer
  writes an entry into either.

A later migration that rebuilds `jobs` (SQLite batch mode: copy, drop, rename) drops
its triggers and must create them again (this revision's PG_FUNCTION, PG_TRIGGERS and
SQLITE_TRIGGERS; tests/server/test_job_counts.py fails if they are missing).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_RUNNABLE = "state IN ('PREPROCESSED', 'RESTART_READY')"
_LEASE_COLUMNS = ["site_id", sa.text("priority DESC"), "id"]

PG_FUNCTION = """
CREATE FUNCTION balsam_job_counts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO job_counts (owner_id, site_id, state, shard, n)
    SELECT owner_id, site_id, state, txid_current(), count(*) FROM new_jobs
    GROUP BY owner_id, site_id, state ORDER BY owner_id, site_id, state
    ON CONFLICT (owner_id, site_id, state, shard) DO UPDATE SET n = job_counts.n + excluded.n;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO job_counts (owner_id, site_id, state, shard, n)
    SELECT owner_id, site_id, state, txid_current(), -count(*) FROM old_jobs
    GROUP BY owner_id, site_id, state ORDER BY owner_id, site_id, state
    ON CONFLICT (owner_id, site_id, state, shard) DO UPDATE SET n = job_counts.n + excluded.n;
  ELSE
    INSERT INTO job_counts (owner_id, site_id, state, shard, n)
    SELECT owner_id, site_id, state, txid_current(), sum(d) FROM (
      SELECT owner_id, site_id, state, -1 AS d FROM old_jobs
      UNION ALL SELECT owner_id, site_id, state, 1 AS d FROM new_jobs) AS changes
    GROUP BY owner_id, site_id, state HAVING sum(d) <> 0 ORDER BY owner_id, site_id, state
    ON CONFLICT (owner_id, site_id, state, shard) DO UPDATE SET n = job_counts.n + excluded.n;
  END IF;
  RETURN NULL;
END $$
"""
PG_TRIGGERS = [
    "CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_jobs "
    "FOR EACH STATEMENT EXECUTE FUNCTION balsam_job_counts()",
    "CREATE TRIGGER job_counts_update AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs "
    "FOR EACH STATEMENT EXECUTE FUNCTION balsam_job_counts()",
    "CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_jobs "
    "FOR EACH STATEMENT EXECUTE FUNCTION balsam_job_counts()",
]
_SQLITE_ADD = ("INSERT INTO job_counts (owner_id, site_id, state, shard, n) VALUES ({row}.owner_id, {row}.site_id, "
               "{row}.state, 0, {d}) ON CONFLICT (owner_id, site_id, state, shard) DO UPDATE SET n = n + ({d});")
SQLITE_TRIGGERS = [
    f"CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs BEGIN {_SQLITE_ADD.format(row='NEW', d=1)} END",
    f"CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs BEGIN {_SQLITE_ADD.format(row='OLD', d=-1)} END",
    "CREATE TRIGGER job_counts_update AFTER UPDATE OF owner_id, site_id, state ON jobs "
    "WHEN OLD.state IS NOT NEW.state OR OLD.site_id IS NOT NEW.site_id OR OLD.owner_id IS NOT NEW.owner_id "
    f"BEGIN {_SQLITE_ADD.format(row='OLD', d=-1)} {_SQLITE_ADD.format(row='NEW', d=1)} END",
]
TRIGGER_NAMES = ("job_counts_insert", "job_counts_update", "job_counts_delete")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_runnable", postgresql_where=sa.text(_RUNNABLE), sqlite_where=sa.text(_RUNNABLE))
        batch_op.drop_index("ix_jobs_session_id")
        batch_op.drop_index("ix_jobs_batch_job_id")
        batch_op.create_index("ix_jobs_session_id", ["session_id"], unique=False,
                              postgresql_where=sa.text("session_id IS NOT NULL"),
                              sqlite_where=sa.text("session_id IS NOT NULL"))
        batch_op.create_index("ix_jobs_batch_job_id", ["batch_job_id"], unique=False,
                              postgresql_where=sa.text("batch_job_id IS NOT NULL"),
                              sqlite_where=sa.text("batch_job_id IS NOT NULL"))
    id_type = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "job_counts",
        sa.Column("owner_id", id_type, nullable=False),
        sa.Column("site_id", id_type, nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("shard", sa.BigInteger(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("owner_id", "site_id", "state", "shard", name=op.f("pk_job_counts")),
    )
    op.execute("INSERT INTO job_counts (owner_id, site_id, state, shard, n) "
               "SELECT owner_id, site_id, state, 0, count(*) FROM jobs GROUP BY owner_id, site_id, state")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        for ddl in PG_TRIGGERS:
            op.execute(ddl)
    else:
        for ddl in SQLITE_TRIGGERS:
            op.execute(ddl)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for name in TRIGGER_NAMES:
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON jobs" if postgres else f"DROP TRIGGER IF EXISTS {name}")
    if postgres:
        op.execute("DROP FUNCTION IF EXISTS balsam_job_counts()")
    op.drop_table("job_counts")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_batch_job_id", postgresql_where=sa.text("batch_job_id IS NOT NULL"),
                            sqlite_where=sa.text("batch_job_id IS NOT NULL"))
        batch_op.drop_index("ix_jobs_session_id", postgresql_where=sa.text("session_id IS NOT NULL"),
                            sqlite_where=sa.text("session_id IS NOT NULL"))
        batch_op.create_index("ix_jobs_batch_job_id", ["batch_job_id"], unique=False)
        batch_op.create_index("ix_jobs_session_id", ["session_id"], unique=False)
        batch_op.create_index("ix_jobs_runnable", _LEASE_COLUMNS, unique=False,
                              postgresql_where=sa.text(_RUNNABLE), sqlite_where=sa.text(_RUNNABLE))
