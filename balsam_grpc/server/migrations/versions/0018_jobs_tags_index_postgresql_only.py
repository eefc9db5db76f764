"""jobs (SQLite): no index on the tags column

Revision ID: 0018
Revises: 0017

On PostgreSQL ix_jobs_tags_gin is a GIN index that answers tag containment (tags @>
...). On SQLite the same declaration made a B-tree over the whole JSON text, which no
query can use: a tag filter there is json_extract(tags, '$.key') = value per pair. Every
insert and every change of a job's tags still paid for an entry keyed by that text.

Measured with SQLite alone (executemany of 20,000 rows in chunks of 1,000, tags of three
keys, the jobs table's other B-tree indexes present): 4.1 us of CPU per row with the
index, 2.7 us without, three runs each. Against the server's ~60 us per job in a
1,000-job create that is ~2 %; on tag updates the same entry is rewritten. PostgreSQL is
untouched.
"""

from __future__ import annotations

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.drop_index("ix_jobs_tags_gin", table_name="jobs")  # SQLite drops an index in place


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.create_index("ix_jobs_tags_gin", "jobs", ["tags"], unique=False)
