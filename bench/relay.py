"""Figure i: the outbox relay against a bare aiokafka producer, on the same broker.

The relay is the service's own ``OutboxRelay``, built as ``src.app.wiring`` builds it: its
sessions carry the wake-up signal, so a commit that wrote an event wakes it at once, as a
request's commit does inside the service. It runs in this process, with the service stopped, so
no second relay competes for the rows. Events are recorded with the service's ``record_event``,
one per transaction, at a steady rate (latency from commit to the message being readable on the
topic), then as one burst (throughput).

The baseline sends the very bytes the relay put on the topic (value, key, headers, as read
back), with a producer configured as ``KafkaManager`` configures its own (``acks=all``,
idempotence as the settings say, ``linger_ms=5``): first at the same steady rate (send to
readable), then all at once.

A consumer in this process reads the topic throughout and notes when each event id arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from src.config.settings import Settings
from src.db.session import create_engine, create_sessionmaker
from src.events.outbox import OUTBOX_SIGNAL, EventType, record_event
from src.events.relay import OutboxRelay
from src.services.kafka.manager import KafkaManager


@dataclass
class RelayFigures:
    """Latencies in milliseconds, rates in events per second."""

    steady_rate: float
    relay_p50_ms: float
    relay_p99_ms: float
    bare_p50_ms: float
    bare_p99_ms: float
    burst: int
    relay_per_sec: float
    bare_per_sec: float
    lost: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class _Message:
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


class _Recorder:
    """Reads every partition of the topic and notes the arrival time of each event id."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=10,
        )
        self.arrivals: dict[str, float] = {}
        self.messages: dict[str, _Message] = {}
        self.watching: set[str] = set()
        self._progress = asyncio.Event()  # set whenever messages were read
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.wait_for(self.consumer.start(), 10)
        await self.consumer.topics()
        partitions = self.consumer.partitions_for_topic(self.topic) or set()
        self.consumer.assign([TopicPartition(self.topic, p) for p in sorted(partitions)])
        self._task = asyncio.create_task(self._run())
        # Read past what is already on the topic (earlier phases' events) before measuring.
        while await self._progressed(1.0):
            pass

    async def _run(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=20)
            now = time.monotonic()
            for messages in batches.values():
                self._progress.set()
                for message in messages:
                    event_id = str(json.loads(message.value or b"{}").get("id"))
                    if event_id in self.watching and event_id not in self.arrivals:
                        self.arrivals[event_id] = now
                        self.messages[event_id] = _Message(
                            message.key, message.value or b"", list(message.headers)
                        )

    def watch(self, ids: set[str]) -> None:
        """Note arrivals of these ids (add more to ``watching`` before they can arrive) from now
        on; arrivals noted earlier are forgotten."""
        self.watching = ids
        self.arrivals = {}

    async def _progressed(self, timeout: float) -> bool:
        """Whether messages were read (since the last call) within ``timeout`` seconds.

        Cleared after waking, never before waiting: a read that lands between a caller's check
        and this wait still counts, so no arrival is slept through."""
        try:
            await asyncio.wait_for(self._progress.wait(), timeout)
        except TimeoutError:
            return False
        self._progress.clear()
        return True

    async def wait_for(self, count: int, timeout: float) -> None:
        """Until ``count`` watched ids have arrived, or ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < count and time.monotonic() < deadline:
            await self._progressed(max(0.0, deadline - time.monotonic()))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.consumer.stop(), 5)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))  # the smallest value with pct% at or below
    return ordered[min(rank, len(ordered)) - 1]


def _payload(user_id: uuid.UUID, n: int) -> dict[str, Any]:
    """About the size of a real ``user.updated`` event's data."""
    return {
        "id": str(user_id),
        "email": f"relay-{n}@example.com",
        "full_name": f"Relay Bench {n}",
        "role": "user",
        "is_active": True,
        "email_verified": False,
        "version": n,
        "changes": ["full_name"],
        "actor_id": str(user_id),
    }


async def _steady(
    rate: float,
    seconds: float,
    send: Callable[[int], Awaitable[tuple[str, float]]],
    recorder: _Recorder,
) -> list[float]:
    """Call ``send(n)`` ``rate`` times a second; it returns an event id and the moment its life
    began (the commit, or the call to the producer). Return the latencies (ms) from that moment
    to the id being readable on the topic."""
    count = max(1, int(rate * seconds))
    started = time.monotonic()
    began: dict[str, float] = {}
    for n in range(count):
        await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
        event_id, at = await send(n)
        began[event_id] = at
    await recorder.wait_for(count, 15)
    return [(recorder.arrivals[i] - at) * 1000 for i, at in began.items() if i in recorder.arrivals]


