"""jobs: no foreign keys on PostgreSQL; an app's deletion takes its jobs by trigger

Revision ID: 0011
Revises: 0010

A bulk create spent half of PostgreSQL's time per job checking jobs' three foreign keys
(a query per key and row: ~3.5 us each, measured with COPY of 10,000 jobs, 21 us/job
with them and 10 without). Integrity stays as it was:

- owner_id and site_id are the app's (store.jobs.create_jobs takes both from the app row
  it resolved for the owner), and apps cascade from users and sites, so whatever
  removed a job through these keys removes it through its app. Dropped.
- app_id: its check becomes a statement trigger on jobs that, once per INSERT instead
  of once per row, locks the new jobs' apps FOR KEY SHARE (as the key's check does, so
  an app cannot be deleted before the create commits) and raises foreign_key_violation
  when one is missing. Its ON DELETE CASCADE becomes a statement trigger on apps that
  deletes the deleted apps' jobs (fired by cascades from sites and users too). Nothing
  changes a job's app_id, so there is no UPDATE check.

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
PG_FUNCTIONS = ["""
CREATE FUNCTION balsam_jobs_app_exists() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  missing bigint;
BEGIN
  PERFORM 1 FROM apps WHERE id IN (SELECT DISTINCT app_id FROM new_jobs) FOR KEY SHARE;
  SELECT d.app_id INTO missing FROM (SELECT DISTINCT app_id FROM new_jobs) AS d
  WHERE NOT EXISTS (SELECT 1 FROM apps AS a WHERE a.id = d.app_id) LIMIT 1;
  IF FOUND THEN
    RAISE foreign_key_violation USING MESSAGE = format('jobs.app_id %s: no such app', missing);
  END IF;
  RETURN NULL;
END $$
""", """
CREATE FUNCTION balsam_delete_apps_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM jobs WHERE app_id IN (SELECT id FROM deleted_apps);
  RETURN NULL;
END $$
"""]
PG_TRIGGERS = [
    "CREATE TRIGGER jobs_app_exists AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_jobs "
    "FOR EACH STATEMENT EXECUTE FUNCTION balsam_jobs_app_exists()",
    "CREATE TRIGGER apps_delete_jobs AFTER DELETE ON apps REFERENCING OLD TABLE AS deleted_apps "
    "FOR EACH STATEMENT EXECUTE FUNCTION balsam_delete_apps_jobs()",
]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, _, _ in DROPPED:
        op.drop_constraint(name, "jobs", type_="foreignkey")
    for ddl in (*PG_FUNCTIONS, *PG_TRIGGERS):
        op.execute(ddl)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS apps_delete_jobs ON apps")
    op.execute("DROP TRIGGER IF EXISTS jobs_app_exists ON jobs")
    op.execute("DROP FUNCTION IF EXISTS balsam_delete_apps_jobs()")
    op.execute("DROP FUNCTION IF EXISTS balsam_jobs_app_exists()")
    for name, column, referred in DROPPED:
        op.create_foreign_key(name, "jobs", referred, [column], ["id"], ondelete="CASCADE")
