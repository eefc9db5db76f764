"""integer ids are never reused: AUTOINCREMENT on SQLite

Revision ID: 0005
Revises: 0004

SQLite gives an INTEGER PRIMARY KEY row max(id) + 1, so after the newest job was deleted
the next job got its id, and that job's history mixed with the deleted job's events
(events outlive their jobs). With AUTOINCREMENT SQLite remembers the highest id a table
ever had (in sqlite_sequence) and never hands it out again.

Each table with an integer id is rebuilt in batch mode (create, copy, drop, rename; the
data and the ids are kept) with AUTOINCREMENT, and its sequence starts above the highest
id the database still remembers: its own rows and, for users, sites, jobs, batch jobs
and transfer items, the ids the event log names. The rebuild needs foreign keys off
(dropping a table would otherwise cascade to the rows that refer to it):
store.migrate turns them off before the migration's transaction and checks them
before it commits. Alembic cannot reflect the expression indexes (`priority DESC`), so
they are created again as revisions 0001 and 0002 made them; the partial index of 0003
too, so its predicate is kept whatever the reflection does.

PostgreSQL: nothing to do. Its ids come from sequences, which never hand out a value twice.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# table -> SQL of the ids that table once had and the event log still names.
_NAMED_BY_EVENTS = {
    "users": "SELECT max(owner_id) FROM events",
    "sites": "SELECT max(site_id) FROM events",
    "apps": None,
    "batch_jobs": "SELECT max(subject_id) FROM events WHERE kind = 'batch_job_state'",
    "jobs": "SELECT max(job_id) FROM events",
    "transfer_items": "SELECT max(subject_id) FROM events WHERE kind = 'transfer_state'",
    "events": None,
}
_RUNNABLE = "state IN ('PREPROCESSED', 'RESTART_READY')"
_CLEANUP_DUE = "state = 'JOB_FINISHED' AND cleaned_time IS NULL"
_JOB_INDEXES = {  # name -> (columns, predicate)
    "ix_jobs_runnable": (["site_id", sa.text("priority DESC"), "id"], _RUNNABLE),
    "ix_jobs_lease_order": (["site_id", sa.text("priority DESC"), sa.text("num_nodes DESC"),
                             sa.text("wall_time_min DESC"), "id"], _RUNNABLE),
    "ix_jobs_cleanup_due": (["site_id", "app_id", "id"], _CLEANUP_DUE),
}


def upgrade() -> None:
    if op.get_context().dialect.name != "sqlite":
        return
    _rebuild(autoincrement=True)
    conn = op.get_bind()
    for table, named_by_events in _NAMED_BY_EVENTS.items():
        highest = conn.execute(sa.text(f"SELECT max(id) FROM {table}")).scalar() or 0
        if named_by_events:
            highest = max(highest, conn.execute(sa.text(named_by_events)).scalar() or 0)
        conn.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = :t"), {"t": table})
        conn.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :seq)"),
                     {"t": table, "seq": highest})


def downgrade() -> None:
    if op.get_context().dialect.name != "sqlite":
        return
    _rebuild(autoincrement=False)


def _rebuild(*, autoincrement: bool) -> None:
    for table in _NAMED_BY_EVENTS:
        with op.batch_alter_table(table, recreate="always",
                                  table_kwargs={"sqlite_autoincrement": autoincrement}):
            pass
    for name, (columns, predicate) in _JOB_INDEXES.items():
        op.execute(f"DROP INDEX IF EXISTS {name}")
        op.create_index(name, "jobs", columns, unique=False, sqlite_where=sa.text(predicate))
