"""The audit consumer: reads the user-events topic back and stores every event exactly once.

Delivery from Kafka is at least once, so rows are keyed by the CloudEvents ``id`` and a duplicate
is ignored. Offsets are committed only after the rows are committed to the database: a crash
between the two means the batch is read again, and the unique key absorbs it.

It reads from the earliest offset when its group has none committed (whatever
``KAFKA_AUTO_OFFSET_RESET`` says for other consumers), because an audit log that starts at
"latest" silently misses everything published before its first start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.config.settings import Settings
from src.db.models import AuditEvent
from src.events.envelope import CloudEvent
from src.services.kafka.manager import KafkaManager
from src.services.kafka.serializers import KafkaSerializationError, KafkaSerializer

logger = logging.getLogger(__name__)


def _subject_id(subject: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(subject) if subject else None
    except ValueError:
        return None


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
            consumer = manager.create_consumer(
                self.settings.KAFKA_USER_EVENTS_TOPIC,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            try:
                # Joining a group takes seconds (rebalance delay); this runs in the background,
                # so the generous request timeout is the right bound, not the start-up one.
                await asyncio.wait_for(
                    consumer.start(), self.settings.KAFKA_REQUEST_TIMEOUT_MS / 1000
                )
                delay = self.settings.RECONNECT_BACKOFF_INITIAL
                await self._consume(consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect and carry on
                logger.warning("audit consumer stopped (%s); restarting", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.RECONNECT_BACKOFF_MAX)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(consumer.stop(), self.settings.KAFKA_CONNECT_TIMEOUT * 2)

    async def _consume(self, consumer: Any) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=1000, max_records=500)
            for partition, messages in batches.items():
                await self.store(messages)
                await consumer.commit({partition: messages[-1].offset + 1})

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
                    "user_id": _subject_id(event.subject),
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
        async with self.sessionmaker() as db:
            insert = pg_insert if db.get_bind().dialect.name == "postgresql" else sqlite_insert
            result = await db.execute(
                insert(AuditEvent).values(rows).on_conflict_do_nothing(index_elements=["event_id"])
            )
            await db.commit()
        stored = max(getattr(result, "rowcount", 0) or 0, 0)
        self.stored_total += stored
        return stored


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
