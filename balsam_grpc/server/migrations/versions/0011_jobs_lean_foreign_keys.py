"""jobs: no foreign keys on PostgreSQL; an app's deletion takes its jobs by trigger

Revision ID: 0011
Revises: 0010

A bulk create spent half of PostgreSQL's time per job checking jobs' three foreign keys
(a query per key and row: ~3.5 us each, measured with COPY of 10,000 jobs, 21 us/job
with them and 10 without). Integrity stays as it was:

- owner_id and site_id are the app's (store.jobs.create_jobs takes both from the app row
  it resolved for the owner), and apps cascade from users and sites, so whatever
  removed a job through these keys removes it through its app. Dropped.
- app_id: its check is what a create does once per app instead of once per job: the
  create reads each app FOR KEY SHARE (store.jobs._lookups), so an app cannot be deleted
  between that read and the create's commit, as the key's own check ensured. Its
  ON DELETE CASCADE becomes a statement trigger on apps that deletes the jobs of the
  deleted apps (fired by cascades from sites and users too).

SQLite keeps all three: there a check is an index probe inside the server process, and
dropping a foreign key means rebuilding `jobs` (copy, drop, rename), which loses its
job_counts triggers and the `priority DESC` index Alembic cannot reflect; the bulk
speed this serves is PostgreSQL's. tables.py declares the PostgreSQL schema and
tests/server/test_schema.py names the keys SQLite keeps.
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# (constraint, column, referred table)
DROPPED = (("fk_jobs_owner_id_users", "owner_id", "users"), ("fk_jobs_site_id_sites", "site_id", "sites"),
           ("fk_jobs_app_id_apps", "app_id", "apps"))
PG_FUNCTION = """
CREATE FUNCTION balsam_delete_apps_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM jobs WHERE app_id IN (SELECT id FROM deleted_apps);
  RETURN NULL;
END $$
"""
PG_TRIGGER = ("CREATE TRIGGER apps_delete_jobs AFTER DELETE ON apps REFERENCING OLD TABLE AS deleted_apps "
              "FOR EACH STATEMENT EXECUTE FUNCTION balsam_delete_apps_jobs()")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, _, _ in DROPPED:
        op.drop_constraint(name, "jobs", type_="foreignkey")
    op.execute(PG_FUNCTION)
    op.execute(PG_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS apps_delete_jobs ON apps")
    op.execute("DROP FUNCTION IF EXISTS balsam_delete_apps_jobs()")
    for name, column, referred in DROPPED:
        op.create_foreign_key(name, "jobs", referred, [column], ["id"], ondelete="CASCADE")
