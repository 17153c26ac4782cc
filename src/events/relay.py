"""The outbox relay: publishes committed outbox rows to Kafka, in order per user, at least once.

Rows are claimed with ``FOR UPDATE SKIP LOCKED`` (PostgreSQL), so several relays never publish the
same row at the same time, and a relay only publishes a user's rows when it holds that user's
earliest unpublished ones: a second relay can never overtake it and break per-user order. A batch
is marked published only after the broker acknowledged every message in it; if anything fails the
whole batch stays pending and is sent again later (consumers dedupe by event id).

How long rows stay locked: the row locks *are* the claim, so the transaction stays open until the
broker has acknowledged the batch. That wait is bounded by ``KAFKA_CONNECT_TIMEOUT`` (1.5 s by
default), not by the producer's ``KAFKA_REQUEST_TIMEOUT_MS`` (40 s): a stalled broker holds the
locks and one pooled connection that long at most, then the batch is rolled back and retried. A
healthy broker acknowledges a batch in tens of milliseconds. Claiming with a committed lease
column instead (claim, commit, send, mark) would hold nothing during the send, but needs a schema
change, and its lease must still outlast every send, or a second relay could publish the same rows
at the same time: it would need the same bound. ``lock_hold_last``/``lock_hold_max`` report the
hold times.

Duplicates: a batch whose send timed out may still reach the broker (it was on the wire when the
broker stalled), and it is sent again. That is at most one batch per timed-out send. When nothing
answers, the relay times out once: the producer restart that follows cannot connect, so nothing
more is sent until the broker is back. The restart does not flush: unsent messages are failed
rather than delivered late. The resend starts again from each user's earliest unpublished event,
so the first copies stay in order.

Run inside the service (a background task) or on its own: ``python -m src.events.relay``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.config.settings import Settings
from src.db.models import OutboxEvent
from src.db.types import utcnow
from src.events.envelope import envelope_for
from src.events.outbox import outbox_backlog, purge_expired_secrets
from src.services import metrics
from src.services.kafka.manager import (
    KafkaManager,
    KafkaSendTimeout,
    KafkaUnavailableError,
    OutgoingMessage,
)
from src.services.kafka.serializers import KafkaSerializer
from src.services.tracing import Tracing, publish_spans, start_tracing

logger = logging.getLogger(__name__)

_PRUNE_EVERY_SECONDS = 600
_PRUNE_CHUNK = 2000
_UNAVAILABLE = KafkaUnavailableError("Kafka is unavailable; events wait in the outbox")
# Structured content mode of the CloudEvents Kafka binding: the whole event is the JSON value, and
# this header says so. No ``ce_*`` headers: a reader that sees one (the CloudEvents SDKs'
# ``from_kafka``) switches to binary mode and looks for every attribute in the headers.
CLOUDEVENTS_JSON = "application/cloudevents+json"
_STRUCTURED_MODE = (("content-type", CLOUDEVENTS_JSON.encode()),)


class OutboxRelay:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        kafka: Callable[[], KafkaManager | None],
        signal: asyncio.Event | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.kafka = kafka
        self.signal = signal or asyncio.Event()
        # Spans for each batch, in the trace of each event's request (None: tracing is off).
        self.tracing = tracing
        self.serializer = KafkaSerializer()
        self.published_total = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_published_at: float | None = None
        # Seconds from claiming a batch (row locks, a pooled connection) to commit or rollback.
        self.lock_hold_last: float | None = None
        self.lock_hold_max = 0.0
        self._last_prune = 0.0

    # --- the loop -----------------------------------------------------------------------------
    async def run(self) -> None:
        delay = self.settings.RECONNECT_BACKOFF_INITIAL
        while True:
            try:
                published = await self.publish_once()
                await self._prune_if_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the relay must outlive any one failure
                self._failed(exc)
                # Backing off, but a new commit or the broker coming back (the supervisor sets
                # the signal then) ends the wait at once.
                await self._wait_for_work(delay)
                delay = min(delay * 2, self.settings.RECONNECT_BACKOFF_MAX)
                continue
            delay = self.settings.RECONNECT_BACKOFF_INITIAL
            if published >= self.settings.OUTBOX_BATCH_SIZE:
                continue  # more may be waiting: drain before sleeping
            await self._wait_for_work(self.settings.OUTBOX_POLL_INTERVAL)

    async def _wait_for_work(self, at_most: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.signal.wait(), at_most)
        self.signal.clear()

    def _failed(self, exc: BaseException, log: bool = True) -> None:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if log and message != self.last_error:
            logger.warning("outbox relay: publishing failed (%s); will retry", message)
        self.last_error, self.last_error_at = message, time.time()

    def _recovered(self) -> None:
        """Kafka is reachable and nothing failed: an earlier error no longer describes the relay."""
        if self.last_error is not None:
            logger.info("outbox relay: publishing again")
            self.last_error = None

    # --- one batch ----------------------------------------------------------------------------
    @property
    def send_timeout(self) -> float:
        """How long a batch may wait for the broker's acknowledgements while its rows are locked."""
        return self.settings.KAFKA_CONNECT_TIMEOUT

    def _released(self, claimed_at: float) -> None:
        held = time.monotonic() - claimed_at
        self.lock_hold_last = held
        self.lock_hold_max = max(self.lock_hold_max, held)

    async def publish_once(self) -> int:
        """Publish one batch; return how many rows were published (0 when idle or Kafka is down)."""
        manager = self.kafka()
        if manager is None:
            # Not an exception (nothing to back off from: the supervisor reconnects, and has
            # already logged the outage once), but the reason the backlog grows, so
            # /health/kafka shows it as the relay's last error.
            self._failed(_UNAVAILABLE, log=False)
            return 0
        async with self.sessionmaker() as db:
            claimed_at = time.monotonic()
            rows = await self._claim(db)
            if not rows:
                await db.rollback()
                self._recovered()
                return 0
            messages = [self._message(row) for row in rows]
            positions = [row.position for row in rows]
            try:
                with publish_spans(self.tracing, rows):
                    await manager.send_batch(messages, self.send_timeout)
            except Exception as exc:
                # Locks first: the restart below takes seconds with a lost broker.
                await db.rollback()
                self._released(claimed_at)
                metrics.RELAY_FAILED.inc(len(rows))
                await self._record_attempt(positions, exc)
                if isinstance(exc, KafkaSendTimeout):
                    # A producer stuck on a lost broker never recovers by itself; start afresh.
                    # Its unsent messages are failed, so they cannot follow a later resend; one
                    # already on the wire may still arrive: a duplicate, never a reordering.
                    await self._restart_producer(manager)
                raise
            await db.execute(
                update(OutboxEvent)
                .where(OutboxEvent.position.in_(positions))
                .values(
                    published_at=utcnow(),
                    attempts=OutboxEvent.attempts + 1,
                    last_error=None,
                    # The sealed link now lives in the notifications topic; not here as well.
                    sealed=None,
                    sealed_until=None,
                ),
                execution_options={"synchronize_session": False},
            )
            await db.commit()
            self._released(claimed_at)
            self._published(rows)
        self.published_total += len(rows)
        self.last_published_at = time.time()
        self._recovered()
        return len(rows)

    @staticmethod
    def _published(rows: Sequence[OutboxEvent]) -> None:
        now = utcnow()
        metrics.RELAY_PUBLISHED.inc(len(rows))
        retried = sum(1 for row in rows if row.attempts)
        if retried:
            metrics.RELAY_RETRIED.inc(retried)
        for row in rows:
            metrics.RELAY_LATENCY.observe(max((now - row.created_at).total_seconds(), 0.0))

    async def _claim(self, db: AsyncSession) -> list[OutboxEvent]:
        query = (
            select(OutboxEvent)
            .where(OutboxEvent.published_at.is_(None))
            .order_by(OutboxEvent.position)
            .limit(self.settings.OUTBOX_BATCH_SIZE)
        )
        if db.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        rows = list((await db.execute(query)).scalars().all())
        if not rows:
            return rows
        return await self._in_order_prefixes(db, rows)

    async def _in_order_prefixes(
        self, db: AsyncSession, rows: Sequence[OutboxEvent]
    ) -> list[OutboxEvent]:
        """Keep, per user, only the rows that continue that user's unpublished sequence from its
        start: a row whose predecessor another relay holds must wait for it."""
        mine: dict[uuid.UUID, list[OutboxEvent]] = defaultdict(list)
        for row in rows:
            mine[row.aggregate_id].append(row)
        pending = await db.execute(
            select(OutboxEvent.aggregate_id, OutboxEvent.position)
            .where(
                OutboxEvent.published_at.is_(None),
                OutboxEvent.aggregate_id.in_(list(mine)),
                OutboxEvent.position <= rows[-1].position,
            )
            .order_by(OutboxEvent.position)
        )
        sequence: dict[uuid.UUID, list[int]] = defaultdict(list)
        for aggregate_id, position in pending:
            sequence[aggregate_id].append(position)
        keep: list[OutboxEvent] = []
        for aggregate_id, held in mine.items():
            for row, expected in zip(held, sequence[aggregate_id], strict=False):
                if row.position != expected:
                    break
                keep.append(row)
        keep.sort(key=lambda row: row.position)
        return keep

    def _message(self, row: OutboxEvent) -> OutgoingMessage:
        envelope = envelope_for(row, self.settings.EVENT_SOURCE)
        if row.sealed is not None:
            envelope.data = {**envelope.data, "sealed": row.sealed}
        return OutgoingMessage(
            topic=row.topic,
            key=str(row.aggregate_id),
            value=self.serializer.serialize(envelope),
            headers=_STRUCTURED_MODE,
        )

    async def _record_attempt(self, positions: list[int], exc: BaseException) -> None:
        try:
            async with self.sessionmaker() as db:
                await db.execute(
                    update(OutboxEvent)
                    .where(OutboxEvent.position.in_(positions))
                    .values(attempts=OutboxEvent.attempts + 1, last_error=str(exc)[:1000]),
                    execution_options={"synchronize_session": False},
                )
                await db.commit()
        except Exception:
            logger.debug("could not record the failed attempt", exc_info=True)

    async def _restart_producer(self, manager: KafkaManager) -> None:
        # Without flushing: the batch has been given up on, and is failed rather than sent late.
        # Not cut short here: each step of the restart is bounded, and an interrupted one could
        # leave the old producer's connection (with the batch on it) open.
        try:
            await manager.restart(flush=False)
        except Exception:
            logger.debug("producer restart failed", exc_info=True)

    async def _prune_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < _PRUNE_EVERY_SECONDS:
            return
        self._last_prune = now
        await self.prune()

    async def prune(self) -> int:
        """Delete rows published more than ``OUTBOX_RETENTION_HOURS`` ago; return how many."""
        return await prune_outbox(self.sessionmaker, self.settings)


