"""The reconnect supervisor: notices a lost Redis or Kafka and brings it back without a restart.

One small loop per dependency. While a dependency is up it is probed every
``SUPERVISOR_INTERVAL`` seconds; while it is down, reconnection is retried with exponential
backoff from ``RECONNECT_BACKOFF_INITIAL`` up to ``RECONNECT_BACKOFF_MAX``. Only changes of state
are logged, so a long outage is one warning, not a flood.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI

from src.config.settings import Settings
from src.services.kafka.manager import KafkaManager
from src.services.redis_client import ping

logger = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[None]]


async def _watch(app: FastAPI, name: str, flag: str, probe: Probe, settings: Settings) -> None:
    delay = settings.RECONNECT_BACKOFF_INITIAL
    while True:
        try:
            await probe()
        except Exception as exc:  # noqa: BLE001 - any failure means "down"; keep watching
            if getattr(app.state, flag, False):
                setattr(app.state, flag, False)
                # A timeout's text is empty: name the exception rather than log "()".
                reason = str(exc) or type(exc).__name__
                logger.warning("%s connection lost (%s); retrying in the background", name, reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.RECONNECT_BACKOFF_MAX)
            continue
        if not getattr(app.state, flag, False):
            setattr(app.state, flag, True)
            logger.info("%s connection (re)established", name)
        delay = settings.RECONNECT_BACKOFF_INITIAL
        await asyncio.sleep(settings.SUPERVISOR_INTERVAL)


def start_supervisor(app: FastAPI) -> list[asyncio.Task[None]]:
    """Start one watcher per enabled dependency; the caller owns (and cancels) the tasks."""
    settings: Settings = app.state.settings
    tasks: list[asyncio.Task[None]] = []
    if settings.REDIS_ENABLED and app.state.redis is not None:
        client = app.state.redis

        async def probe_redis() -> None:
            await ping(client, settings.HEALTH_CHECK_TIMEOUT)
            if not app.state.redis_available:
                # Coming back: let owners of Redis data repair it before anyone reads it again.
                for hook in getattr(app.state, "redis_recovery_hooks", []):
                    await hook(client)

        tasks.append(
            asyncio.create_task(
                _watch(app, "Redis", "redis_available", probe_redis, settings),
                name="supervisor:redis",
            )
        )
    if settings.KAFKA_ENABLED and app.state.kafka is not None:
        manager: KafkaManager = app.state.kafka

        async def probe_kafka() -> None:
            if not manager.started:
                await manager.start()
            await manager.check_cluster(settings.HEALTH_CHECK_TIMEOUT)

        tasks.append(
            asyncio.create_task(
                _watch(app, "Kafka", "kafka_available", probe_kafka, settings),
                name="supervisor:kafka",
            )
        )
    return tasks
