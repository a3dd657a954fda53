"""Database connection and migrations. One URL picks the engine: `sqlite:///path` (the
embedded default) or `postgresql://...` (production); the code is the same for both."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

__all__ = ["Database", "async_url", "sync_url", "upgrade"]

_MIGRATION_LOCK = 72_100_001  # pg_advisory_lock id: one migrator at a time


def _url(url: str) -> URL:
    return make_url(url)


def async_url(url: str) -> URL:
    u = _url(url)
    if u.get_backend_name() == "sqlite":
        return u.set(drivername="sqlite+aiosqlite")
    if u.get_backend_name() == "postgresql":
        return u.set(drivername="postgresql+psycopg")
    raise ValueError(f"unsupported database URL {u.render_as_string(hide_password=True)}: "
                     "use sqlite:///path or postgresql://...")


def sync_url(url: str) -> URL:
    u = async_url(url)
    return u.set(drivername="sqlite") if u.get_backend_name() == "sqlite" else u


def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
    # WAL lets gateways read while the ledger writer writes; wait instead of failing on locks.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Database:
    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        u = async_url(url)
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if u.get_backend_name() == "postgresql":
            kwargs.update(pool_size=pool_size, max_overflow=pool_size,
                          connect_args={"connect_timeout": 5})
        else:
            if u.database and u.database != ":memory:":
                Path(u.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 10}
        self.engine: AsyncEngine = create_async_engine(u, **kwargs)
        if u.get_backend_name() == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.session: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False)

    async def close(self) -> None:
        await self.engine.dispose()


def _alembic_config(url: URL) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "llmops.store:migrations")
    cfg.attributes["url"] = url
    return cfg


@contextlib.contextmanager
def _migration_lock(url: URL) -> Iterator[None]:
    """Several gateways may start at once: only one migrates, the others wait for it."""
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "llmops.db").with_suffix(".migrate.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        return
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK})
    finally:
        engine.dispose()


def upgrade(url: str) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    sync = sync_url(url)
    if sync.get_backend_name() == "sqlite" and sync.database:
        Path(sync.database).parent.mkdir(parents=True, exist_ok=True)
    with _migration_lock(sync):
        command.upgrade(_alembic_config(sync), "head")
