"""Putting the service together at start-up and taking it apart at shut-down.

Order (README.md, "Start-up, shut-down and degradation"): keys and the hashing pool first (a
missing production secret stops us before any I/O), then the database (the only dependency whose
absence stops start-up) and the signing key ring in it, then Redis and Kafka together, then
background work. Shut-down runs in reverse. ``src.config.events`` (the specification's place for
these handlers) calls in here.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from src.app.container import AppServices
from src.app.health import HealthShares, begin_draining
from src.auth.account import ensure_first_admin
from src.auth.context import Security
from src.auth.jwt import AccessTokenCodec, SigningKey, load_signing_key
from src.auth.keys import KeyRingError, ensure_keys, load_keys
from src.auth.passwords import PasswordHasher
from src.auth.rate_limit import LoginGuard, RequestThrottle
from src.config.settings import Settings
from src.db.session import (
    check_database,
    close_session,
    create_engine,
    create_sessionmaker,
    describe,
    is_newer_schema,
    migration_status,
)
from src.events.audit import AuditConsumer
from src.events.outbox import OUTBOX_SIGNAL
from src.events.relay import OutboxRelay, keep_outbox_tidy, outbox_backlog_reader
from src.mail.courier import Courier
from src.oauth.clients import FirstPartyClients, ensure_console_client
from src.security.sealing import load_sealer
from src.services import metrics
from src.services.connections import (
    Connections,
    close_kafka_connection,
    close_redis_connection,
    connections_of,
    get_kafka_from_app,
    get_redis_from_app,
    initialize_kafka_connection,
    initialize_redis_connection,
)
from src.services.kafka.manager import KafkaManager
from src.services.supervisor import start_supervisor
from src.services.tracing import TracingUnavailableError, start_tracing
from src.users.cache import UserCache, flush_cache

logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The service cannot start: the database is unreachable or not migrated, the signing keys
    in it cannot be used, or tracing is on without its extra installed."""


# Reading the key ring takes a few statements (each bounded by DATABASE_COMMAND_TIMEOUT) and, the
# first time, one key generation (RSA: ~25 ms): far less than this, which only rules out a hang.
KEY_RING_TIMEOUT = 10.0


def build_security(app: FastAPI, settings: Settings, connections: Connections) -> Security:
    """The long-lived security objects; Redis is looked up at each use (it comes and goes)."""

    def bypass_redis() -> None:
        # A failed invalidation may leave a stale entry: stop reading Redis until it is emptied.
        # The supervisor empties the cache (a recovery hook) before it marks Redis available.
        connections.redis_available = False

    return Security(
        settings=settings,
        hasher=PasswordHasher(settings),
        tokens=AccessTokenCodec(load_signing_key(settings), settings),
        guard=LoginGuard(settings, lambda: get_redis_from_app(app)),
        throttle=RequestThrottle(settings, lambda: get_redis_from_app(app)),
        cache=UserCache(
            lambda: get_redis_from_app(app),
            ttl_seconds=settings.CACHE_TTL_SECONDS,
            timeout=settings.HEALTH_CHECK_TIMEOUT,
            on_write_failure=bypass_redis,
            max_age_seconds=settings.AUTH_CACHE_MAX_AGE_SECONDS,
        ),
        sealer=load_sealer(settings),
    )


async def _check_database(engine: AsyncEngine, settings: Settings) -> None:
    timeout = settings.DATABASE_CONNECT_TIMEOUT + 1
    try:
        # One bound for both round trips: start-up fails in bounded time, it never hangs.
        async with asyncio.timeout(timeout):
            await check_database(engine, timeout)
            current, head = await migration_status(engine)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot start"
        if isinstance(exc, TimeoutError):
            reason = f"timed out (DATABASE_CONNECT_TIMEOUT={settings.DATABASE_CONNECT_TIMEOUT:g}s)"
        else:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        where = engine.url.render_as_string(hide_password=True)
        raise StartupError(f"database unreachable at {where}: {reason}") from None
    if current != head and is_newer_schema(current):
        logger.warning(
            "Database schema is newer than this code (at %s, this code's head is %s): a newer "
            "release migrated it; serving on it",
            sorted(current),
            sorted(head),
        )
    elif current != head:
        raise StartupError(
            f"database not migrated (at {sorted(current) or 'nothing'}, head is {sorted(head)}); "
            "run `alembic upgrade head`"
        )
    logger.info("Database connected (%s)", engine.url.get_backend_name())


