"""The SQLAlchemy engine: the one module that knows how we reach the database.

A database that refuses or goes silent must cost a request a 503 within seconds, never a hang
(README.md, "Start-up, shut-down and degradation"), so every wait on PostgreSQL has a bound:

- opening a connection: ``DATABASE_CONNECT_TIMEOUT``;
- the check a pooled connection passes before each use: ``DATABASE_PING_TIMEOUT``. A connection
  that fails it is discarded and replaced once, so a restarted server or a flow some middlebox
  forgot costs nothing visible (SQLAlchemy's own pre-ping waits out the command timeout instead);
- any one reply (statement, BEGIN, COMMIT, ROLLBACK): ``DATABASE_COMMAND_TIMEOUT``, asyncpg's
  ``command_timeout``, with PostgreSQL's ``statement_timeout`` (``DATABASE_STATEMENT_TIMEOUT``)
  below it: a slow statement is cancelled by the server and keeps its connection, a silent server
  is given up on by the client;
- closing a request's session: ``DATABASE_CLOSE_TIMEOUT`` (``close_session``).

Closing a connection never waits either (``_close_without_waiting``): asyncpg's polite close waits
for the server's side of the goodbye, which a silent server never sends, up to 2 s when
SQLAlchemy discards a failed connection and the command timeout per connection at shut-down.

Failures leave this module as one of ``DATABASE_UNAVAILABLE``, so the API answers 503 for exactly
those, and not for a duplicate key, a bad value, or an ``OSError`` from anywhere else. That takes
translating: asyncpg lets the socket's own errors through raw when connecting
(``ConnectionRefusedError``, ``ConnectionResetError``, ``socket.gaierror``, a bare
``ConnectionError`` when TLS is refused, ``TimeoutError``), and a connection lost mid-statement
arrives as ``ConnectionDoesNotExistError`` (SQLSTATE 08003) inside SQLAlchemy's generic
``DBAPIError``, like any data error.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import Dialect, ExceptionContext, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError, DisconnectionError, EmulatedDBAPIException, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.util import await_

from src.config.settings import Settings

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# What a caller gets when the database cannot serve; the API answers each with a 503:
# - TimeoutError: a bounded wait ran out (connect, a reply, the check before use);
# - sqlalchemy's TimeoutError: no pooled connection within DATABASE_POOL_TIMEOUT;
# - OperationalError (PEP 249's class for exactly this): the connection was refused, reset or
#   lost, or the server cannot serve now (shutting down, too many connections, statement_timeout).
#   SQLite's "database is locked" is one too.
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    TimeoutError,
    PoolTimeoutError,
    OperationalError,
)

# Set on a pool entry by a new connection, taken by its first checkout: it has just answered.
_FRESH = "ums_fresh"


class _Failure(enum.Enum):
    LOST = "lost"  # the connection is unusable: discard it
    UNAVAILABLE = "unavailable"  # the server cannot serve now; the connection itself is fine


def _classify(exc: BaseException) -> _Failure | None:
    """What a driver error says about the link; None for anything about the statement itself."""
    for error in _chain(exc):
        if isinstance(error, OSError):
            # Raw socket errors (and TimeoutError, an OSError): only the driver raises them here.
            return _Failure.LOST
        sqlstate = getattr(error, "sqlstate", None)
        if not isinstance(sqlstate, str):
            continue
        # 08: connection exception (08003 "connection does not exist" is the lost link);
        # 57P0x: the server ends the session (shutdown, crash, database dropped, idle timeout).
        if sqlstate.startswith(("08", "57P")):
            return _Failure.LOST
        # 53: insufficient resources (too many connections, out of memory, disk full);
        # 57014: statement cancelled, i.e. statement_timeout.
        if sqlstate.startswith("53") or sqlstate == "57014":
            return _Failure.UNAVAILABLE
        return None  # a data error (22), a constraint (23), ...: about the statement
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then what it wraps: SQLAlchemy's error, the DBAPI error, asyncpg's."""
    current: BaseException | None = exc
    for _ in range(4):
        if current is None:
            return
        yield current
        if isinstance(current, DBAPIError | EmulatedDBAPIException):
            current = current.orig
        else:
            return


