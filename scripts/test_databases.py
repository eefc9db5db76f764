#!/usr/bin/env python3
"""The test run's PostgreSQL databases at 127.0.0.1:5432 (used by scripts/run_tests.sh).

    test_databases.py fresh NAME   drop and create NAME (refused while another run uses it)
    test_databases.py drop NAME    drop NAME and every NAME_* database the tests made
"""

from __future__ import annotations

import sys

import psycopg
from psycopg import sql

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def fresh(name: str) -> None:
    # No DROP ... WITH (FORCE): a concurrent run using the same database should fail here,
    # not lose its connections halfway through.
    try:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        sys.exit(f"cannot recreate database {name}: {exc}\n(another run using it? set BALSAM_TEST_DB_NAME)")


def drop(name: str) -> None:
    escaped = name.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        names = [row[0] for row in conn.execute(
            "SELECT datname FROM pg_database WHERE datname = %s OR datname LIKE %s", (name, escaped + "\\_%"))]
        for found in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(found)))
    print(f"dropped {len(names)} test database(s){': ' + ', '.join(sorted(names)) if names else ''}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("fresh", "drop"):
        sys.exit(__doc__)
    {"fresh": fresh, "drop": drop}[sys.argv[1]](sys.argv[2])
