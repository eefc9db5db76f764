"""jobs: ix_jobs_owner_id_state_site_id becomes ix_jobs_owner_id_state_id_site_id

Revision ID: 0019
Revises: 0018

ListJobs of a state (and tags) in id order, a page of 100: with the index of (owner,
state, site) no index gives the state's jobs in id order, so PostgreSQL and SQLite
walked the primary key and filtered, reading every older job of the owner in another
state before the first one listed (bench_load: ~13,500 rows for a page, 7.5-14 ms; a
list of RUNNING jobs among a million older FINISHED ones reads a million). With id
after the state, a state's jobs are in id order in the index; store.jobs writes such a
list so that walking them is the only way to get its order (store.jobs._list_sql).

Measured: bench_load --only list (a page of 100, tags + state, 12,000 oldest seeded jobs
leased away): PostgreSQL CPU per list 6.1 -> 1.4 ms (medians of 3 alternated runs); its
first page 20 ms / 13,505 rows through pk_jobs -> 1.0 ms / 1,505 rows (EXPLAIN ANALYZE).

Replaced, not added: every state change writes one entry either way (jobs get no HOT
updates); PostgreSQL instructions per job on the launcher's report path unchanged
(bench_reports under callgrind). site_id stays in the key, after id: a query of one
site's jobs in some states (the site stream's backlog, hook work, site figures, a
site's running jobs) tests it inside the index and reads no row of another site's
jobs. What it costs: the old key repeated, so PostgreSQL stored it deduplicated (2 MB
against 17 MB at 300,000 jobs), and a query that counts every waiting job of a site
reads one index entry per job, and the entries of the owner's other sites in those
states. Backend CPU (medians of 5, 300,000 jobs): the site stream's backlog +12 % for an
owner's only site (16,700 running jobs) or a site holding four fifths of its owner's
waiting jobs (40,000), +38 % for the site holding the other fifth; site figures
(GetSiteStatistics) +23-28 %.
"""

from __future__ import annotations

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_owner_id_state_id_site_id", "jobs", ["owner_id", "state", "id", "site_id"], unique=False)
    op.drop_index("ix_jobs_owner_id_state_site_id", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_owner_id_state_site_id", "jobs", ["owner_id", "state", "site_id"], unique=False)
    op.drop_index("ix_jobs_owner_id_state_id_site_id", table_name="jobs")
