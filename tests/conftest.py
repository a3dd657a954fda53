"""Services every kind of test may use: a PostgreSQL database of the session's own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy

pytest_plugins = ["tests.browser"]  # the console's headless Chromium

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    name = f"llmops_test_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


# The databases every store-backed test runs against (SQLite and PostgreSQL) and Redis.
from tests.databases import database_url, db, prefix, redis  # noqa: E402, F401
