"""Helpers for the event tests: read what is really on a Kafka topic, and what the outbox says.

Topics are read with a plain consumer (no group, from the earliest offset, partitions assigned)
until they have been quiet for a moment; every read is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from tests.support.app import eventually
from tests.support.servers import KafkaBroker, free_port

USER_EVENTS = "user-events"
NOTIFICATIONS = "user-notifications"
# tansu lets a consumer join its group after half the session timeout: the smallest timeout a
# Kafka broker accepts makes the audit consumer start reading after 3 s instead of 15.
FAST_GROUP_JOIN = {"KAFKA_SESSION_TIMEOUT_MS": 6000}
_QUIET = 0.6  # seconds without a new message after which a read is taken to be complete


@dataclass(frozen=True)
class Record:
    """One message as it sits on the topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def of(cls, partition: int, message: ConsumerRecord[bytes, bytes]) -> Record:
        assert message.value is not None
        return cls(partition, message.offset, message.key, message.value, tuple(message.headers))

    @property
    def event(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.value)
        return body

    @property
    def event_id(self) -> str:
        return str(self.event["id"])


def _consumer(bootstrap: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=5000,
        fetch_max_wait_ms=50,
    )


async def _stop(consumer: AIOKafkaConsumer) -> None:
    """Stop within a bound. With its broker gone, aiokafka's ``stop()`` can end by re-raising the
    cancellation of its own fetch task; only a cancellation of the caller is passed on."""
    try:
        await asyncio.wait_for(consumer.stop(), 5)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:  # noqa: BLE001 - a consumer that cannot stop cleanly is still finished
        pass


