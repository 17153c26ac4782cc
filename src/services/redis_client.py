"""The Redis client: the one module that knows how we build and probe a Redis connection.

Three ways to say where Redis is, in this order of precedence: REDIS_SENTINELS (the sentinels
name the current master, and name the new one after a failover), REDIS_URL (``redis://``,
``rediss://`` for TLS, ``unix://``), else REDIS_HOST / REDIS_PORT / REDIS_DB / REDIS_SSL. The
settings refuse REDIS_URL and REDIS_SENTINELS together. Whichever is used, every wait is bounded
the same way, and ``describe_redis`` says where without ever saying the password.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from src.config.settings import Settings

CLIENT_NAME = "user-management-service"


def _retry(attempts: int) -> Retry:
    return Retry(ExponentialBackoff(cap=0.2, base=0.02), attempts)


def _bounded_options(settings: Settings) -> dict[str, Any]:
    """The options every connection to the master gets, however it is found.

    redis-py's defaults changed across releases (and before 8.0 a socket could hang forever), so
    everything that matters is spelled out here: short timeouts and few retries, because this is
    a cache and the database is always there to fall back on.
    """
    password = settings.REDIS_PASSWORD.get_secret_value() if settings.REDIS_PASSWORD else None
    return {
        "password": password,
        "socket_connect_timeout": settings.REDIS_CONNECT_TIMEOUT,
        "socket_timeout": settings.REDIS_SOCKET_TIMEOUT,
        "retry": _retry(settings.REDIS_RETRIES),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        "health_check_interval": settings.REDIS_HEALTH_CHECK_INTERVAL,
        "max_connections": settings.REDIS_MAX_CONNECTIONS,
        "decode_responses": True,
        "protocol": 3,
        "client_name": CLIENT_NAME,
    }


def sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    """REDIS_SENTINELS as (host, port) pairs (validated by the settings); empty without it."""
    pairs = (item.rpartition(":") for item in (settings.REDIS_SENTINELS or "").split(",") if item)
    return [(host.strip("[]"), int(port)) for host, _, port in pairs]


def create_redis_client(settings: Settings) -> Redis:
    """A pooled client whose every wait is bounded, pointed where the settings say."""
    options = _bounded_options(settings)
    if settings.REDIS_SENTINELS:
        # The sentinels themselves: no retry on one (the next sentinel is the retry), the same
        # short timeouts, so asking all of them costs at most a few connect timeouts.
        # redis-py leaves Sentinel.__init__ unannotated.
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            sentinel_addresses(settings),
            sentinel_kwargs={
                "socket_connect_timeout": settings.REDIS_CONNECT_TIMEOUT,
                "socket_timeout": settings.REDIS_SOCKET_TIMEOUT,
                "retry": _retry(0),
                "decode_responses": True,
                "client_name": CLIENT_NAME,
            },
        )
        # A SentinelConnectionPool asks the sentinels for the master on every new connection, and
        # a connection that fails (the old master died, or came back as a read-only replica) is
        # dropped; so once the sentinels have promoted a replica, the next connection goes there.
        master: Redis = sentinel.master_for(
            settings.REDIS_SENTINEL_MASTER, db=settings.REDIS_DB, ssl=settings.REDIS_SSL, **options
        )
        return master
    if settings.REDIS_URL is not None:
        # What the URL says (host, port, db, TLS, password) wins over the keyword arguments;
        # REDIS_PASSWORD stands in when it has no password.
        return Redis.from_url(settings.REDIS_URL.get_secret_value(), **options)
    return Redis(
        host=settings.REDIS_HOST,
        port=settings.REDIS_PORT,
        db=settings.REDIS_DB,
        ssl=settings.REDIS_SSL,
        **options,
    )


def describe_redis(settings: Settings) -> str:
    """Where the client connects, for logs and operators' health details: never the password
    (nor anything else of a URL's user part or query)."""
    if settings.REDIS_SENTINELS:
        return f"sentinel master {settings.REDIS_SENTINEL_MASTER!r} via {settings.REDIS_SENTINELS}"
    if settings.REDIS_URL is not None:
        parsed = urlsplit(settings.REDIS_URL.get_secret_value())
        if parsed.scheme == "unix":
            return f"unix://{parsed.path}"
        host = parsed.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        return f"{parsed.scheme}://{host}:{parsed.port or 6379}{parsed.path}"
    scheme = "rediss" if settings.REDIS_SSL else "redis"
    return f"{scheme}://{settings.REDIS_HOST}:{settings.REDIS_PORT}/{settings.REDIS_DB}"


async def ping(client: Redis, timeout: float) -> float:
    """PING under a hard timeout; return the latency in milliseconds."""
    started = time.perf_counter()
    async with asyncio.timeout(timeout):
        await client.ping()
    return (time.perf_counter() - started) * 1000