def describe(exc: BaseException) -> str:
    """A one-line name for a database failure, e.g. ``OperationalError
    (ConnectionDoesNotExistError, ConnectionResetError)``: what went, without SQL or a stack."""
    chain = list(_chain(exc))
    # The DBAPI layer between SQLAlchemy and asyncpg only repeats what its neighbours say.
    names = [
        type(error).__name__ for error in chain if not isinstance(error, EmulatedDBAPIException)
    ]
    cause = chain[-1].__cause__
    if isinstance(cause, Exception):  # e.g. the socket error under a lost connection
        names.append(type(cause).__name__)
    return names[0] + (f" ({', '.join(names[1:])})" if len(names) > 1 else "")


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
    server_settings = {"application_name": "user-management-service"}
    if settings.DATABASE_STATEMENT_TIMEOUT > 0 and not settings.DATABASE_PGBOUNCER:
        # Milliseconds, PostgreSQL's unit for it; at least 1 (0 would mean "off").
        milliseconds = max(1, round(settings.DATABASE_STATEMENT_TIMEOUT * 1000))
        server_settings["statement_timeout"] = str(milliseconds)
    connect_args: dict[str, Any] = {
        "timeout": settings.DATABASE_CONNECT_TIMEOUT,
        "command_timeout": settings.DATABASE_COMMAND_TIMEOUT,
        "server_settings": server_settings,
    }
    if settings.DATABASE_PGBOUNCER:
        # A transaction-mode pooler moves us between server connections at every transaction:
        # nothing prepared may be reused (both caches off), and every name must be unique, or
        # two clients sharing a server connection collide on asyncpg's counter-based names.
        url = url.update_query_dict({"prepared_statement_cache_size": "0"})
        connect_args["statement_cache_size"] = 0
        connect_args["prepared_statement_name_func"] = _unique_statement_name
    engine = create_async_engine(
        url,
        # Parameters can be password hashes and one-time tokens: never put them in logs or errors.
        hide_parameters=True,
        pool_size=settings.DATABASE_POOL_SIZE,
        max_overflow=settings.DATABASE_MAX_OVERFLOW,
        pool_timeout=settings.DATABASE_POOL_TIMEOUT,
        # Off: ping_before_use (in _install_bounds) checks with a bound of its own.
        pool_pre_ping=False,
        connect_args=connect_args,
    )
    _install_bounds(engine, settings.DATABASE_PING_TIMEOUT)
    return engine


def _unique_statement_name() -> str:
    return f"__ums_{uuid.uuid4().hex}__"


