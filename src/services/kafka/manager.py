"""``KafkaManager``: the one object that talks to the Kafka cluster.

It owns the producer, builds consumers from the specification's consumer settings and answers
"is the cluster there?" with a real metadata request. Every await on the network is bounded:
aiokafka's own timeouts are 40 s and some of its waits (``send`` on a producer that never started,
``stop`` with a lost broker and idempotence on) have none at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.helpers import create_ssl_context

from src.config.settings import Settings
from src.services.kafka.serializers import KafkaSerializer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutgoingMessage:
    topic: str
    key: str | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


class KafkaUnavailableError(RuntimeError):
    """The producer is not connected, or the broker did not answer in time."""


class KafkaSendTimeout(KafkaUnavailableError):
    """Messages were handed to the producer but not acknowledged in time."""


class KafkaManager:
    def __init__(self, settings: Settings, serializer: KafkaSerializer | None = None) -> None:
        self.settings = settings
        self.serializer = serializer or KafkaSerializer()
        self.producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._lock = asyncio.Lock()
        # The supervisor and health requests check the cluster at the same time: without this,
        # each would build its own admin client and all but one would be left running.
        self._admin_lock = asyncio.Lock()

    # --- connection options shared by producer, consumers and admin ---------------------------
    def _common_options(self) -> dict[str, Any]:
        s = self.settings
        options: dict[str, Any] = {
            "bootstrap_servers": s.kafka_bootstrap_list,
            "client_id": s.KAFKA_CLIENT_ID,
            "request_timeout_ms": s.KAFKA_REQUEST_TIMEOUT_MS,
            "retry_backoff_ms": s.KAFKA_RETRY_BACKOFF_MS,
            "security_protocol": s.KAFKA_SECURITY_PROTOCOL,
        }
        if s.KAFKA_SECURITY_PROTOCOL in ("SSL", "SASL_SSL"):
            cafile = str(s.KAFKA_SSL_CAFILE) if s.KAFKA_SSL_CAFILE else None
            options["ssl_context"] = create_ssl_context(cafile=cafile)
        if s.KAFKA_SECURITY_PROTOCOL.startswith("SASL"):
            options["sasl_mechanism"] = s.KAFKA_SASL_MECHANISM or "PLAIN"
            options["sasl_plain_username"] = s.KAFKA_SASL_USERNAME
            options["sasl_plain_password"] = (
                s.KAFKA_SASL_PASSWORD.get_secret_value() if s.KAFKA_SASL_PASSWORD else None
            )
        return options

    @property
    def started(self) -> bool:
        return self.producer is not None

    # --- producer lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Start the producer within ``KAFKA_CONNECT_TIMEOUT``; raise if it cannot."""
        async with self._lock:
            if self.producer is not None:
                return
            producer = AIOKafkaProducer(
                **self._common_options(),
                acks="all",
                enable_idempotence=self.settings.KAFKA_ENABLE_IDEMPOTENCE,
                linger_ms=5,
            )
            try:
                await asyncio.wait_for(producer.start(), self.settings.KAFKA_CONNECT_TIMEOUT)
            except BaseException:
                # A producer whose start() failed still owns sockets and tasks: always stop it.
                await self._stop_quietly(producer)
                raise
            self.producer = producer

    async def stop(self) -> None:
        """Flush and close the producer and the admin client, each within a bound."""
        async with self._lock:
            producer, self.producer = self.producer, None
        async with self._admin_lock:
            admin, self._admin = self._admin, None
        if producer is not None:
            await self._stop_quietly(producer)
        if admin is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(admin.close(), self.settings.KAFKA_CONNECT_TIMEOUT)

    async def restart(self, *, flush: bool = True) -> None:
        """Recreate the producer: the way out of aiokafka states that never recover.

        ``flush=False`` is for a producer whose send has just timed out: a graceful stop would
        spend its whole bound trying to flush to a broker that does not answer, and whatever it
        did flush would arrive after the sender gave up on it. Its unsent messages are failed
        instead. Every step is bounded (by ``KAFKA_CONNECT_TIMEOUT``), so callers need no timeout
        of their own; one that cut a restart short could leave the old client open.
        """
        if flush:
            await self.stop()
        else:
            async with self._lock:
                producer, self.producer = self.producer, None
            if producer is not None:
                await self._abandon(producer)
        await self.start()

    async def _stop_quietly(self, producer: AIOKafkaProducer) -> None:
        try:
            await asyncio.wait_for(producer.stop(), self.settings.KAFKA_CONNECT_TIMEOUT * 2)
        except Exception:
            logger.debug("Kafka producer did not stop cleanly", exc_info=True)
            await self._abandon(producer)

    async def _abandon(self, producer: AIOKafkaProducer) -> None:
        """Close a producer whose ``stop()`` could not flush (the broker is gone), or that is not
        worth flushing (``restart(flush=False)``).

        Cutting ``stop()`` short leaves its sender task retrying pending batches for the life of
        the process (aiokafka #1101), and every ``restart()`` would add another. So cancel the
        sender, fail whatever is still pending (its senders get an error instead of waiting out
        their timeout; the outbox sends it again) and close the client. ``_sender`` and
        ``_message_accumulator`` are private: the aiokafka version is pinned for this reason.
        """
        timeout = self.settings.KAFKA_CONNECT_TIMEOUT
        sender = getattr(producer, "_sender", None)
        with contextlib.suppress(Exception):
            if sender is not None:
                await asyncio.wait_for(sender.close(), timeout)
        accumulator = getattr(producer, "_message_accumulator", None)
        if accumulator is not None:
            accumulator.fail_all(KafkaUnavailableError("producer closed with messages unsent"))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.client.close(), timeout)
        producer._closed = True  # what stop() would have set; aiokafka warns at exit otherwise

    # --- producing ----------------------------------------------------------------------------
    async def send(
        self,
        topic: str,
        value: Any,
        key: str | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Serialize and send one message, waiting (bounded) for the broker's acknowledgement."""
        producer = self.producer
        if producer is None:
            raise KafkaUnavailableError("Kafka producer is not connected")
        payload = value if isinstance(value, bytes) else self.serializer.serialize(value)
        try:
            return await asyncio.wait_for(
                producer.send_and_wait(
                    topic,
                    payload,
                    key=self.serializer.serialize_key(key),
                    headers=list(headers) if headers else None,
                ),
                timeout or self.settings.KAFKA_REQUEST_TIMEOUT_MS / 1000,
            )
        except TimeoutError as exc:
            raise KafkaUnavailableError(f"no acknowledgement from Kafka for {topic}") from exc

    async def send_batch(self, messages: Sequence[OutgoingMessage], timeout: float) -> None:
        """Send messages in order and wait until the broker acknowledged all of them.

        Bounded as a whole: with the idempotent producer and a lost broker, aiokafka's batches
        never expire (issue #1101), so only an outer timeout ends the wait.
        """
        producer = self.producer
        if producer is None:
            raise KafkaUnavailableError("Kafka producer is not connected")
        acks: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(timeout):
                for m in messages:
                    key = self.serializer.serialize_key(m.key)
                    acks.append(
                        await producer.send(m.topic, m.value, key=key, headers=list(m.headers))
                    )
                await asyncio.gather(*acks)
        except TimeoutError as exc:
            raise KafkaSendTimeout(f"no acknowledgement from Kafka within {timeout:g}s") from exc
        finally:
            # Given up on: nobody will read these any more. Cancelled, aiokafka leaves them alone
            # (instead of failing them later with an error nobody retrieves, which asyncio logs).
            for ack in acks:
                if not ack.done():
                    ack.cancel()
                elif not ack.cancelled():
                    ack.exception()

    # --- consuming ----------------------------------------------------------------------------
    def create_consumer(self, *topics: str, group_id: str | None = None, **overrides: Any) -> Any:
        """A consumer configured from the specification's consumer settings (not yet started).

        ``KAFKA_GROUP_ID``, ``KAFKA_AUTO_OFFSET_RESET``, ``KAFKA_ENABLE_AUTO_COMMIT`` and
        ``KAFKA_SESSION_TIMEOUT_MS`` are the defaults; ``group_id`` and ``overrides`` (any
        ``AIOKafkaConsumer`` option) win over them. A consumer that overrides one of them says why
        where it is made: the audit consumer and the mail courier read from the earliest offset and
        commit by hand, because they must neither miss nor half-handle a record.
        """
        s = self.settings
        options: dict[str, Any] = {
            **self._common_options(),
            "group_id": group_id or s.KAFKA_GROUP_ID,
            "auto_offset_reset": s.KAFKA_AUTO_OFFSET_RESET,
            "enable_auto_commit": s.KAFKA_ENABLE_AUTO_COMMIT,
            "session_timeout_ms": s.KAFKA_SESSION_TIMEOUT_MS,
            **overrides,
        }
        return AIOKafkaConsumer(*topics, **options)

    # --- health -------------------------------------------------------------------------------
    async def check_cluster(self, timeout: float) -> float:
        """A live metadata request (``DescribeCluster``) under ``timeout``; return latency in ms."""
        started = time.perf_counter()
        admin: AIOKafkaAdminClient | None = None
        try:
            async with asyncio.timeout(timeout):
                admin = await self._admin_client()
                await admin.describe_cluster()
        except BaseException:
            # Start from a fresh bootstrap next time rather than trusting a half-broken client;
            # unless a concurrent check has already replaced it (then that one is not ours).
            if admin is not None and self._admin is admin:
                await self._discard_admin(admin, timeout)
            raise
        return (time.perf_counter() - started) * 1000

    async def _discard_admin(self, admin: AIOKafkaAdminClient, timeout: float) -> None:
        self._admin = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.close(), timeout)

    async def _admin_client(self) -> AIOKafkaAdminClient:
        async with self._admin_lock:
            if self._admin is None:
                admin = AIOKafkaAdminClient(**self._common_options())
                try:
                    await admin.start()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(admin.close(), self.settings.KAFKA_CONNECT_TIMEOUT)
                    raise
                self._admin = admin
            return self._admin
