"""jobs (PostgreSQL): a lease's links to its batch job are checked once per transaction

Revision ID: 0015
Revises: 0014

Revision 0013's row trigger jobs_batch_job_changed runs a PL/pgSQL call and a query for
every job an UPDATE links to a batch job: a lease links every job it takes to its
session's batch job, so a launcher holding 100 jobs ahead fired 100 of them, each
locking the same batch job FOR KEY SHARE. A lease now takes that lock itself, once, and
says so in a transaction-local setting (store/leases.py, LOCK_BATCH_JOB):

    SELECT set_config('balsam.bj', id::text, true) FROM batch_jobs
    WHERE id = :b FOR KEY SHARE

The trigger's WHEN clause skips a row linked to the batch job named there: this
transaction holds the lock the check would take, and the row it locked exists, until
it ends (a rolled-back savepoint takes the setting back with the lock). Every other new
link is checked per row as before; a missing batch job sets nothing, so its links fire
the check and fail with foreign_key_violation as before. Deleting batch jobs clears the
setting for the rest of the transaction (balsam_batch_jobs_unlink_jobs), so a link made
after a delete is checked again.

Backend instructions (callgrind; a store-level loop of leases, then reports of the jobs
started and ended): a lease holding 100 jobs ahead 341 -> 306 kIr per job, reports
unchanged (332 kIr per job), a single-row UPDATE unchanged (362 kIr). PostgreSQL parses
a trigger's WHEN clause again for every statement that may fire it, and this one is
longer: a lease of one job (which takes no lock of its own: the statement costs more
than the one check it spares) 1,539 -> 1,568 kIr. The setting's name is short for the
same reason.

A statement trigger over the transition tables did the same per UPDATE instead (tried:
lease 341 -> 310 kIr per job) but cost every UPDATE of jobs a second trigger call and a
query over both transition tables: a single-row UPDATE went from 362 to 435 kIr,
reports from 332 to 339 kIr per job.
"""

from __future__ import annotations

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

SETTING = "balsam.bj"
WHEN_LOCKED_SKIPPED = (
    "CREATE TRIGGER jobs_batch_job_changed AFTER UPDATE OF batch_job_id ON jobs FOR EACH ROW "
    "WHEN (NEW.batch_job_id IS NOT NULL AND NEW.batch_job_id IS DISTINCT FROM OLD.batch_job_id "
    f"AND NEW.batch_job_id::text IS DISTINCT FROM current_setting('{SETTING}', true)) "
    "EXECUTE FUNCTION balsam_jobs_batch_job_exists()")
# Revision 0013's.
WHEN_CHANGED = (
    "CREATE TRIGGER jobs_batch_job_changed AFTER UPDATE OF batch_job_id ON jobs FOR EACH ROW "
    "WHEN (NEW.batch_job_id IS NOT NULL AND NEW.batch_job_id IS DISTINCT FROM OLD.batch_job_id) "
    "EXECUTE FUNCTION balsam_jobs_batch_job_exists()")
UNLINK_CLEARING = f"""
CREATE OR REPLACE FUNCTION balsam_batch_jobs_unlink_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM set_config('{SETTING}', '', true);
  UPDATE jobs SET batch_job_id = NULL WHERE batch_job_id IN (SELECT id FROM deleted_batch_jobs);
  RETURN NULL;
END $$
"""
# Revision 0013's.
UNLINK = """
CREATE OR REPLACE FUNCTION balsam_batch_jobs_unlink_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE jobs SET batch_job_id = NULL WHERE batch_job_id IN (SELECT id FROM deleted_batch_jobs);
  RETURN NULL;
END $$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER jobs_batch_job_changed ON jobs")
    op.execute(WHEN_LOCKED_SKIPPED)
    op.execute(UNLINK_CLEARING)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER jobs_batch_job_changed ON jobs")
    op.execute(WHEN_CHANGED)
    op.execute(UNLINK)
