"""Alembic migrations, applied by `balsamctl server migrate` and at server start."""

from __future__ import annotations

from pathlib import Path

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from balsam_grpc.server.store.db import make_engine

log = structlog.get_logger(__name__)
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def current_revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head()


def upgrade(url: str, revision: str = "head") -> str:
    cfg = _config()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                # Batch migrations rebuild tables (copy, drop, rename): with foreign keys on,
                # the drop would cascade to the rows referring to the table. The pragma has
                # no effect inside a transaction, so it is set before BEGIN, on this
                # connection only (the engine is disposed below).
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
            with conn.begin():
                before = MigrationContext.configure(conn).get_current_revision()
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                after = MigrationContext.configure(conn).get_current_revision()
                if sqlite:
                    _check_foreign_keys(conn)
    finally:
        engine.dispose()
    if before != after:
        log.info("database migrated", from_revision=before, to_revision=after)
    return after or ""


def _check_foreign_keys(conn: Connection) -> None:
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        raise RuntimeError(f"the migration left {len(broken)} rows whose foreign key has no target, "
                           f"for example {tuple(broken[0])} (table, rowid, parent, constraint); rolled back")


def autogenerate(url: str, message: str) -> None:
    """Developer helper: write a new revision from the difference to tables.py."""
    cfg = _config()
    engine = make_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.revision(cfg, message=message, autogenerate=True)
    engine.dispose()
