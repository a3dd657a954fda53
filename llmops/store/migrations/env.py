"""Alembic environment: the URL comes from `llmops.store.db.upgrade`, never from a file."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from llmops.store.models import Base

url = context.config.attributes["url"]
engine = create_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=url.get_backend_name() == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
