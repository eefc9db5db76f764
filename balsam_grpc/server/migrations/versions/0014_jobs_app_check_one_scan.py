"""jobs (PostgreSQL): the app check of an INSERT reads the new jobs once

Revision ID: 0014
Revises: 0013

Revision 0011's statement trigger (jobs_app_exists) read the INSERT's transition table
twice, a DISTINCT over every new job each time: once to lock the apps, once to find a
missing one. It now gathers the distinct app ids once and does both from them. Same
locks, same error. EXPLAIN ANALYZE of an INSERT of 10,000 jobs (10 alternated pairs,
load ~10): the trigger 13.9 -> 3.8 ms.
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

ONE_SCAN = """
CREATE OR REPLACE FUNCTION balsam_jobs_app_exists() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  app_ids bigint[];
  missing bigint;
BEGIN
  SELECT array_agg(DISTINCT app_id) INTO app_ids FROM new_jobs;
  PERFORM 1 FROM apps WHERE id = ANY (app_ids) FOR KEY SHARE;
  SELECT d.id INTO missing FROM unnest(app_ids) AS d(id)
  WHERE NOT EXISTS (SELECT 1 FROM apps AS a WHERE a.id = d.id) LIMIT 1;
  IF FOUND THEN
    RAISE foreign_key_violation USING MESSAGE = format('jobs.app_id %s: no such app', missing);
  END IF;
  RETURN NULL;
END $$
"""

# Revision 0011's.
TWO_SCANS = """
CREATE OR REPLACE FUNCTION balsam_jobs_app_exists() RETURNS trigger LANGUAGE plpgsql AS $$
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
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(ONE_SCAN)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(TWO_SCANS)
