"""The reconnect supervisor: notices a lost Redis or Kafka and brings it back without a restart.

One small loop per dependency. While a dependency is up it is probed every
``SUPERVISOR_INTERVAL`` seconds; while it is down, reconnection is retried with exponential
backoff from ``RECONNECT_BACKOFF_INITIAL`` up to ``RECONNECT_BACKOFF_MAX``. Only changes of state
are logged, so a long outage is one warning, not a flood.

A probe that times out while the event loop itself runs late (a flood of requests) says nothing
about the dependency: its answer may be sitting unread in a socket. Declaring Redis or Kafka lost
then would turn a busy service into a slower one (no cache, no events), so such a timeout is
retried, up to ``INCONCLUSIVE_LIMIT`` times in a row, before it counts (``LoopLag``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import TimeoutError as RedisTimeoutError

from src.config.settings import Settings
from src.services import metrics
from src.services.connections import Connections
from src.services.redis_client import ping

logger = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[None]]

# Timeouts in a row forgiven to a late event loop before the dependency is declared lost.
INCONCLUSIVE_LIMIT = 5


class LoopLag:
    """How late the event loop runs what is due: a sleeper that notes how late it wakes up."""

    def __init__(self, period: float = 0.1) -> None:
        self.period = period
        self._latest = 0.0
        self._due: float | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._due = loop.time() + self.period
            await asyncio.sleep(self.period)
            self._latest = max(0.0, loop.time() - self._due)

    def seconds(self) -> float:
        """The latest lag, or the current one if the sleeper is overdue right now."""
        overdue = asyncio.get_running_loop().time() - self._due if self._due is not None else 0
        return max(self._latest, overdue)


def _inconclusive(exc: Exception, lag: LoopLag | None, timeout: float) -> bool:
    timed_out = isinstance(exc, TimeoutError | RedisTimeoutError)
    return timed_out and lag is not None and lag.seconds() >= timeout / 2


async def _watch(
    connections: Connections,
    name: str,
    flag: str,
    probe: Probe,
    settings: Settings,
    on_recovery: Callable[[], None] | None = None,
    lag: LoopLag | None = None,
) -> None:
    delay = settings.RECONNECT_BACKOFF_INITIAL
    forgiven = 0
    dependency = name.lower()
    while True:
        started = time.perf_counter()
        try:
            await probe()
        except Exception as exc:  # noqa: BLE001 - any failure means "down"; keep watching
            up = getattr(connections, flag)
            if (
                up
                and forgiven < INCONCLUSIVE_LIMIT
                and _inconclusive(exc, lag, settings.HEALTH_CHECK_TIMEOUT)
            ):
                forgiven += 1
                logger.debug("%s probe timed out while the event loop runs late", name)
                await asyncio.sleep(settings.SUPERVISOR_INTERVAL)
                continue
            forgiven = 0
            metrics.dependency_checked(dependency, False, time.perf_counter() - started)
            if up:
                setattr(connections, flag, False)
                # A timeout's text is empty: name the exception rather than log "()".
                reason = str(exc) or type(exc).__name__
                logger.warning("%s connection lost (%s); retrying in the background", name, reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.RECONNECT_BACKOFF_MAX)
            continue
        forgiven = 0
        metrics.dependency_checked(dependency, True, time.perf_counter() - started)
        if not getattr(connections, flag):
            setattr(connections, flag, True)
            logger.info("%s connection (re)established", name)
            if on_recovery is not None:
                on_recovery()
        delay = settings.RECONNECT_BACKOFF_INITIAL
        await asyncio.sleep(settings.SUPERVISOR_INTERVAL)


def start_supervisor(
    settings: Settings,
    connections: Connections,
    on_kafka_recovery: Callable[[], None] | None = None,
) -> list[asyncio.Task[None]]:
    """Start one watcher per enabled dependency; the caller owns (and cancels) the tasks.

    ``on_kafka_recovery`` runs the moment Kafka is back (the relay is woken with it, rather than
    waiting out its own backoff while the broker is already there).
    """
    lag = LoopLag()
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(lag.run(), name="loop-lag")]
    client = connections.redis
    if settings.REDIS_ENABLED and client is not None:
        redis_client = client

        async def probe_redis() -> None:
            await ping(redis_client, settings.HEALTH_CHECK_TIMEOUT)
            if not connections.redis_available:
                # Coming back: let owners of Redis data repair it before anyone reads it again.
                for hook in connections.redis_recovery_hooks:
                    await hook(redis_client)

        tasks.append(
            asyncio.create_task(
                _watch(connections, "Redis", "redis_available", probe_redis, settings, lag=lag),
                name="supervisor:redis",
            )
        )
    manager = connections.kafka
    if settings.KAFKA_ENABLED and manager is not None:
        kafka_manager = manager

        async def probe_kafka() -> None:
            restarted = not kafka_manager.started
            if restarted:
                await kafka_manager.start()
            await kafka_manager.check_cluster(settings.HEALTH_CHECK_TIMEOUT)
            if restarted and connections.kafka_available and on_kafka_recovery is not None:
                # The producer was restarted without Kafka ever being marked down (a short
                # stall the relay noticed first): the relay is waiting for it, wake it now.
                on_kafka_recovery()

        tasks.append(
            asyncio.create_task(
                _watch(
                    connections,
                    "Kafka",
                    "kafka_available",
                    probe_kafka,
                    settings,
                    on_kafka_recovery,
                    lag,
                ),
                name="supervisor:kafka",
            )
        )
    return tasks
