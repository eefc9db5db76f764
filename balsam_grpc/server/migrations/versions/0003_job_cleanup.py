"""jobs.cleaned_time / cleanup_info: the site daemon's workdir cleanup is recorded once

Revision ID: 0003
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None

_DUE = "state = 'JOB_FINISHED' AND cleaned_time IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cleaned_time", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("cleanup_info", sa.Text(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_cleanup_due", ["site_id", "app_id", "id"], unique=False,
                              postgresql_where=sa.text(_DUE), sqlite_where=sa.text(_DUE))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_cleanup_due", postgresql_where=sa.text(_DUE), sqlite_where=sa.text(_DUE))
        batch_op.drop_column("cleanup_info")
        batch_op.drop_column("cleaned_time")
