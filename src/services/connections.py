"""Connecting to Redis and Kafka at start-up, closing them at shut-down, and finding them later.

The names are the specification's. The app keeps both in one ``Connections`` object
(``app.state.connections``). A dependency that cannot be reached at start-up costs one warning
and an ``*_available = False`` flag there; the reconnect supervisor (``src.services.supervisor``)
keeps trying and flips the flag back without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI
from redis.asyncio import Redis

from src.config.settings import Settings
from src.services.kafka.manager import KafkaManager
from src.services.redis_client import create_redis_client, describe_redis, ping

logger = logging.getLogger(__name__)


RecoveryHook = Callable[[Redis], Awaitable[object]]


@dataclass
class Connections:
    """Redis and Kafka as the app holds them.

    The client and the manager are kept while their server is down (they reconnect by
    themselves, or through the supervisor); ``*_available`` says whether to use them right now.
    ``redis_recovery_hooks`` run before Redis is trusted again after an outage (the cache empties
    itself there: invalidations were lost meanwhile).
    """

    redis: Redis | None = None
    redis_available: bool = False
    kafka: KafkaManager | None = None
    kafka_available: bool = False
    redis_recovery_hooks: list[RecoveryHook] = field(default_factory=list)


def connections_of(app: FastAPI) -> Connections:
    """The app's connections (created with the app, see ``src.main.create_app``)."""
    found: Connections = app.state.connections
    return found


def _settings(app: FastAPI) -> Settings:
    settings: Settings = app.state.settings
    return settings


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def initialize_redis_connection(app: FastAPI) -> bool:
    """Create the Redis client and PING it; return whether Redis is available."""
    settings, held = _settings(app), connections_of(app)
    held.redis, held.redis_available = None, False
    if not settings.REDIS_ENABLED:
        logger.info("Redis is disabled (REDIS_ENABLED=false)")
        return False
    client = create_redis_client(settings)
    # Kept even when the PING fails: the pool reconnects by itself once Redis is back.
    held.redis = client
    try:
        await ping(client, settings.REDIS_CONNECT_TIMEOUT + settings.REDIS_SOCKET_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - Redis failing must never stop start-up
        logger.warning(
            "Redis unavailable at %s (%s); continuing without it",
            describe_redis(settings),
            _describe(exc),
        )
        return False
    held.redis_available = True
    logger.info("Redis connected at %s", describe_redis(settings))
    return True


async def initialize_kafka_connection(app: FastAPI) -> bool:
    """Create the ``KafkaManager`` and start its producer; return whether Kafka is available."""
    settings, held = _settings(app), connections_of(app)
    held.kafka, held.kafka_available = None, False
    if not settings.KAFKA_ENABLED:
        logger.info("Kafka is disabled (KAFKA_ENABLED=false)")
        return False
    manager = KafkaManager(settings)
    held.kafka = manager
    try:
        await manager.start()
    except Exception as exc:  # noqa: BLE001 - Kafka failing must never stop start-up
        logger.warning(
            "Kafka unavailable at %s (%s); continuing without it",
            settings.KAFKA_BOOTSTRAP_SERVERS,
            _describe(exc),
        )
        return False
    held.kafka_available = True
    logger.info("Kafka connected at %s", settings.KAFKA_BOOTSTRAP_SERVERS)
    return True


async def close_redis_connection(app: FastAPI) -> None:
    held = connections_of(app)
    client = held.redis
    held.redis, held.redis_available = None, False
    if client is not None:
        try:
            await asyncio.wait_for(client.aclose(), 2)
        except Exception as exc:  # noqa: BLE001 - shut-down goes on whatever Redis does
            logger.debug("Redis did not close cleanly: %s", _describe(exc))
        logger.info("Redis connection closed")


async def close_kafka_connection(app: FastAPI) -> None:
    held = connections_of(app)
    manager = held.kafka
    held.kafka, held.kafka_available = None, False
    if manager is not None:
        await manager.stop()
        logger.info("Kafka connection closed")


def get_redis_from_app(app: FastAPI) -> Redis | None:
    """The Redis client, or ``None`` while Redis is disabled or unavailable (fall back)."""
    held = connections_of(app)
    return held.redis if held.redis_available else None


def get_kafka_from_app(app: FastAPI) -> KafkaManager | None:
    """The ``KafkaManager``, or ``None`` while Kafka is disabled or unavailable."""
    held = connections_of(app)
    return held.kafka if held.kafka_available else None
