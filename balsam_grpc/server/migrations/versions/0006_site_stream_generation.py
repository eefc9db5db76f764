"""sites.stream_generation: which connection holds a site's stream, across replicas

Revision ID: 0006
Revises: 0005

Every SiteService.Connect increments it and keeps the value; the stream's writes
(results, liveness) are applied only while it is still the site's current generation, so
a stream that another connection (on any server replica) took over can no longer change
anything, and replicas tell the older stream to end.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stream_generation", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.drop_column("stream_generation")
