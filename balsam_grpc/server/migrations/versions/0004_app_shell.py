"""apps.shell: an app declares that its command template is a bash script

Revision ID: 0004
Revises: 0002

Without it a command template is split into an argument vector and run without a shell,
so a parameter's value is always exactly one argument. Existing apps become argv apps;
the site daemon re-registers its apps (with `shell = True` where declared) when it starts.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("apps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shell", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("apps", schema=None) as batch_op:
        batch_op.drop_column("shell")
