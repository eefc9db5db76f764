"""PostgreSQL settings that break what the server promises, read at start and logged.

The server acknowledges a write once PostgreSQL says it committed. With `fsync` or
`synchronous_commit` off, or `full_page_writes` off, a crash of the database host can
lose (or tear) commits the server already acknowledged; with autovacuum off, the dead
row versions that every lease, report and event leaves pile up, and each lease and
report pays to skip them (15-20 % of their database work here, measured with autovacuum
off on a development machine). The server still starts: an operator may know better
(a throwaway test database), but never without being told.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "autovacuum")


def read_settings(conn: Connection) -> dict[str, str]:
    rows = conn.execute(text("SELECT name, setting FROM pg_settings WHERE name = ANY(:names)"),
                        {"names": list(SETTINGS)})
    return {name: setting for name, setting in rows}


def warnings(settings: dict[str, str]) -> list[str]:
    """What the settings put at risk, one sentence each (none: nothing)."""
    out = []
    for name in ("fsync", "full_page_writes"):
        if settings.get(name) == "off":
            out.append(f"PostgreSQL has {name}=off: a crash of the database host can lose or corrupt work the "
                       f"server already acknowledged; set {name}=on")
    # Every other value (local, remote_write, on, remote_apply) flushes this host's WAL first.
    if settings.get("synchronous_commit") == "off":
        out.append("PostgreSQL has synchronous_commit=off: a crash of the database host can lose the last "
                   "commits the server acknowledged; set synchronous_commit=on")
    if settings.get("autovacuum") == "off":
        out.append("PostgreSQL has autovacuum=off: the dead row versions of leases, reports and events pile up "
                   "and every lease and report pays to skip them; set autovacuum=on or VACUUM the database "
                   "regularly")
    return out
