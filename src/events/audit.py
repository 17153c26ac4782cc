"""The audit consumer: reads the user-events topic back and stores every event exactly once.

Delivery from Kafka is at least once, so rows are keyed by the CloudEvents ``id`` and a duplicate
is ignored. Offsets are committed only after the rows are committed to the database: a crash
between the two means the batch is read again, and the unique key absorbs it.

Its consumer overrides two of the specification's consumer settings, which stay the defaults of
every other consumer made through ``KafkaManager.create_consumer``:

- ``auto_offset_reset="earliest"`` whatever ``KAFKA_AUTO_OFFSET_RESET`` says: when its group has
  no committed offset (first start, or offsets expired) it reads from the start, because an audit
  log that starts at "latest" silently misses everything published before.
- ``enable_auto_commit=False`` whatever ``KAFKA_ENABLE_AUTO_COMMIT`` says: auto-commit commits
  what was fetched on a timer, so a crash after a commit and before the rows are stored would
  lose those events for good; offsets are committed by hand, after the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.config.settings import Settings
from src.db.models import AuditEvent
from src.events.envelope import CloudEvent
from src.events.erasure import personal_values, scrub, searched
from src.events.outbox import EventType
from src.services import metrics
from src.services.kafka.manager import KafkaManager
from src.services.kafka.serializers import KafkaSerializationError, KafkaSerializer

logger = logging.getLogger(__name__)


def _subject_id(event_type: str, subject: str | None) -> uuid.UUID | None:
    """The user an event is about: its subject, except for events about something else (an OAuth
    client), which belong to no user's trail."""
    if not event_type.startswith("user."):
        return None
    try:
        return uuid.UUID(subject) if subject else None
    except ValueError:
        return None


_CONSUMER_TASKS = {
    "_fetcher": ("_fetch_task",),
    "_coordinator": (
        "_coordination_task",
        "_heartbeat_task",
        "_commit_refresh_task",
        "_reset_committed_task",
    ),
}


def _running_tasks(consumer: Any) -> list[asyncio.Task[Any]]:
    tasks: list[Any] = []
    for part_name, task_names in _CONSUMER_TASKS.items():
        part = getattr(consumer, part_name, None)
        tasks += [getattr(part, name, None) for name in task_names]
        tasks += list(getattr(part, "_pending_tasks", ()))
    return [task for task in tasks if isinstance(task, asyncio.Task) and not task.done()]


async def _shut(consumer: Any, joined: bool, timeout: float) -> None:
    if joined:
        try:
            await asyncio.wait_for(consumer.stop(), timeout)  # commits nothing; leaves the group
            return
        except (Exception, asyncio.CancelledError):
            # Timed out, or stop() gave up half-way: with the broker lost mid-fetch it re-raises
            # the cancellation of one of its own fetch tasks and never closes its client.
            logger.debug("Kafka consumer did not stop cleanly", exc_info=True)
    # Not in a group (a join in progress waits for the broker's answer, which tansu delays by
    # half the session timeout), or stop() gave up: end its tasks and close its connections.
    tasks = _running_tasks(consumer)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(consumer._client.close(), timeout)
    consumer._closed = True


async def close_consumer(consumer: Any, joined: bool, timeout: float) -> None:
    """Close a consumer for good, in bounded time, whatever state it was left in.

    Without this, an interrupted join or an aiokafka ``stop()`` that gives up half-way leaves the
    consumer's tasks and sockets running after the app has shut down. The private attributes
    used here (``_fetcher``, ``_coordinator``, ``_client``) are why the aiokafka version is pinned.
    Shut-down cancels background tasks again every second; the close is bounded, so it is shielded
    and allowed to finish, and the cancellation is passed on afterwards.
    """
    closing = asyncio.ensure_future(_shut(consumer, joined, timeout))
    cancelled = False
    while not closing.done():
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


def _lag(consumer: Any, following: dict[Any, int]) -> int:
    """Records behind the high watermark, over the partitions assigned to ``consumer`` that it has
    fetched from (``following``: the next offset to store, per partition)."""
    total = 0
    for partition in consumer.assignment():
        high = consumer.highwater(partition)
        start = following.get(partition)
        if high is not None and start is not None:
            total += max(high - start, 0)
    return total


