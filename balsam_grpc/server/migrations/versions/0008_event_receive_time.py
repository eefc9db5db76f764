"""events.receive_time: when the server recorded an event, next to when it happened

Revision ID: 0008
Revises: 0007

A launcher reports when a run really ended; events.time now holds that (bounded by the
job's previous event and the server's clock), and receive_time the server's own clock, so
latency analytics measure the job and the transport separately. Older events keep NULL:
for them the two are the same.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("receive_time", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_column("receive_time")
