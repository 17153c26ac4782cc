"""Several relays at once (several service instances): each row is published once, and no relay
overtakes another that holds a user's earlier events, also when that one fails."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.app.container import app_services
from src.config.settings import Settings
from src.db.models import OutboxEvent
from src.db.session import create_engine, create_sessionmaker
from src.events.outbox import EventType, outbox_backlog, record_event
from src.events.relay import OutboxRelay
from src.services.connections import get_kafka_from_app
from src.services.kafka.manager import KafkaManager, KafkaUnavailableError, OutgoingMessage
from tests.conftest import SettingsFactory
from tests.events_support import USER_EVENTS, first_occurrences, outbox_rows, read_topic
from tests.helpers import eventually, register, running_app
from tests.servers import KafkaBroker


async def _record(
    sessionmaker: async_sessionmaker[AsyncSession], settings: Settings, user_id: str, step: int
) -> None:
    async with sessionmaker() as db:
        record_event(db, settings, EventType.UPDATED, uuid.UUID(user_id), {"step": step})
        await db.commit()


async def _pending(sessionmaker: async_sessionmaker[AsyncSession]) -> int:
    async with sessionmaker() as db:
        count, _ = await outbox_backlog(db)
    return count


@pytest_asyncio.fixture
async def second_instance(
    make_settings: SettingsFactory, kafka_process: KafkaBroker
) -> AsyncIterator[KafkaManager]:
    """The producer of another service instance (its own connection to the broker)."""
    manager = KafkaManager(make_settings(KAFKA_BOOTSTRAP_SERVERS=kafka_process.bootstrap))
    await manager.start()
    try:
        yield manager
    finally:
        await manager.stop()


async def test_two_relays_publish_each_row_once_in_order(
    make_settings: SettingsFactory,
    kafka_process: KafkaBroker,
    second_instance: KafkaManager,
    clean_db: None,
    database_url: str,
) -> None:
    per_user, users_count = 25, 4
    settings = make_settings(
        KAFKA_BOOTSTRAP_SERVERS=kafka_process.bootstrap,
        AUDIT_CONSUMER_ENABLED=False,
        OUTBOX_BATCH_SIZE=7,
        OUTBOX_POLL_INTERVAL=0.05,
    )
    async with running_app(settings) as (app, client):
        sessionmaker = app_services(app).sessionmaker
        ids = [(await register(client))["id"] for _ in range(users_count)]
        manager = await eventually(lambda: get_kafka_from_app(app))
        # The app's own relay keeps running too: three relays, two producers, the same rows.
        relays = [
            OutboxRelay(settings, sessionmaker, lambda: manager),
            OutboxRelay(settings, sessionmaker, lambda: second_instance),
        ]

        async def write(user_id: str) -> None:
            for step in range(per_user):
                await _record(sessionmaker, settings, user_id, step)
                await asyncio.sleep(0.005)

        writers = asyncio.gather(*(write(user_id) for user_id in ids))
        rounds = 0
        while not writers.done() or await _pending(sessionmaker):
            await asyncio.gather(*(relay.publish_once() for relay in relays))
            rounds += 1
            assert rounds < 5000
        await writers
        assert all(relay.published_total > 0 for relay in relays), "no contention happened"
        assert all(relay.last_error is None for relay in relays)

    rows = [r for r in await outbox_rows(database_url, ids) if r.topic == USER_EVENTS]
    assert sum(row.type == "user.updated" for row in rows) == per_user * users_count
    records = await read_topic(kafka_process.bootstrap, USER_EVENTS)
    copies: dict[str, int] = {}
    for record in records:
        copies[record.event_id] = copies.get(record.event_id, 0) + 1
    assert {row.id: copies.get(row.id, 0) for row in rows} == {row.id: 1 for row in rows}
    position = {row.id: row.position for row in rows}
    for user_id in ids:
        positions = [position[event_id] for event_id in first_occurrences(records, user_id)]
        assert positions == sorted(positions)
        assert len(positions) == per_user + 1  # user.registered, then every update


class HeldKafka(KafkaManager):
    """A producer whose sends wait until the test lets them go (and then maybe fail)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.sending = asyncio.Event()
        self.release = asyncio.Event()
        self.fail = False

    async def send_batch(self, messages: Sequence[OutgoingMessage], timeout: float) -> None:
        self.sending.set()
        await self.release.wait()
        if self.fail:
            raise KafkaUnavailableError("broker went away (simulated)")
        await super().send_batch(messages, timeout)


@pytest.mark.parametrize("first_relay_fails", [False, True], ids=["succeeds", "fails"])
async def test_a_relay_never_overtakes_one_holding_earlier_events(
    make_settings: SettingsFactory,
    kafka_process: KafkaBroker,
    second_instance: KafkaManager,
    clean_db: None,
    database_url: str,
    first_relay_fails: bool,
) -> None:
    settings = make_settings(KAFKA_BOOTSTRAP_SERVERS=kafka_process.bootstrap, OUTBOX_BATCH_SIZE=2)
    engine = create_engine(settings)
    held = HeldKafka(settings)
    await held.start()
    holding: asyncio.Task[int] | None = None
    try:
        sessionmaker = create_sessionmaker(engine)
        user_id = str(uuid.uuid4())
        for step in range(4):
            await _record(sessionmaker, settings, user_id, step)
        first = OutboxRelay(settings, sessionmaker, lambda: held)
        second = OutboxRelay(settings, sessionmaker, lambda: second_instance)

        holding = asyncio.create_task(first.publish_once())  # claims events 1-2 and waits
        await asyncio.wait_for(held.sending.wait(), 5)
        # Events 3-4 are free to claim, but publishing them now would put them before 1-2.
        assert await second.publish_once() == 0
        held.fail = first_relay_fails
        held.release.set()
        if first_relay_fails:
            with pytest.raises(KafkaUnavailableError):
                await holding
            async with sessionmaker() as db:
                query = select(OutboxEvent).order_by(OutboxEvent.position).limit(2)
                failed = (await db.execute(query)).scalars().all()
            assert [(row.attempts, row.published_at) for row in failed] == [(1, None)] * 2
            assert all("simulated" in (row.last_error or "") for row in failed)
            assert await second.publish_once() == 2  # events 1-2, from the other instance
        else:
            assert await holding == 2
        assert await second.publish_once() == 2
        assert await _pending(sessionmaker) == 0
    finally:
        if holding is not None and not holding.done():
            holding.cancel()  # a failed assertion must not leave rows locked for the next test
            await asyncio.gather(holding, return_exceptions=True)
        await held.stop()
        await engine.dispose()

    rows = await outbox_rows(database_url, [user_id])
    records = await read_topic(kafka_process.bootstrap, USER_EVENTS)
    assert first_occurrences(records, user_id) == [row.id for row in rows]
