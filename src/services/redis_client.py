"""The Redis client: the one module that knows how we build and probe a Redis connection."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from src.config.settings import Settings


def create_redis_client(settings: Settings) -> Redis:
    """A pooled client whose every wait is bounded.

    redis-py's defaults changed across releases (and before 8.0 a socket could hang forever), so
    everything that matters is spelled out here: short timeouts and few retries, because this is a
    cache and the database is always there to fall back on.
    """
    password = settings.REDIS_PASSWORD.get_secret_value() if settings.REDIS_PASSWORD else None
    return Redis(
        host=settings.REDIS_HOST,
        port=settings.REDIS_PORT,
        db=settings.REDIS_DB,
        password=password,
        ssl=settings.REDIS_SSL,
        socket_connect_timeout=settings.REDIS_CONNECT_TIMEOUT,
        socket_timeout=settings.REDIS_SOCKET_TIMEOUT,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), settings.REDIS_RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        health_check_interval=settings.REDIS_HEALTH_CHECK_INTERVAL,
        max_connections=settings.REDIS_MAX_CONNECTIONS,
        decode_responses=True,
        protocol=3,
        client_name="user-management-service",
    )


async def ping(client: Redis, timeout: float) -> float:
    """PING under a hard timeout; return the latency in milliseconds."""
    started = time.perf_counter()
    async with asyncio.timeout(timeout):
        await client.ping()
    return (time.perf_counter() - started) * 1000
