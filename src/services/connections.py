"""Connecting to Redis and Kafka at start-up, closing them at shut-down, and finding them later.

The names are the specification's. A dependency that cannot be reached at start-up costs one
warning and an ``*_available = False`` flag on ``app.state``; the reconnect supervisor
(``src.services.supervisor``) keeps trying and flips the flag back without a restart.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from redis.asyncio import Redis

from src.config.settings import Settings
from src.services.kafka.manager import KafkaManager
from src.services.redis_client import create_redis_client, ping

logger = logging.getLogger(__name__)


def _settings(app: FastAPI) -> Settings:
    settings: Settings = app.state.settings
    return settings


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def initialize_redis_connection(app: FastAPI) -> bool:
    """Create the Redis client and PING it; return whether Redis is available."""
    settings = _settings(app)
    app.state.redis = None
    app.state.redis_available = False
    if not settings.REDIS_ENABLED:
        logger.info("Redis is disabled (REDIS_ENABLED=false)")
        return False
    client = create_redis_client(settings)
    # Kept even when the PING fails: the pool reconnects by itself once Redis is back.
    app.state.redis = client
    try:
        await ping(client, settings.REDIS_CONNECT_TIMEOUT + settings.REDIS_SOCKET_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - Redis failing must never stop start-up
        logger.warning(
            "Redis unavailable at %s:%s (%s); continuing without it",
            settings.REDIS_HOST,
            settings.REDIS_PORT,
            _describe(exc),
        )
        return False
    app.state.redis_available = True
    logger.info("Redis connected at %s:%s", settings.REDIS_HOST, settings.REDIS_PORT)
    return True


async def initialize_kafka_connection(app: FastAPI) -> bool:
    """Create the ``KafkaManager`` and start its producer; return whether Kafka is available."""
    settings = _settings(app)
    app.state.kafka = None
    app.state.kafka_available = False
    if not settings.KAFKA_ENABLED:
        logger.info("Kafka is disabled (KAFKA_ENABLED=false)")
        return False
    manager = KafkaManager(settings)
    app.state.kafka = manager
    try:
        await manager.start()
    except Exception as exc:  # noqa: BLE001 - Kafka failing must never stop start-up
        logger.warning(
            "Kafka unavailable at %s (%s); continuing without it",
            settings.KAFKA_BOOTSTRAP_SERVERS,
            _describe(exc),
        )
        return False
    app.state.kafka_available = True
    logger.info("Kafka connected at %s", settings.KAFKA_BOOTSTRAP_SERVERS)
    return True


async def close_redis_connection(app: FastAPI) -> None:
    client: Redis | None = getattr(app.state, "redis", None)
    app.state.redis = None
    app.state.redis_available = False
    if client is not None:
        try:
            await asyncio.wait_for(client.aclose(), 2)
        except Exception as exc:  # noqa: BLE001 - shut-down goes on whatever Redis does
            logger.debug("Redis did not close cleanly: %s", _describe(exc))
        logger.info("Redis connection closed")


async def close_kafka_connection(app: FastAPI) -> None:
    manager: KafkaManager | None = getattr(app.state, "kafka", None)
    app.state.kafka = None
    app.state.kafka_available = False
    if manager is not None:
        await manager.stop()
        logger.info("Kafka connection closed")


def get_redis_from_app(app: FastAPI) -> Redis | None:
    """The Redis client, or ``None`` while Redis is disabled or unavailable (fall back)."""
    if getattr(app.state, "redis_available", False):
        client: Redis | None = app.state.redis
        return client
    return None


def get_kafka_from_app(app: FastAPI) -> KafkaManager | None:
    """The ``KafkaManager``, or ``None`` while Kafka is disabled or unavailable."""
    if getattr(app.state, "kafka_available", False):
        manager: KafkaManager | None = app.state.kafka
        return manager
    return None
