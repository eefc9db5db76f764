"""Alembic migrations, applied by `balsamctl server migrate` and at server start."""

from __future__ import annotations

from pathlib import Path

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

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
        with engine.begin() as conn:
            before = MigrationContext.configure(conn).get_current_revision()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            after = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    if before != after:
        log.info("database migrated", from_revision=before, to_revision=after)
    return after or ""


def autogenerate(url: str, message: str) -> None:
    """Developer helper: write a new revision from the difference to tables.py."""
    cfg = _config()
    engine = make_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.revision(cfg, message=message, autogenerate=True)
    engine.dispose()
