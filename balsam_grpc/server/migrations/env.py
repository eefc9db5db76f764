"""Alembic environment: runs migrations on the connection handed over by store.migrate."""

from __future__ import annotations

from alembic import context

from balsam_grpc.server.store.tables import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through balsam_grpc.server.store.migrate (balsamctl server migrate)")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=connection.dialect.name == "sqlite",
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