async def _assign_all(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    await consumer.topics()  # refresh metadata; never creates the topic
    partitions = consumer.partitions_for_topic(topic) or set()
    assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(assigned)
    if assigned:
        await consumer.seek_to_beginning(*assigned)
    return assigned


async def read_topic(bootstrap: str, topic: str, timeout: float = 10.0) -> list[Record]:
    """Every message on ``topic`` now, partition by partition in offset order.

    Read until the topic has been quiet for a moment: tansu's end offsets count record batches,
    not records, so they cannot say where the topic ends.
    """
    consumer = _consumer(bootstrap)
    await asyncio.wait_for(consumer.start(), timeout)
    records: list[Record] = []
    try:
        async with asyncio.timeout(timeout):
            assigned = await _assign_all(consumer, topic)
            quiet_since = asyncio.get_running_loop().time()
            while assigned and asyncio.get_running_loop().time() - quiet_since < _QUIET:
                batches = await consumer.getmany(*assigned, timeout_ms=100)
                for tp, messages in batches.items():
                    records.extend(Record.of(tp.partition, m) for m in messages)
                if batches:
                    quiet_since = asyncio.get_running_loop().time()
    finally:
        await _stop(consumer)
    records.sort(key=lambda r: (r.partition, r.offset))
    return records


async def wait_for_records(
    bootstrap: str,
    topic: str,
    done: Callable[[list[Record]], bool],
    timeout: float = 20.0,
) -> list[Record]:
    """Read ``topic`` again and again until ``done`` says what is on it is enough."""

    async def attempt() -> list[Record] | None:
        try:
            records = await read_topic(bootstrap, topic)
        except (KafkaError, OSError, TimeoutError):  # the broker may still be starting
            return None
        return records if done(records) else None

    result: list[Record] = await eventually(attempt, timeout=timeout, interval=0.3)
    return result


def of_types(records: Iterable[Record], *types: str) -> list[Record]:
    return [r for r in records if r.event.get("type") in types]


def subjects(records: Iterable[Record], event_type: str) -> set[str]:
    return {str(r.event["subject"]) for r in records if r.event.get("type") == event_type}


class TopicRecorder:
    """Reads a topic continuously in the background (the broker keeps nothing across a restart,
    so what was on it before a crash is only known to someone who read it in time)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.records: list[Record] = []
        self.partitions = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=50)
            for tp, messages in batches.items():
                self.records.extend(Record.of(tp.partition, m) for m in messages)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TopicRecorder]:
        consumer = _consumer(self.bootstrap)
        await asyncio.wait_for(consumer.start(), 10)
        try:
            assigned = await _assign_all(consumer, self.topic)
            assert assigned, f"{self.topic} does not exist"
            self.partitions = len(assigned)
            self._task = asyncio.create_task(self._run(consumer))
            yield self
        finally:
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            await _stop(consumer)


def first_occurrences(records: Iterable[Record], key: str) -> list[str]:
    """Event ids under message key ``key`` in the order they first appear (duplicates dropped)."""
    seen: dict[str, None] = {}
    for record in records:
        if record.key == key.encode():
            seen.setdefault(record.event_id, None)
    return list(seen)


# --- the database, read directly (also from tests whose service runs in another process) ---------


def asyncpg_dsn(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def fetch(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@dataclass(frozen=True)
class OutboxRow:
    id: str
    position: int
    type: str
    topic: str
    aggregate_id: str
    created_at: datetime
    published_at: datetime | None


async def outbox_rows(database_url: str, user_ids: Iterable[str]) -> list[OutboxRow]:
    """The outbox rows about these users, in position order."""
    rows = await fetch(
        database_url,
        "SELECT id, position, type, topic, aggregate_id, created_at, published_at FROM outbox"
        " WHERE aggregate_id = ANY($1::uuid[]) ORDER BY position",
        [uuid.UUID(u) for u in user_ids],
    )
    return [
        OutboxRow(
            str(r["id"]),
            r["position"],
            r["type"],
            r["topic"],
            str(r["aggregate_id"]),
            r["created_at"],
            r["published_at"],
        )
        for r in rows
    ]


async def audit_counts(database_url: str, user_ids: Iterable[str]) -> dict[str, int]:
    """How many times each event about these users is stored in the audit table."""
    rows = await fetch(
        database_url,
        "SELECT event_id, count(*) AS n FROM audit_events"
        " WHERE user_id = ANY($1::uuid[]) GROUP BY event_id",
        [uuid.UUID(u) for u in user_ids],
    )
    return {str(r["event_id"]): r["n"] for r in rows}


class OutboxLockWatch:
    """Samples, from a connection of its own, how long the oldest transaction holding outbox row
    locks (``SELECT ... FOR UPDATE``: a ``RowShareLock`` on the table) has been open.

    Only the relay takes those locks while Kafka is on, so this is the relay's hold time as the
    database sees it, independent of the relay's own timer. A sample every ``interval`` seconds:
    a hold shorter than that may be missed, a longer one is seen to within ``interval``.
    """

    _QUERY = """
        SELECT coalesce(extract(epoch FROM max(clock_timestamp() - a.xact_start)), 0)::float
        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.relation = 'outbox'::regclass AND l.mode = 'RowShareLock' AND l.granted
    """

    def __init__(self, database_url: str, interval: float = 0.01) -> None:
        self.database_url = database_url
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (loop time, age of the oldest holder)

    def longest(self, since: float = 0.0, until: float = float("inf")) -> float:
        return max((age for at, age in self.samples if since <= at <= until), default=0.0)

    async def _run(self, conn: asyncpg.Connection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            age = await conn.fetchval(self._QUERY)
            self.samples.append((loop.time(), float(age)))
            await asyncio.sleep(self.interval)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[OutboxLockWatch]:
        conn = await asyncpg.connect(asyncpg_dsn(self.database_url))
        task = asyncio.create_task(self._run(conn))
        try:
            yield self
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await conn.close()


# --- a broker that can crash and come back with its topics ----------------------------------------


class PausableProxy:
    """A TCP relay from a port of its own to the broker behind it.

    ``cut()`` aborts every connection and stops listening (clients see a crashed host: reset,
    then refused); ``resume()`` listens again on the same port.
    """

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()

    async def resume(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            writer.transport.abort()
            return
        pair = (writer.transport, upstream_writer.transport)
        self._transports.update(pair)
        try:
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            for transport in pair:
                transport.abort()
                self._transports.discard(transport)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()


@dataclass
class ProxiedBroker(KafkaBroker):
    """tansu behind a ``PausableProxy``: clients only ever see the proxy's address."""

    public_port: int = 0

    def command(self) -> list[str]:
        command = super().command()
        advertised = command.index("--advertised-listener-url") + 1
        command[advertised] = f"tcp://127.0.0.1:{self.public_port}"
        return command

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.public_port}"


@contextlib.asynccontextmanager
async def proxied_broker() -> AsyncIterator[tuple[ProxiedBroker, PausableProxy]]:
    broker = ProxiedBroker()
    proxy = PausableProxy(broker.port)
    broker.public_port = proxy.port
    await asyncio.to_thread(broker.start)
    await proxy.resume()
    try:
        yield broker, proxy
    finally:
        await proxy.cut()
        await asyncio.to_thread(broker.stop)


async def crash_and_restart(
    broker: ProxiedBroker, proxy: PausableProxy, topics: dict[str, int], down_for: float
) -> None:
    """SIGKILL the broker and start a new one with the same topics (empty, as tansu keeps nothing).

    Clients are cut off first and let back in only once the topics exist again, as with a
    persistent broker: tansu acknowledges writes to a topic it does not know and drops them.
    """
    await proxy.cut()
    await asyncio.to_thread(broker.kill)
    await asyncio.sleep(down_for)
    await asyncio.to_thread(broker.start)
    for name, partitions in topics.items():
        await asyncio.to_thread(broker.create_topic, name, partitions)
    await proxy.resume()
