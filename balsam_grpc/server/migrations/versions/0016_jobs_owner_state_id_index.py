"""jobs: ix_jobs_owner_id_state_id, the owner's jobs in one state in id order

Revision ID: 0016
Revises: 0015

ListJobs of one state (store.jobs.select_statement compares a single state with `=`)
is ordered by id and stops at the page's end. Without this index PostgreSQL walked the
primary key and filtered: every job of the owner in other states before the first one
listed was read. bench_load's lists (tags + state, page of 100) on a 50,000-job
database whose first 12,000 jobs were leased: a first page read 13,500 rows
(13-16 ms of the database's CPU); with this index it reads the page's own state only
(1,500 rows for a tag that one job in 16 carries, 1 ms). ix_jobs_owner_id_state_site_id
cannot serve it: its rows of one state are in site order. Every state change writes an
entry here, as it does in that index (a change of state is never a HOT update).
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_owner_id_state_id", "jobs", ["owner_id", "state", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_id_state_id", table_name="jobs")
