"""store/tables.py mirrors the Alembic migrations: after `upgrade head` on an empty
database, autogenerate finds nothing to change (columns, types, nullability, indexes
with their partial predicates, constraints), on SQLite and on PostgreSQL.

Alembic cannot reflect SQLite's expression indexes (`priority DESC`), so there those are
compared by their DDL: what the migrations created against what tables.py would create;
nor does it compare AUTOINCREMENT, so the tables that have it are compared by name."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Index, TextClause, inspect, text
from sqlalchemy.schema import CreateIndex

from balsam_grpc.server.store import migrate
from balsam_grpc.server.store.db import make_engine
from balsam_grpc.server.store.tables import metadata
from tests.conftest import POSTGRES_URL, database_params
from tests.support.databases import drop_postgres, fresh_postgres


def _has_expressions(index: Index) -> bool:
    return any(isinstance(e, TextClause) for e in index.expressions)


def _declared_for(index: Index, dialect: str) -> bool:
    condition = getattr(index, "_ddl_if", None)
    return condition is None or condition.dialect in (None, dialect)


def _kept_on_sqlite(fk: Any) -> bool:
    """The foreign keys revisions 0011 and 0013 drop on PostgreSQL only (jobs.owner_id,
    site_id, app_id, batch_job_id)."""
    return fk.table.name == "jobs" and [c.name for c in fk.columns] in (["owner_id"], ["site_id"], ["app_id"],
                                                                        ["batch_job_id"])


def _differences(url: str) -> tuple[list[Any], dict[str, tuple[str, str]]]:
    """(autogenerate's differences, {index: (DDL on disk, DDL from tables.py)} for the
    expression indexes Alembic skips on SQLite)."""
    assert migrate.upgrade(url) == migrate.head_revision()
    engine = make_engine(url)
    sqlite = engine.dialect.name == "sqlite"

    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        if sqlite and type_ == "foreign_key_constraint" and reflected and _kept_on_sqlite(obj):
            return False
        if type_ == "index" and not reflected and not _declared_for(obj, engine.dialect.name):
            return False  # tables.py says .ddl_if(dialect=...): Alembic does not read it
        return not (sqlite and type_ == "index" and (reflected or _has_expressions(obj))
                    and name in expression_indexes)

    expression_indexes = {ix.name: ix for table in metadata.tables.values() for ix in table.indexes
                          if _has_expressions(ix)}
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "include_object": include})
            diffs = compare_metadata(context, metadata)
            ddl = {}
            if sqlite:
                on_disk = dict(conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'index'")).all())
                ddl = {name: (on_disk.get(name, ""), str(CreateIndex(ix).compile(dialect=engine.dialect)))
                       for name, ix in expression_indexes.items()}
            return diffs, ddl
    finally:
        engine.dispose()


def _sqlite_autoincrement_tables(url: str) -> set[str]:
    """Tables whose ids SQLite never hands out twice (autogenerate does not compare this)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'table'")).all()
    finally:
        engine.dispose()
    return {name for name, sql in rows if "AUTOINCREMENT" in sql.upper()}


@pytest.mark.parametrize("backend", database_params())
def test_tables_match_the_migrations(backend: str, tmp_path: Path) -> None:
    if backend == "postgres":
        url = fresh_postgres(POSTGRES_URL, f"schema_{secrets.token_hex(3)}")
        try:
            diffs, ddl = _differences(url)
        finally:
            drop_postgres(url)
    else:
        diffs, ddl = _differences(f"sqlite:///{tmp_path / 'schema.db'}")
        assert set(ddl) >= {"ix_jobs_lease_order"}
        assert _sqlite_autoincrement_tables(f"sqlite:///{tmp_path / 'schema.db'}") == {
            name for name, table in metadata.tables.items() if table.dialect_options["sqlite"]["autoincrement"]}
    assert diffs == []
    for name, (on_disk, declared) in ddl.items():
        assert on_disk == declared, name


def _downgrade(url: str, revision: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = Config()
            cfg.set_main_option("script_location", str(migrate.MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
    finally:
        engine.dispose()


def _job_foreign_keys(url: str) -> set[str]:
    """The tables jobs' foreign keys refer to, and the triggers that stand for the app's
    key on PostgreSQL."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            keys = {fk["referred_table"] for fk in inspect(conn).get_foreign_keys("jobs")}
            if conn.dialect.name == "postgresql":
                keys |= set(conn.execute(text("SELECT tgname FROM pg_trigger WHERE tgname IN "
                                              "('apps_delete_jobs', 'jobs_app_exists')")).scalars())
            return keys
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", database_params())
def test_jobs_foreign_keys_up_and_down(backend: str, tmp_path: Path) -> None:
    """Revision 0011 drops jobs' keys to users, sites and apps on PostgreSQL (a trigger
    on apps cascades instead) and its downgrade restores them; SQLite keeps all four."""
    if backend == "postgres":
        url = fresh_postgres(POSTGRES_URL, f"fk_{secrets.token_hex(3)}")
    else:
        url = f"sqlite:///{tmp_path / 'fk.db'}"
    everything = {"users", "sites", "apps", "batch_jobs"}
    lean = everything if backend == "sqlite" else {"batch_jobs", "apps_delete_jobs", "jobs_app_exists"}
    try:
        migrate.upgrade(url, "0011")
        assert _job_foreign_keys(url) == lean
        _downgrade(url, "0010")
        assert _job_foreign_keys(url) == everything
        migrate.upgrade(url, "0011")
        assert _job_foreign_keys(url) == lean
    finally:
        if backend == "postgres":
            drop_postgres(url)


def test_sqlite_keeps_no_index_on_tags(tmp_path: Path) -> None:
    """SQLite filters tags with json_extract per pair; an index over the whole JSON text
    (what ix_jobs_tags_gin declared there) served no query and cost every insert.
    Revision 0018 drops it on SQLite; its downgrade puts it back."""
    url = f"sqlite:///{tmp_path / 'tags.db'}"

    def tag_indexes() -> list[str]:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                return [ix["name"] for ix in inspect(conn).get_indexes("jobs") if "tags" in ix["column_names"]]
        finally:
            engine.dispose()

    migrate.upgrade(url)
    assert tag_indexes() == []
    _downgrade(url, "0017")
    assert tag_indexes() == ["ix_jobs_tags_gin"]
