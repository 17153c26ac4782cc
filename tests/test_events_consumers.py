"""The specification's consumer settings mean something: ``KAFKA_AUTO_OFFSET_RESET`` and
``KAFKA_ENABLE_AUTO_COMMIT`` are the defaults of every consumer made through
``KafkaManager.create_consumer`` (the audit consumer and the courier override them on purpose).

Checked by behaviour against a real broker, not only by the options handed to aiokafka: where a
group without a committed offset starts reading, and whether it commits without being asked.
Partitions are assigned by hand, so no group join (seconds with tansu) is needed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition

from src.services.kafka.manager import KafkaManager
from tests.conftest import SettingsFactory
from tests.support.servers import KafkaBroker

Reset = Literal["earliest", "latest"]


@pytest_asyncio.fixture
async def topic_with_records(
    make_settings: SettingsFactory, kafka_process: KafkaBroker
) -> AsyncIterator[TopicPartition]:
    """A fresh single-partition topic holding three records."""
    manager = KafkaManager(make_settings(KAFKA_BOOTSTRAP_SERVERS=kafka_process.bootstrap))
    await manager.start()
    topic = f"consumer-defaults-{uuid.uuid4().hex[:8]}"
    try:
        for n in range(3):
            await manager.send(topic, {"n": n}, key="k", timeout=10)
    finally:
        await manager.stop()
    yield TopicPartition(topic, 0)


async def _committed(bootstrap: str, group_id: str, tp: TopicPartition) -> int | None:
    checker = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id)
    await asyncio.wait_for(checker.start(), 10)
    try:
        committed: int | None = await asyncio.wait_for(checker.committed(tp), 10)
        return committed
    finally:
        await asyncio.wait_for(checker.stop(), 10)


@pytest.mark.parametrize(("reset", "auto_commit"), [("earliest", True), ("latest", False)])
async def test_a_consumer_made_without_overrides_follows_the_consumer_settings(
    make_settings: SettingsFactory,
    kafka_process: KafkaBroker,
    topic_with_records: TopicPartition,
    reset: Reset,
    auto_commit: bool,
) -> None:
    tp = topic_with_records
    group_id = f"defaults-{uuid.uuid4().hex[:8]}"
    settings = make_settings(
        KAFKA_BOOTSTRAP_SERVERS=kafka_process.bootstrap,
        KAFKA_GROUP_ID=group_id,
        KAFKA_AUTO_OFFSET_RESET=reset,
        KAFKA_ENABLE_AUTO_COMMIT=auto_commit,
    )
    consumer: Any = KafkaManager(settings).create_consumer()
    await asyncio.wait_for(consumer.start(), 10)
    try:
        consumer.assign([tp])
        # No offset committed for this group yet: where it starts is KAFKA_AUTO_OFFSET_RESET's.
        position = await asyncio.wait_for(consumer.position(tp), 10)
        if reset == "earliest":
            assert position == 0
            record = await asyncio.wait_for(consumer.getone(), 10)
            assert record.offset == 0
        else:
            end = (await consumer.end_offsets([tp]))[tp]
            assert position == end > 0
    finally:
        # Stopping commits the position only when auto-commit is on.
        await asyncio.wait_for(consumer.stop(), 10)

    committed = await _committed(kafka_process.bootstrap, group_id, tp)
    assert committed == (1 if auto_commit else None)


async def test_explicit_options_win_over_the_consumer_settings(
    make_settings: SettingsFactory,
) -> None:
    """How the audit consumer and the courier get earliest and manual commits whatever the
    settings say (their docstrings say why)."""
    settings = make_settings(KAFKA_AUTO_OFFSET_RESET="latest", KAFKA_ENABLE_AUTO_COMMIT=True)
    manager = KafkaManager(settings)
    defaults: Any = manager.create_consumer()
    chosen: Any = manager.create_consumer(
        group_id="mine", auto_offset_reset="earliest", enable_auto_commit=False
    )
    # aiokafka keeps its options in private attributes (its version is pinned).
    assert (defaults._group_id, defaults._auto_offset_reset, defaults._enable_auto_commit) == (
        settings.KAFKA_GROUP_ID,
        "latest",
        True,
    )
    assert (chosen._group_id, chosen._auto_offset_reset, chosen._enable_auto_commit) == (
        "mine",
        "earliest",
        False,
    )