async def measure(
    settings: Settings, steady_rate: float, seconds: float, burst: int
) -> RelayFigures:
    """Run figure i against the database and broker in ``settings`` (the service stopped)."""
    topic = settings.KAFKA_USER_EVENTS_TOPIC
    engine = create_engine(settings)
    signal = asyncio.Event()
    sessionmaker = create_sessionmaker(engine, info={OUTBOX_SIGNAL: signal})
    manager = KafkaManager(settings)
    await manager.start()
    relay = OutboxRelay(settings, sessionmaker, lambda: manager, signal)
    recorder = _Recorder(settings.KAFKA_BOOTSTRAP_SERVERS, topic)
    await recorder.start()
    users = [uuid.uuid4() for _ in range(50)]
    runner = asyncio.create_task(relay.run())
    notes: list[str] = []
    try:
        # --- the relay: steady rate, one event per transaction --------------------------------
        recorder.watch(set())

        async def commit_one(n: int) -> tuple[str, float]:
            async with sessionmaker() as db:
                user = users[n % len(users)]
                row = record_event(db, settings, EventType.UPDATED, user, _payload(user, n))
                recorder.watching.add(str(row.id))
                await db.commit()
            return str(row.id), time.monotonic()

        relay_latencies = await _steady(steady_rate, seconds, commit_one, recorder)

        # --- the relay: a burst, one transaction ----------------------------------------------
        recorder.watch(set())
        burst_ids: list[str] = []
        async with sessionmaker() as db:
            for n in range(burst):
                user = users[n % len(users)]
                row = record_event(db, settings, EventType.UPDATED, user, _payload(user, n))
                burst_ids.append(str(row.id))
            recorder.watching.update(burst_ids)
            await db.commit()
        burst_committed = time.monotonic()
        await recorder.wait_for(burst, 120)
        arrived = [recorder.arrivals[i] for i in burst_ids if i in recorder.arrivals]
        lost = burst - len(arrived)
        relay_rate = len(arrived) / (max(arrived) - burst_committed) if arrived else 0.0
        if lost:
            notes.append(f"relay: {lost} of {burst} burst events not seen on the topic")
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

        # --- the bare producer: the same bytes -------------------------------------------------
        messages = [recorder.messages[i] for i in burst_ids if i in recorder.messages]
        producer = AIOKafkaProducer(
            # As KafkaManager configures its producer (PLAINTEXT: the bench's broker).
            bootstrap_servers=settings.kafka_bootstrap_list,
            client_id=settings.KAFKA_CLIENT_ID,
            request_timeout_ms=settings.KAFKA_REQUEST_TIMEOUT_MS,
            retry_backoff_ms=settings.KAFKA_RETRY_BACKOFF_MS,
            acks="all",
            enable_idempotence=settings.KAFKA_ENABLE_IDEMPOTENCE,
            linger_ms=5,
        )
        await asyncio.wait_for(producer.start(), 10)
        try:
            steady = messages[: max(1, int(steady_rate * seconds))]
            recorder.watch({_event_id(m) for m in steady})

            async def send_one(n: int) -> tuple[str, float]:
                message = steady[n % len(steady)]
                at = time.monotonic()
                await producer.send_and_wait(
                    topic, message.value, key=message.key, headers=message.headers
                )
                return _event_id(message), at

            bare_latencies = await _steady(steady_rate, seconds, send_one, recorder)

            recorder.watch({_event_id(m) for m in messages})
            started = time.monotonic()
            acks = [
                await producer.send(topic, m.value, key=m.key, headers=m.headers) for m in messages
            ]
            await asyncio.gather(*acks)
            await recorder.wait_for(len(messages), 120)
            last = max(recorder.arrivals.values(), default=started)
            bare_rate = len(recorder.arrivals) / (last - started) if recorder.arrivals else 0.0
        finally:
            await asyncio.wait_for(producer.stop(), 10)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await recorder.stop()
        await manager.stop()
        await engine.dispose()
    return RelayFigures(
        steady_rate=steady_rate,
        relay_p50_ms=percentile(relay_latencies, 50),
        relay_p99_ms=percentile(relay_latencies, 99),
        bare_p50_ms=percentile(bare_latencies, 50),
        bare_p99_ms=percentile(bare_latencies, 99),
        burst=burst,
        relay_per_sec=relay_rate,
        bare_per_sec=bare_rate,
        lost=lost,
        notes=notes,
    )


def _event_id(message: _Message) -> str:
    return str(json.loads(message.value).get("id"))