class AuditConsumer:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        kafka: Callable[[], KafkaManager | None],
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.kafka = kafka
        self.serializer = KafkaSerializer()
        self.stored_total = 0
        self.skipped_total = 0

    async def run(self) -> None:
        delay = self.settings.RECONNECT_BACKOFF_INITIAL
        while True:
            manager = self.kafka()
            if manager is None:
                await asyncio.sleep(self.settings.SUPERVISOR_INTERVAL)
                continue
            # Never the configured defaults here: see the module docstring.
            consumer = manager.create_consumer(
                self.settings.KAFKA_USER_EVENTS_TOPIC,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            joined = False
            try:
                # Joining a group takes seconds (rebalance delay); this runs in the background,
                # so the generous request timeout is the right bound, not the start-up one.
                await asyncio.wait_for(
                    consumer.start(), self.settings.KAFKA_REQUEST_TIMEOUT_MS / 1000
                )
                joined = True
                delay = self.settings.RECONNECT_BACKOFF_INITIAL
                await self._consume(consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect and carry on
                logger.warning("audit consumer stopped (%s); restarting", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.RECONNECT_BACKOFF_MAX)
            finally:
                await close_consumer(consumer, joined, self.settings.KAFKA_CONNECT_TIMEOUT * 2)

    async def _consume(self, consumer: Any) -> None:
        # The next offset to store, per partition: with the high watermarks of the fetches, how
        # far the audit trail is behind the topic. Set before storing too, so a database that
        # refuses the rows shows as a growing lag rather than a stale one.
        following: dict[Any, int] = {}
        while True:
            batches = await consumer.getmany(timeout_ms=1000, max_records=500)
            for partition, messages in batches.items():
                following[partition] = messages[0].offset
            metrics.AUDIT_LAG.set(_lag(consumer, following))
            for partition, messages in batches.items():
                await self.store(messages)
                await consumer.commit({partition: messages[-1].offset + 1})
                following[partition] = messages[-1].offset + 1
            if batches:
                metrics.AUDIT_LAG.set(_lag(consumer, following))

    async def store(self, messages: Sequence[Any]) -> int:
        """Store a batch of Kafka records; return how many were new."""
        rows: list[dict[str, Any]] = []
        for message in messages:
            try:
                event = self.serializer.deserialize(message.value, CloudEvent)
            except KafkaSerializationError as exc:
                # A record we cannot read would block the partition forever: log it and move on.
                self.skipped_total += 1
                logger.warning(
                    "audit consumer skipped an unreadable record at %s[%s]@%s: %s",
                    message.topic,
                    message.partition,
                    message.offset,
                    exc,
                )
                continue
            rows.append(
                {
                    "event_id": event.id,
                    "type": event.type,
                    "user_id": _subject_id(event.type, event.subject),
                    "source": event.source,
                    "time": event.time,
                    "data": event.data,
                    "topic": message.topic,
                    "partition": message.partition,
                    "offset": message.offset,
                }
            )
        if not rows:
            return 0
        erased = {row["user_id"] for row in rows if row["type"] == EventType.ERASED}
        erased.discard(None)
        async with self.sessionmaker() as db:
            insert = pg_insert if db.get_bind().dialect.name == "postgresql" else sqlite_insert
            result = await db.execute(
                insert(AuditEvent).values(rows).on_conflict_do_nothing(index_elements=["event_id"])
            )
            for user_id in erased:
                await _scrub_trail(db, user_id)
            await db.commit()
        stored = max(getattr(result, "rowcount", 0) or 0, 0)
        self.stored_total += stored
        metrics.AUDIT_STORED.inc(stored)
        return stored


async def _scrub_trail(db: AsyncSession, user_id: uuid.UUID) -> None:
    """The erasure scrubbed the trail it found, but this consumer may have stored more of the
    user's events since (it lags behind the topic, and those messages were published before the
    erasure). They all precede ``user.erased`` in the user's partition, so scrubbing again when
    it arrives leaves nothing behind."""
    rows = list(await db.scalars(select(AuditEvent).where(AuditEvent.user_id == user_id)))
    personal = searched(text for row in rows for text in personal_values(row.data))
    for row in rows:
        row.data = scrub(row.data, personal)  # a new object, so the JSON column is seen as changed


async def list_user_events(
    db: AsyncSession, user_id: uuid.UUID, *, limit: int, after: int | None
) -> tuple[list[AuditEvent], int | None]:
    """A user's audit trail in arrival order; the cursor is the last position seen."""
    query = (
        select(AuditEvent)
        .where(AuditEvent.user_id == user_id)
        .order_by(AuditEvent.position)
        .limit(limit + 1)
    )
    if after is not None:
        query = query.where(AuditEvent.position > after)
    rows = list((await db.execute(query)).scalars().all())
    page = rows[:limit]
    return page, (page[-1].position if len(rows) > limit else None)


async def search_events(
    db: AsyncSession,
    *,
    limit: int,
    before: int | None = None,
    event_type: str | None = None,
    user_id: uuid.UUID | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[list[AuditEvent], int | None]:
    """Events across users, newest first (arrival order), filtered by type, user and event time
    ([since, until)); the cursor is the last position seen, and the next page starts before it."""
    query = select(AuditEvent).order_by(AuditEvent.position.desc()).limit(limit + 1)
    if before is not None:
        query = query.where(AuditEvent.position < before)
    if event_type is not None:
        query = query.where(AuditEvent.type == event_type)
    if user_id is not None:
        query = query.where(AuditEvent.user_id == user_id)
    if since is not None:
        query = query.where(AuditEvent.time >= since)
    if until is not None:
        query = query.where(AuditEvent.time < until)
    rows = list((await db.execute(query)).scalars().all())
    page = rows[:limit]
    return page, (page[-1].position if len(rows) > limit else None)