async def prune_outbox(sessionmaker: async_sessionmaker[AsyncSession], settings: Settings) -> int:
    """Delete rows published more than ``OUTBOX_RETENTION_HOURS`` ago, and forget sealed links
    that have expired; return how many rows were deleted.

    Unpublished rows are never deleted, however old: they are events still owed to Kafka. Rows go
    in chunks of ``_PRUNE_CHUNK``, each its own short transaction: a week of backlog in one
    DELETE would outlast ``DATABASE_STATEMENT_TIMEOUT`` and hold its locks all the while.
    """
    now = utcnow()
    cutoff = now - timedelta(hours=settings.OUTBOX_RETENTION_HOURS)
    deleted = 0
    while True:
        async with sessionmaker() as db:
            chunk = (
                select(OutboxEvent.position)
                .where(OutboxEvent.published_at < cutoff)
                .limit(_PRUNE_CHUNK)
                .scalar_subquery()
            )
            result = await db.execute(
                delete(OutboxEvent).where(OutboxEvent.position.in_(chunk)),
                execution_options={"synchronize_session": False},
            )
            await db.commit()
        count: int = getattr(result, "rowcount", 0) or 0
        deleted += count
        if count < _PRUNE_CHUNK:
            break
    async with sessionmaker() as db:
        purged = await purge_expired_secrets(db, now)
        await db.commit()
    if deleted or purged:
        logger.info("outbox: pruned %d published events, %d expired links", deleted, purged)
    return deleted


