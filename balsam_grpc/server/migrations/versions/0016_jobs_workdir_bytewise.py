"""jobs (PostgreSQL): workdir compared byte by byte (COLLATE "C")

Revision ID: 0016
Revises: 0015

Every job inserted puts (site_id, workdir) into the unique index uq_jobs_site_id_workdir,
and within a site the workdirs are what the index compares: about twenty comparisons per
insert. With the database's collation (anything but "C" or "POSIX", C.UTF-8 included)
each is a collation-aware comparison: both strings copied to be NUL-terminated, the
collation's locale looked up, strcoll_l. With "C" it is a memcmp.

Measured with callgrind on PostgreSQL 15 (C.UTF-8 database), one 10,000-job
BatchCreateJobs on a fresh database, 2 alternated pairs: 153 -> 151 kIr per job in the
creating backend. A database with a richer collation (en_US.UTF-8) pays more per
comparison than C.UTF-8's.

What changes for clients: nothing for equality (a deterministic collation's equality is
byte equality already: the same workdirs are taken or free); ListJobs ordered by workdir
sorts by code point, which is what SQLite (BINARY) and a C.UTF-8 database did already
(an en_US database ordered case-insensitively first). The index is rebuilt; the table is
not rewritten.
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute('ALTER TABLE jobs ALTER COLUMN workdir TYPE TEXT COLLATE "C"')


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE jobs ALTER COLUMN workdir TYPE TEXT COLLATE pg_catalog.\"default\"")
