"""Alembic environment of the station store: runs on the connection that `store.open_store` hands over."""

from __future__ import annotations

from alembic import context

from vlm_inspect.station.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