def _install_bounds(engine: AsyncEngine, ping_timeout: float) -> None:
    """The listeners that keep a failing PostgreSQL from holding anyone up (module docstring)."""
    sync_engine = engine.sync_engine

    def connect(
        dialect: Dialect, _record: ConnectionPoolEntry, cargs: Any, cparams: Any
    ) -> DBAPIConnection:
        try:
            connection: DBAPIConnection = dialect.connect(*cargs, **cparams)
        except TimeoutError:
            raise  # already says what happened (and start-up names DATABASE_CONNECT_TIMEOUT)
        except Exception as exc:
            # Raw socket errors would otherwise reach callers unwrapped, indistinguishable from
            # any other OSError; a refused login or a missing database is "unavailable" too.
            dbapi = dialect.loaded_dbapi
            raise dbapi.OperationalError(
                f"cannot connect: {type(exc).__name__}: {exc}", exc
            ) from exc
        return connection

    def fresh(_dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        record.info[_FRESH] = True

    def ping_before_use(
        dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry, _: PoolProxiedConnection
    ) -> None:
        if record.info.pop(_FRESH, False):
            return  # it has just answered the whole connection handshake
        driver: Any = record.driver_connection
        try:
            # The simple query protocol: no prepared statement, fine behind PgBouncer too.
            await_(driver.execute("SELECT 1", timeout=ping_timeout))
        except Exception as exc:
            # DisconnectionError makes the pool discard this connection (without waiting:
            # _close_without_waiting) and try once with a new one, within the connect timeout.
            raise DisconnectionError(f"pre-ping failed: {describe(exc)}") from exc

    event.listen(sync_engine, "do_connect", connect)
    event.listen(sync_engine, "connect", fresh)
    event.listen(sync_engine, "checkout", ping_before_use)
    event.listen(sync_engine, "close", _close_without_waiting)
    event.listen(sync_engine, "handle_error", _on_error)


def _close_without_waiting(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    """Whenever the pool closes a connection (discarded after a failure, dropped as surplus, at
    shut-down), send PostgreSQL its goodbye and close the socket without waiting for the answer.

    asyncpg's polite close waits for the server's side: up to the command timeout for it (after
    first waiting for any cancelled query to be acknowledged), or 2 s when SQLAlchemy discards a
    failed connection. A silent server sends nothing, so every close would wait out its timeout,
    one connection after the other at shut-down. asyncpg's ``terminate()`` writes the same
    Terminate message and closes at once; SQLAlchemy's own close then finds nothing left to do.
    """
    driver = getattr(dbapi_connection, "driver_connection", None)
    if driver is None or driver.is_closed():
        return
    with contextlib.suppress(Exception):  # SQLAlchemy's own close still follows
        driver.terminate()


def _on_error(context: ExceptionContext) -> BaseException | None:
    """Tell SQLAlchemy which failures lost the connection, and raise those as OperationalError."""
    original = context.original_exception
    if not isinstance(original, Exception):
        return None  # cancelled or interrupted: SQLAlchemy discards the connection itself
    failure = _classify(original)
    if failure is _Failure.LOST or context.is_disconnect:
        # Discard this connection: the next user gets another. The rest of the pool stays, as
        # each is checked before its next use anyway: one silent flow (a middlebox forgot it)
        # says nothing about the others, and replacing healthy ones is needless churn.
        context.is_disconnect = True
        context.invalidate_pool_on_disconnect = False
    elif failure is None:
        return None
    if isinstance(original, TimeoutError) or isinstance(
        context.sqlalchemy_exception, OperationalError
    ):
        return None  # already one of DATABASE_UNAVAILABLE
    wrapped = context.sqlalchemy_exception
    return OperationalError(
        context.statement,
        context.parameters,
        wrapped.orig if wrapped is not None and wrapped.orig is not None else original,
        hide_parameters=True,
        connection_invalidated=context.is_disconnect,
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


async def close_session(session: AsyncSession, timeout: float) -> None:
    """Close ``session`` within ``timeout`` seconds whatever the database does; never raise.

    A request's session is closed after its answer has been sent, or while an error is on its way
    to its handler. Raising here would cut a complete answer short (a committed logout reached
    the client as a dropped connection) or replace the real error, and waiting would hold the
    answer back. Closing only rolls back what the request left open and returns the connection:
    when that fails or takes too long the connection is discarded instead (PostgreSQL rolls back
    whatever it held when it goes), and one line is logged.
    """
    try:
        async with asyncio.timeout(timeout):
            await session.close()
    except Exception as exc:  # noqa: BLE001 - logged; nothing a caller could do about it
        logger.warning(
            "Closing a database session failed, its connection is discarded: %s", describe(exc)
        )
        # Whatever state the failure left the session in, its connection must not be pooled;
        # invalidating closes it without waiting, and is bounded all the same.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await session.invalidate()


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


@functools.cache
def _known_revisions() -> frozenset[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return frozenset(revision.revision for revision in script.walk_revisions())


def is_newer_schema(current: set[str]) -> bool:
    """True when the database is at revisions this code has never heard of: a newer release
    migrated it. During a rolling deploy the previous release keeps serving (and restarting) on
    that schema, which is why migrations must stay compatible with the release before them
    (docs/deploy.md, "Migrations")."""
    return bool(current) and not (current & _known_revisions())


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
