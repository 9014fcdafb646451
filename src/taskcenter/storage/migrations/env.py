"""Alembic environment: runs on the connection taskcenter hands over (sync side of the async engine)."""

from __future__ import annotations

from alembic import context

from taskcenter.storage.schema import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `taskcenter migrate`, which provides the connection")

context.configure(
    connection=connection, target_metadata=metadata, render_as_batch=connection.dialect.name == "sqlite"
)
with context.begin_transaction():
    context.run_migrations()
