"""The database side of events: the audit consumer's idempotent store, the audit trail endpoint,
and pruning of published outbox rows. No broker: records are handed to the consumer directly."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.app.container import app_services
from src.db.models import AuditEvent, OutboxEvent
from src.db.session import create_engine, create_sessionmaker
from src.db.types import utcnow
from src.events import relay as relay_module
from src.events.audit import AuditConsumer
from src.events.envelope import CloudEvent
from src.events.erasure import ERASED_EMAIL, ERASED_TEXT
from src.events.outbox import EventType, record_event
from src.events.relay import OutboxRelay
from src.services.kafka.serializers import KafkaSerializer
from tests.conftest import ADMIN_PASSWORD, SettingsFactory
from tests.support.app import bearer, login, running_app, signed_in, unique_email


@dataclass(frozen=True)
class FakeRecord:
    """What the consumer reads from a Kafka record."""

    value: bytes
    offset: int
    topic: str = "user-events"
    partition: int = 0


def _records(user_id: uuid.UUID, count: int, first_offset: int = 0) -> list[FakeRecord]:
    serializer = KafkaSerializer()
    return [
        FakeRecord(
            serializer.serialize(
                CloudEvent(
                    id=uuid.uuid4(),
                    source="/test",
                    type="user.updated",
                    subject=str(user_id),
                    time=utcnow(),
                    data={"step": i},
                )
            ),
            first_offset + i,
        )
        for i in range(count)
    ]


@pytest_asyncio.fixture
async def sessionmaker(
    make_settings: SettingsFactory,
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(make_settings())
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


async def _stored(sm: async_sessionmaker[AsyncSession], user_id: uuid.UUID) -> list[AuditEvent]:
    async with sm() as db:
        query = select(AuditEvent).where(AuditEvent.user_id == user_id)
        return list((await db.execute(query.order_by(AuditEvent.position))).scalars())


# --- 9. the audit consumer stores each event once -------------------------------------------------


async def test_the_audit_consumer_stores_a_redelivered_event_once(
    make_settings: SettingsFactory,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    consumer = AuditConsumer(make_settings(), sessionmaker, lambda: None)
    user_id = uuid.uuid4()
    records = _records(user_id, 3)
    assert await consumer.store(records) == 3
    # Read again (a crash before the offset commit, or the broker delivering twice).
    assert await consumer.store(records) == 0
    assert await consumer.store([records[1], *_records(user_id, 1, first_offset=3)]) == 1

    stored = await _stored(sessionmaker, user_id)
    assert len(stored) == 4
    assert len({row.event_id for row in stored}) == 4
    assert [row.offset for row in stored] == [0, 1, 2, 3]
    assert consumer.stored_total == 4


async def test_the_audit_consumer_skips_unreadable_records(
    make_settings: SettingsFactory,
    sessionmaker: async_sessionmaker[AsyncSession],
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = AuditConsumer(make_settings(), sessionmaker, lambda: None)
    user_id = uuid.uuid4()
    good = _records(user_id, 2, first_offset=10)
    batch = [
        FakeRecord(b"\xff not json", 7),
        good[0],
        FakeRecord(b'{"type": "user.updated"}', 8),  # JSON, but not a CloudEvent
        good[1],
    ]
    with caplog.at_level(logging.WARNING, logger="src.events.audit"):
        assert await consumer.store(batch) == 2  # the readable ones, not blocked by the others
    assert consumer.skipped_total == 2
    skipped = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(skipped) == 2
    assert "user-events[0]@7" in skipped[0] and "user-events[0]@8" in skipped[1]
    assert [row.offset for row in await _stored(sessionmaker, user_id)] == [10, 11]


# --- 10. GET /users/{id}/events -------------------------------------------------------------------


async def test_the_audit_trail_pages_and_is_private(
    make_settings: SettingsFactory, clean_db: None
) -> None:
    admin_email = unique_email("admin")
    settings = make_settings(
        KAFKA_ENABLED=False, FIRST_ADMIN_EMAIL=admin_email, FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD
    )
    async with running_app(settings) as (app, client):
        user, headers = await signed_in(client)
        _, stranger = await signed_in(client)
        admin = bearer(await login(client, admin_email, ADMIN_PASSWORD))
        records = _records(uuid.UUID(user["id"]), 7)
        consumer = AuditConsumer(settings, app_services(app).sessionmaker, lambda: None)
        assert await consumer.store(records) == 7
        expected = [str(KafkaSerializer().deserialize(r.value)["id"]) for r in records]
        url = f"/api/v1/users/{user['id']}/events"

        async def pages(auth: dict[str, str]) -> list[list[dict[str, Any]]]:
            found, cursor = [], None
            while True:
                params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
                reply = await client.get(url, params=params, headers=auth)
                assert reply.status_code == 200, reply.text
                body = reply.json()
                found.append(body["items"])
                cursor = body["next_cursor"]
                if cursor is None:
                    return found
                assert len(found) < 10

        own = await pages(headers)
        assert [len(page) for page in own] == [3, 3, 1]
        assert [item["id"] for page in own for item in page] == expected
        first = own[0][0]
        assert first["type"] == "user.updated" and first["data"] == {"step": 0}
        assert first["source"] == "/test" and first["time"]
        assert await pages(admin) == own

        assert (await client.get(url, headers=stranger)).status_code == 403
        assert (await client.get(url)).status_code == 401
        for bad in ({"cursor": "abc"}, {"cursor": "-1"}, {"limit": 0}, {"limit": 101}):
            reply = await client.get(url, params=bad, headers=headers)
            assert reply.status_code == 422, (bad, reply.text)
            assert reply.headers["content-type"].startswith("application/problem+json")
        # Another user's trail is empty, not someone else's.
        other = f"/api/v1/users/{uuid.uuid4()}/events"
        reply = await client.get(other, headers=admin)
        assert reply.status_code == 200 and reply.json() == {"items": [], "next_cursor": None}


# --- 11. pruning ----------------------------------------------------------------------------------


async def test_published_rows_are_pruned_after_the_retention_period(
    make_settings: SettingsFactory, sessionmaker: async_sessionmaker[AsyncSession], clean_db: None
) -> None:
    settings = make_settings(OUTBOX_RETENTION_HOURS=24)
    user_id = uuid.uuid4()
    now = utcnow()
    async with sessionmaker() as db:
        rows = [record_event(db, settings, EventType.UPDATED, user_id, {"n": n}) for n in range(4)]
        await db.commit()
        ages = [
            # (published how long ago, or None when still unpublished; created earlier still)
            (timedelta(hours=25), True),  # published long ago: pruned
            (timedelta(hours=23), True),  # published within the retention period: kept
            (timedelta(hours=48), False),  # never published, however old: kept (still owed)
            (timedelta(0), True),  # just published: kept
        ]
        for row, (age, published) in zip(rows, ages, strict=True):
            await db.execute(
                update(OutboxEvent)
                .where(OutboxEvent.id == row.id)
                .values(
                    created_at=now - age - timedelta(minutes=1),
                    published_at=now - age if published else None,
                )
            )
        await db.commit()
        ids = [row.id for row in rows]

    relay = OutboxRelay(settings, sessionmaker, lambda: None)
    assert await relay.prune() == 1
    assert await relay.prune() == 0
    async with sessionmaker() as db:
        left = set((await db.execute(select(OutboxEvent.id))).scalars())
    assert left == set(ids[1:])


async def test_a_large_backlog_is_pruned_in_short_chunks(
    make_settings: SettingsFactory,
    sessionmaker: async_sessionmaker[AsyncSession],
    clean_db: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each chunk is its own statement and transaction, so none outlasts the statement timeout."""
    monkeypatch.setattr(relay_module, "_PRUNE_CHUNK", 3)
    settings = make_settings(OUTBOX_RETENTION_HOURS=1)
    long_ago = utcnow() - timedelta(hours=2)
    async with sessionmaker() as db:
        for n in range(8):
            record_event(db, settings, EventType.UPDATED, uuid.uuid4(), {"n": n})
        await db.commit()
        await db.execute(update(OutboxEvent).values(created_at=long_ago, published_at=long_ago))
        await db.commit()
    assert await OutboxRelay(settings, sessionmaker, lambda: None).prune() == 8
    async with sessionmaker() as db:
        assert (await db.execute(select(OutboxEvent.id))).first() is None


