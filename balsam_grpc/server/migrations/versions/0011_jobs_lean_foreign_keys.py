"""jobs: drop the foreign keys on owner_id and site_id (PostgreSQL)

Revision ID: 0011
Revises: 0010

Every job row's owner and site are its app's (store.jobs.create_jobs takes both from
the app row it resolved for the owner), and apps cascade from users and sites, so
`app_id`'s ON DELETE CASCADE already removes a job whenever its owner or site goes.
The two other keys only re-checked that, at about 3.5 us per inserted row each on
PostgreSQL (measured with COPY of 10,000 jobs: 22 us/job with them, 15 without), a
third of the database's cost of a bulk create.

SQLite keeps them: there the check is an index probe inside the server process, and
dropping a foreign key means rebuilding `jobs` (copy, drop, rename), which loses its
job_counts triggers and the `priority DESC` index that Alembic cannot reflect; the
bulk-create speed this serves is PostgreSQL's. tables.py declares the PostgreSQL schema
and tests/server/test_schema.py names the two keys SQLite keeps.
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# (constraint, column, referred table)
DROPPED = (("fk_jobs_owner_id_users", "owner_id", "users"), ("fk_jobs_site_id_sites", "site_id", "sites"))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, _, _ in DROPPED:
        op.drop_constraint(name, "jobs", type_="foreignkey")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, column, referred in DROPPED:
        op.create_foreign_key(name, "jobs", referred, [column], ["id"], ondelete="CASCADE")
