"""jobs (PostgreSQL): batch_job_id's foreign key becomes triggers that fire only for a
job that names a batch job

Revision ID: 0013
Revises: 0012

A foreign key's check is queued for every inserted row, even one whose key is NULL
(PostgreSQL reads the row again when the check fires, and only then sees the NULL): a
bulk create of 10,000 jobs, none of which names a batch job (only a lease sets it),
fired 10,000 checks. Integrity stays as it was:

- a job that names a batch job: a row trigger, on INSERT when batch_job_id is not NULL
  and on UPDATE when it changes to another batch job, locks the batch job FOR KEY SHARE
  (as the key's check does: it cannot be deleted before the job's transaction ends) and
  raises foreign_key_violation when it is missing. The WHEN clause is tested as the row
  is written, so a job without one queues nothing.
- ON DELETE SET NULL: a statement trigger on batch_jobs clears the deleted batch jobs'
  ids from their jobs (found through ix_jobs_batch_job_id; fired by the cascades from
  sites and users too).

SQLite keeps the key (as revision 0011 explains for the others).
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

KEY = "fk_jobs_batch_job_id_batch_jobs"
PG_FUNCTIONS = ["""
CREATE FUNCTION balsam_jobs_batch_job_exists() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM 1 FROM batch_jobs WHERE id = NEW.batch_job_id FOR KEY SHARE;
  IF NOT FOUND THEN
    RAISE foreign_key_violation USING MESSAGE = format('jobs.batch_job_id %s: no such batch job', NEW.batch_job_id);
  END IF;
  RETURN NULL;
END $$
""", """
CREATE FUNCTION balsam_batch_jobs_unlink_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE jobs SET batch_job_id = NULL WHERE batch_job_id IN (SELECT id FROM deleted_batch_jobs);
  RETURN NULL;
END $$
"""]
PG_TRIGGERS = [
    "CREATE TRIGGER jobs_batch_job_exists AFTER INSERT ON jobs FOR EACH ROW WHEN (NEW.batch_job_id IS NOT NULL) "
    "EXECUTE FUNCTION balsam_jobs_batch_job_exists()",
    "CREATE TRIGGER jobs_batch_job_changed AFTER UPDATE OF batch_job_id ON jobs FOR EACH ROW "
    "WHEN (NEW.batch_job_id IS NOT NULL AND NEW.batch_job_id IS DISTINCT FROM OLD.batch_job_id) "
    "EXECUTE FUNCTION balsam_jobs_batch_job_exists()",
    "CREATE TRIGGER batch_jobs_unlink_jobs AFTER DELETE ON batch_jobs REFERENCING OLD TABLE AS deleted_batch_jobs "
    "FOR EACH STATEMENT EXECUTE FUNCTION balsam_batch_jobs_unlink_jobs()",
]
TRIGGERS = (("jobs_batch_job_exists", "jobs"), ("jobs_batch_job_changed", "jobs"), ("batch_jobs_unlink_jobs", "batch_jobs"))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_constraint(KEY, "jobs", type_="foreignkey")
    for ddl in (*PG_FUNCTIONS, *PG_TRIGGERS):
        op.execute(ddl)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, table in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
    op.execute("DROP FUNCTION IF EXISTS balsam_batch_jobs_unlink_jobs()")
    op.execute("DROP FUNCTION IF EXISTS balsam_jobs_batch_job_exists()")
    op.create_foreign_key(KEY, "jobs", "batch_jobs", ["batch_job_id"], ["id"], ondelete="SET NULL")