def outbox_backlog_reader(sessionmaker: async_sessionmaker[AsyncSession]) -> metrics.BacklogReader:
    """Reads the outbox backlog, for a metrics scrape (the service's, or the relay's own)."""

    async def read() -> metrics.OutboxBacklog:
        async with sessionmaker() as db:
            pending, oldest = await outbox_backlog(db)
        age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        return metrics.OutboxBacklog(pending=pending, oldest_age_seconds=max(age, 0.0))

    return read


async def keep_outbox_tidy(
    sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    """Prune on a timer when no relay runs in this process (``KAFKA_ENABLED=false``)."""
    while True:
        try:
            await prune_outbox(sessionmaker, settings)
        except Exception as exc:  # noqa: BLE001 - tidying is retried at the next interval
            logger.warning("outbox pruning failed (%s)", type(exc).__name__)
        await asyncio.sleep(_PRUNE_EVERY_SECONDS)


async def _serve_metrics(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]
) -> asyncio.Server | None:
    """The relay run apart has no HTTP port: its metrics need METRICS_PORT."""
    if settings.METRICS == "off" or settings.METRICS_PORT == 0:
        return None
    return await metrics.start_metrics_server(settings, outbox_backlog_reader(sessionmaker))


async def _main() -> None:
    """Run the relay as its own process (e.g. a separate deployment scaling apart from the API)."""
    from src.config.logging import configure_logging
    from src.config.settings import load_settings
    from src.db.session import create_engine, create_sessionmaker

    settings = load_settings()
    configure_logging(
        settings.LOG_LEVEL,
        settings.LOG_REPEAT_INTERVAL_SECONDS,
        settings.LOG_FORMAT,
        production=settings.is_production,
    )
    tracing = start_tracing(settings)  # without its extra: exits with one line saying so
    engine = create_engine(settings)
    if tracing is not None:
        tracing.instrument_engine(engine)
    manager = KafkaManager(settings)
    relay = OutboxRelay(
        settings,
        create_sessionmaker(engine),
        lambda: manager if manager.started else None,
        tracing=tracing,
    )

    async def connect(was_up: bool) -> bool:
        """Start the producer if it is not running; log only changes, so an outage is one line."""
        if manager.started:
            return True
        try:
            await manager.start()
        except Exception as exc:  # noqa: BLE001 - retried with backoff
            if was_up:
                reason = str(exc) or type(exc).__name__
                logger.warning("Kafka unavailable (%s); retrying in the background", reason)
            return False
        logger.info("Kafka connected at %s", settings.KAFKA_BOOTSTRAP_SERVERS)
        return True

    async def keep_producer_up(up: bool) -> None:
        delay = settings.RECONNECT_BACKOFF_INITIAL
        while True:
            await asyncio.sleep(delay)
            up = await connect(up)
            if up:
                delay = settings.RECONNECT_BACKOFF_INITIAL
            else:
                delay = min(delay * 2, settings.RECONNECT_BACKOFF_MAX)

    # One attempt before the relay starts, so a broker that is there is used from the start.
    keeper = asyncio.create_task(keep_producer_up(await connect(was_up=True)))
    runner = asyncio.create_task(relay.run())
    # Its own metrics (the relay's counters, the backlog) on METRICS_PORT, when set.
    exporter = await _serve_metrics(settings, create_sessionmaker(engine))
    # SIGTERM (how process managers stop a service) ends the relay cleanly, like Ctrl-C does.
    # Stopping mid-batch loses nothing: rows are marked published only after the broker's acks.
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, runner.cancel)
    try:
        await runner
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we were cancelled ourselves (Ctrl-C), not just the relay by SIGTERM
        logger.info("outbox relay stopped")
    finally:
        if exporter is not None:
            exporter.close()
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        await manager.stop()
        await engine.dispose()
        if tracing is not None:
            await tracing.shutdown()


if __name__ == "__main__":
    # ``python -m`` runs this file as ``__main__``: use the module under its real name, so its
    # logger is ``src.events.relay`` (configured with the rest of ``src``) and not ``__main__``.
    from src.events import relay as _relay

    asyncio.run(_relay._main())