def _key_ring_failure(exc: Exception) -> str:
    """What went wrong, in words safe for a log line: never SQL parameters, never a key."""
    if isinstance(exc, KeyRingError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"timed out ({KEY_RING_TIMEOUT:g}s)"
    return describe(exc)


async def _load_signing_keys(services: AppServices) -> None:
    """Every instance signs with the key ring in the database (``src.auth.keys``); the seed key
    the codec was built with only starts an empty ring."""
    settings, security = services.settings, services.security
    seed = security.tokens.signing_key
    db = services.sessionmaker()
    try:
        async with asyncio.timeout(KEY_RING_TIMEOUT):
            await ensure_keys(db, security.sealer, settings, seed)
            active, published = await load_keys(db, security.sealer, known=[seed])
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot start"
        raise StartupError(f"signing keys unavailable: {_key_ring_failure(exc)}") from None
    finally:
        await close_session(db, settings.DATABASE_CLOSE_TIMEOUT)
    security.tokens.set_keys(active, published)
    logger.info("Signing with key %s (%d keys published)", active.kid, len(published))


async def _reload_signing_keys(services: AppServices) -> tuple[SigningKey, list[SigningKey]]:
    security, tokens = services.security, services.security.tokens
    db = services.sessionmaker()
    try:
        async with asyncio.timeout(KEY_RING_TIMEOUT):
            return await load_keys(db, security.sealer, known=tokens.published_keys)
    finally:
        await close_session(db, services.settings.DATABASE_CLOSE_TIMEOUT)


async def refresh_signing_keys(services: AppServices) -> None:
    """Re-read the key ring every SIGNING_KEY_REFRESH_SECONDS: after a rotation every instance
    signs with the new key within that bound (``keys rotate`` waits for it). A failed read keeps
    the keys this instance has: they go on working, and the next read may succeed."""
    tokens = services.security.tokens
    while True:
        await asyncio.sleep(services.settings.SIGNING_KEY_REFRESH_SECONDS)
        try:
            active, published = await _reload_signing_keys(services)
        except Exception as exc:  # noqa: BLE001 - logged; the keys we have still work
            logger.warning(
                "Signing keys not refreshed, still signing with %s: %s",
                tokens.signing_key.kid,
                _key_ring_failure(exc),
            )
            continue
        if active.kid != tokens.signing_key.kid:
            logger.info("Signing with key %s from now on", active.kid)
        tokens.set_keys(active, published)


async def start(app: FastAPI) -> None:
    """Build ``app.state.services`` and start everything; on failure ``stop`` undoes the rest."""
    settings: Settings = app.state.settings
    # Before anything is opened: TRACING_ENABLED without its extra is a configuration error.
    try:
        tracing = app.state.tracing = start_tracing(settings, app)
    except TracingUnavailableError as exc:
        raise StartupError(str(exc)) from None
    connections = connections_of(app)
    # Redis entries may be stale after an outage (invalidations were lost): empty the cache first.
    connections.redis_recovery_hooks[:] = [flush_cache]
    security = build_security(app, settings, connections)
    engine = create_engine(settings)
    if tracing is not None:
        tracing.instrument_engine(engine)
    signal = asyncio.Event()
    services = app.state.services = AppServices(
        settings=settings,
        connections=connections,
        engine=engine,
        # Every session carries the relay's wake-up signal: a commit with events wakes it at once.
        sessionmaker=create_sessionmaker(engine, info={OUTBOX_SIGNAL: signal}),
        security=security,
        outbox_signal=signal,
        health=HealthShares(),
        first_party=FirstPartyClients(settings.AUTH_CACHE_MAX_AGE_SECONDS),
    )
    await _check_database(engine, settings)
    await _load_signing_keys(services)
    # Redis and Kafka connect concurrently: each is bounded, neither can stop start-up.
    await asyncio.gather(initialize_redis_connection(app), initialize_kafka_connection(app))
    async with services.sessionmaker() as db:
        await ensure_first_admin(db, security)
        await ensure_console_client(db, settings)
    _start_background_work(app, services)
    await _start_metrics_server(app, services)
    logger.info("Start-up complete")


async def _start_metrics_server(app: FastAPI, services: AppServices) -> None:
    """/metrics on a port of its own when METRICS_PORT is set (otherwise the main port serves
    it, or nothing does); closed at shut-down."""
    settings = services.settings
    metrics.check_setup(settings)
    if settings.METRICS == "off" or settings.METRICS_PORT == 0:
        return
    backlog = outbox_backlog_reader(services.sessionmaker)
    server = await metrics.start_metrics_server(settings, backlog)
    if server is not None:
        app.state.metrics_server = server


def _start_background_work(app: FastAPI, services: AppServices) -> None:
    """The signing key refresh, the supervisor, the outbox relay, the audit consumer and the mail
    courier; they wait quietly while Kafka is unavailable (the courier reads the outbox itself
    when Kafka is off)."""
    settings, tasks = services.settings, services.tasks
    tasks.append(asyncio.create_task(refresh_signing_keys(services), name="signing-key-refresh"))

    def kafka() -> KafkaManager | None:
        return get_kafka_from_app(app)

    if settings.KAFKA_ENABLED and settings.OUTBOX_RELAY_IN_PROCESS:
        services.relay = OutboxRelay(
            settings, services.sessionmaker, kafka, services.outbox_signal, app.state.tracing
        )
        tasks.append(asyncio.create_task(services.relay.run(), name="outbox-relay"))
    else:
        # No relay here to prune published rows and expired sealed links: tidy on a timer
        # instead. A relay run apart prunes too, but this process cannot know that one runs, and
        # expired links must go regardless; pruning twice deletes nothing twice.
        tidy = keep_outbox_tidy(services.sessionmaker, settings)
        tasks.append(asyncio.create_task(tidy, name="outbox-housekeeping"))
    if settings.KAFKA_ENABLED and settings.AUDIT_CONSUMER_ENABLED:
        services.audit_consumer = AuditConsumer(settings, services.sessionmaker, kafka)
        tasks.append(asyncio.create_task(services.audit_consumer.run(), name="audit-consumer"))
    if settings.mail_enabled and settings.MAIL_COURIER_IN_PROCESS:
        services.courier = Courier(
            settings,
            services.sessionmaker,
            services.security.sealer,
            kafka=kafka,
            signal=services.outbox_signal,
        )
        tasks.append(asyncio.create_task(services.courier.run(), name="mail-courier"))
    # A broker coming back wakes the relay at once, not at the end of its own backoff.
    tasks.extend(start_supervisor(settings, services.connections, services.outbox_signal.set))


async def stop(app: FastAPI) -> None:
    """Say "not ready" first, then cancel background work, close Kafka, Redis and the database
    pool, stop the hashing pool: whatever ``start`` got to, and nothing twice.

    Readiness turns 503 before anything is closed: a probe that still reaches this instance
    while it shuts down takes it out of rotation instead of finding it "ready" and half taken
    apart. The lifespan's shut-down is the earliest hook the app has; uvicorn runs it after it
    has stopped accepting connections and let the open ones finish."""
    begin_draining(app)
    server: asyncio.Server | None = getattr(app.state, "metrics_server", None)
    if server is not None:
        server.close()
        app.state.metrics_server = None
    services: AppServices | None = getattr(app.state, "services", None)
    if services is not None:
        await _cancel(services.tasks)
    await close_kafka_connection(app)
    await close_redis_connection(app)
    if services is not None:
        await services.engine.dispose()
        services.security.close()
        del app.state.services
    # Last: the spans of shutting down are flushed too.
    tracing = getattr(app.state, "tracing", None)
    if tracing is not None:
        app.state.tracing = None
        await tracing.shutdown()
    metrics.process_exiting()
    logger.info("Shut-down complete")


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
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