async def test_user_erased_scrubs_the_trail_stored_after_the_erasure_ran(
    make_settings: SettingsFactory,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """The consumer lags: it may store a user's older events (published before the erasure,
    carrying the address) after the erasure scrubbed the trail. ``user.erased`` comes after
    them in the partition, and scrubs them."""
    consumer = AuditConsumer(make_settings(), sessionmaker, lambda: None)
    user_id, other = uuid.uuid4(), uuid.uuid4()
    email = unique_email("erased")
    serializer = KafkaSerializer()

    def record(type_: str, subject: uuid.UUID, data: dict[str, Any], offset: int) -> FakeRecord:
        event = CloudEvent(
            id=uuid.uuid4(), source="/test", type=type_, subject=str(subject), time=utcnow(),
            data=data,
        )  # fmt: skip
        return FakeRecord(serializer.serialize(event), offset)

    await consumer.store(
        [
            record("user.registered", user_id, {"id": str(user_id), "email": email}, 0),
            record("user.updated", user_id, {"note": f"was {email}", "full_name": "Ada L"}, 1),
            record("user.registered", other, {"id": str(other), "email": "keep@example.com"}, 2),
        ]
    )
    await consumer.store(
        [record("user.erased", user_id, {"id": str(user_id), "erased_at": "2026-01-01"}, 3)]
    )

    trail = await _stored(sessionmaker, user_id)
    assert [row.type for row in trail] == ["user.registered", "user.updated", "user.erased"]
    assert email not in repr([row.data for row in trail])
    assert "Ada L" not in repr([row.data for row in trail])
    assert trail[0].data["email"] == ERASED_EMAIL
    assert trail[1].data == {"note": ERASED_TEXT, "full_name": None}
    # Nobody else's trail is touched.
    assert (await _stored(sessionmaker, other))[0].data["email"] == "keep@example.com"
