"""The SQLAlchemy engine: the one module that knows how we reach the database."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from src.config.settings import Settings

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def ensure_sqlite_directory(database_url: str) -> None:
    """SQLite creates the file but not its folder (``./data/`` on a fresh clone)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def create_engine(settings: Settings) -> AsyncEngine:
    """Build the engine with bounded waits: a lost database means 503, never a hung request."""
    url = make_url(settings.DATABASE_URL)
    if url.get_backend_name() == "sqlite":
        ensure_sqlite_directory(settings.DATABASE_URL)
        engine = create_async_engine(
            url,
            hide_parameters=True,
            connect_args={"timeout": settings.DATABASE_CONNECT_TIMEOUT},
            # aiosqlite connections are threads; reusing them is cheap and keeps WAL effective.
            pool_size=settings.DATABASE_POOL_SIZE,
            max_overflow=settings.DATABASE_MAX_OVERFLOW,
            pool_timeout=settings.DATABASE_POOL_TIMEOUT,
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        url,
        # Parameters can be password hashes and one-time tokens: never put them in logs or errors.
        hide_parameters=True,
        pool_size=settings.DATABASE_POOL_SIZE,
        max_overflow=settings.DATABASE_MAX_OVERFLOW,
        pool_timeout=settings.DATABASE_POOL_TIMEOUT,
        pool_pre_ping=True,
        connect_args={
            "timeout": settings.DATABASE_CONNECT_TIMEOUT,
            "command_timeout": 30,
            "server_settings": {"application_name": "user-management-service"},
        },
    )


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def create_sessionmaker(
    engine: AsyncEngine, info: dict[str, object] | None = None
) -> async_sessionmaker[AsyncSession]:
    """``info`` is copied into every session (the outbox relay's wake-up signal travels there)."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False, info=info)


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url:
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


@functools.cache
def _head_revisions() -> frozenset[str]:
    # The scripts ship with the code, so their heads cannot change while the process runs.
    return frozenset(ScriptDirectory.from_config(alembic_config()).get_heads())


def _current_revisions(connection: Connection) -> set[str]:
    return set(MigrationContext.configure(connection).get_current_heads())


async def migration_status(engine: AsyncEngine) -> tuple[set[str], set[str]]:
    """Return (current, head) revisions; equal sets mean the schema is up to date."""
    async with engine.connect() as connection:
        current = await connection.run_sync(_current_revisions)
    return current, set(_head_revisions())


async def check_database(engine: AsyncEngine, timeout: float) -> float:
    """Run ``SELECT 1`` under a timeout; return the latency in milliseconds."""
    started = time.perf_counter()
    async with asyncio.timeout(timeout):
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    return (time.perf_counter() - started) * 1000


def upgrade_database(database_url: str) -> None:
    """Apply every migration (used by ``make run``, the tests and the container entry point)."""
    from alembic import command

    command.upgrade(alembic_config(database_url), "head")
