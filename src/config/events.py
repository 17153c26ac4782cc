"""Start-up and shut-down, wired through FastAPI's ``lifespan``.

Order (README.md, "Start-up, shut-down and degradation"): database first (the only dependency
whose absence stops start-up), then Redis, then Kafka, then background tasks. Shut-down runs in
reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from src.auth.account import ensure_first_admin
from src.auth.context import build_security
from src.config.settings import Settings
from src.db.session import check_database, create_engine, create_sessionmaker, migration_status
from src.events.audit import AuditConsumer
from src.events.outbox import OUTBOX_SIGNAL
from src.events.relay import OutboxRelay, keep_outbox_tidy
from src.mail.courier import Courier
from src.services.connections import (
    close_kafka_connection,
    close_redis_connection,
    get_kafka_from_app,
    initialize_kafka_connection,
    initialize_redis_connection,
)
from src.services.kafka.manager import KafkaManager
from src.services.supervisor import start_supervisor
from src.users.cache import flush_cache

logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The service cannot start: the database is unreachable or not migrated."""


async def _connect_database(app: FastAPI, settings: Settings) -> None:
    engine = create_engine(settings)
    app.state.engine = engine
    # Every session carries the relay's wake-up signal, so a commit with events wakes it at once.
    app.state.sessionmaker = create_sessionmaker(
        engine, info={OUTBOX_SIGNAL: app.state.outbox_signal}
    )
    timeout = settings.DATABASE_CONNECT_TIMEOUT + 1
    try:
        # One bound for both round trips: start-up fails in bounded time, it never hangs.
        async with asyncio.timeout(timeout):
            await check_database(engine, timeout)
            current, head = await migration_status(engine)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot start"
        await engine.dispose()
        if isinstance(exc, TimeoutError):
            reason = f"timed out (DATABASE_CONNECT_TIMEOUT={settings.DATABASE_CONNECT_TIMEOUT:g}s)"
        else:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        where = engine.url.render_as_string(hide_password=True)
        raise StartupError(f"database unreachable at {where}: {reason}") from None
    if current != head:
        await engine.dispose()
        raise StartupError(
            f"database not migrated (at {sorted(current) or 'nothing'}, head is {sorted(head)}); "
            "run `alembic upgrade head`"
        )
    logger.info("Database connected (%s)", engine.url.get_backend_name())


async def on_startup(app: FastAPI) -> None:
    settings: Settings = app.state.settings
    app.state.background_tasks = []
    app.state.outbox_signal = asyncio.Event()
    # Redis entries may be stale after an outage (invalidations were lost): empty the cache first.
    app.state.redis_recovery_hooks = [flush_cache]
    # Keys and hashing pool first: a missing production secret should stop us before any I/O.
    app.state.security = build_security(app)
    await _connect_database(app, settings)
    # Redis and Kafka connect concurrently: each is bounded, neither can stop start-up.
    await asyncio.gather(initialize_redis_connection(app), initialize_kafka_connection(app))
    async with app.state.sessionmaker() as db:
        await ensure_first_admin(db, app.state.security)
    app.state.background_tasks.extend(start_supervisor(app))
    _start_event_pipeline(app, settings)
    logger.info("Start-up complete")


def _start_event_pipeline(app: FastAPI, settings: Settings) -> None:
    """The outbox relay, the audit consumer and the mail courier; they wait quietly while Kafka
    is unavailable (the courier reads the outbox itself when Kafka is off)."""

    def kafka() -> KafkaManager | None:
        return get_kafka_from_app(app)

    tasks = app.state.background_tasks
    if settings.mail_enabled and settings.MAIL_COURIER_IN_PROCESS:
        courier = Courier(
            settings,
            app.state.sessionmaker,
            app.state.security.sealer,
            kafka=kafka,
            signal=app.state.outbox_signal,
        )
        app.state.courier = courier
        tasks.append(asyncio.create_task(courier.run(), name="mail-courier"))
    if not settings.KAFKA_ENABLED:
        # No relay to prune published rows and expired sealed links: tidy on a timer instead.
        app.state.background_tasks.append(
            asyncio.create_task(
                keep_outbox_tidy(app.state.sessionmaker, settings), name="outbox-housekeeping"
            )
        )
        return

    relay = OutboxRelay(settings, app.state.sessionmaker, kafka, app.state.outbox_signal)
    app.state.relay = relay
    tasks.append(asyncio.create_task(relay.run(), name="outbox-relay"))
    if settings.AUDIT_CONSUMER_ENABLED:
        consumer = AuditConsumer(settings, app.state.sessionmaker, kafka)
        app.state.audit_consumer = consumer
        tasks.append(asyncio.create_task(consumer.run(), name="audit-consumer"))


async def on_shutdown(app: FastAPI) -> None:
    tasks: list[asyncio.Task[None]] = getattr(app.state, "background_tasks", [])
    pending = set(tasks)
    while pending:
        # Cancel until they stop: on Python 3.11 a cancellation can be lost inside a library's
        # asyncio.wait_for (redis-py's socket writes do that), and one try would then hang here.
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    tasks.clear()
    await close_kafka_connection(app)
    await close_redis_connection(app)
    engine = getattr(app.state, "engine", None)
    if engine is not None:
        await engine.dispose()
    security = getattr(app.state, "security", None)
    if security is not None:
        security.close()
    logger.info("Shut-down complete")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        await on_startup(app)
    except BaseException:
        # Whatever started before the failure is closed again; nothing is left dangling.
        await on_shutdown(app)
        raise
    try:
        yield
    finally:
        await on_shutdown(app)
