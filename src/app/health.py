"""Live health checks of the database, Redis and Kafka.

Every check does real work (``SELECT 1``, ``PING``, a metadata request) under
``HEALTH_CHECK_TIMEOUT``; none reads a cached flag, so the answer is true at the moment it is given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

from fastapi import FastAPI
from pydantic import BaseModel

from src import __version__
from src.app.container import AppServices, app_services
from src.config.settings import Settings
from src.db.session import check_database, is_newer_schema, migration_status
from src.db.types import utcnow
from src.events.outbox import outbox_backlog
from src.mail.sender import check_smtp
from src.services import metrics
from src.services.connections import connections_of
from src.services.redis_client import describe_redis, ping

T = TypeVar("T")


class CheckStatus(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DISABLED = "disabled"


class OverallStatus(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


class CheckResult(BaseModel):
    status: CheckStatus
    latency_ms: float | None = None
    error: str | None = None
    details: dict[str, Any] | None = None


class HealthReport(BaseModel):
    status: OverallStatus
    # Operators only, like every detail below the statuses.
    version: str | None = None
    checks: dict[str, CheckResult]


def _error_text(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s"
    text, name = str(exc), type(exc).__name__
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"


async def _run(probe: Callable[[], Awaitable[float]], timeout: float) -> CheckResult:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            latency = await probe()
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", reported, never raised
        return CheckResult(
            status=CheckStatus.UNHEALTHY,
            latency_ms=round((time.perf_counter() - started) * 1000, 2),
            error=_error_text(exc, timeout),
        )
    return CheckResult(status=CheckStatus.HEALTHY, latency_ms=round(latency, 2))


def _observed(dependency: str, result: CheckResult) -> CheckResult:
    # Metrics see every live check; the latency is in milliseconds in the report.
    seconds = result.latency_ms / 1000 if result.latency_ms is not None else None
    metrics.dependency_checked(dependency, result.status is CheckStatus.HEALTHY, seconds)
    return result


async def check_database_health(app: FastAPI) -> CheckResult:
    services = app_services(app)
    timeout = services.settings.HEALTH_CHECK_TIMEOUT
    return _observed(
        "database", await _run(lambda: check_database(services.engine, timeout), timeout)
    )


async def check_redis_health(app: FastAPI) -> CheckResult:
    settings: Settings = app.state.settings
    client = connections_of(app).redis
    if not settings.REDIS_ENABLED or client is None:
        return CheckResult(status=CheckStatus.DISABLED)
    timeout = settings.HEALTH_CHECK_TIMEOUT
    result = _observed("redis", await _run(lambda: ping(client, timeout), timeout))
    # Where it connects (a URL's password left out), so operators know which Redis is meant.
    result.details = {"target": describe_redis(settings)}
    return result


async def check_kafka_health(app: FastAPI) -> CheckResult:
    """The broker's answer, plus the outbox backlog: events can pile up while the broker is fine
    (a relay that keeps failing), and that is unhealthy too once it is older than the threshold."""
    settings: Settings = app.state.settings
    manager = connections_of(app).kafka
    timeout = settings.HEALTH_CHECK_TIMEOUT
    if not settings.KAFKA_ENABLED or manager is None:
        result = CheckResult(status=CheckStatus.DISABLED)
    else:
        result = _observed("kafka", await _run(lambda: manager.check_cluster(timeout), timeout))
    details = await _outbox_details(app, timeout)
    if details is None:
        return result
    result.details = details
    relay = details.get("relay")
    if result.status is CheckStatus.HEALTHY and relay and relay["waiting"]:
        # The broker answers, but the relay has not published since it last failed: events are
        # late until it has. Say so rather than "healthy" (it clears with the next batch).
        result.status = CheckStatus.UNHEALTHY
        result.error = f"relay waiting to publish again after: {relay['last_error']}"
    age = details["outbox"]["oldest_age_seconds"]
    if result.status is not CheckStatus.DISABLED and age > settings.OUTBOX_LAG_THRESHOLD_SECONDS:
        # Said even when the broker's own error already made the check unhealthy: how long
        # events have been waiting is what tells an operator how bad the outage is.
        backlog = (
            f"outbox backlog: oldest event waiting {age:.0f}s "
            f"(threshold {settings.OUTBOX_LAG_THRESHOLD_SECONDS}s)"
        )
        result.status = CheckStatus.UNHEALTHY
        result.error = f"{result.error}; {backlog}" if result.error else backlog
    return result


async def _outbox_details(app: FastAPI, timeout: float) -> dict[str, Any] | None:
    try:
        async with asyncio.timeout(timeout), app_services(app).sessionmaker() as db:
            pending, oldest = await outbox_backlog(db)
    except Exception:  # noqa: BLE001 - the database check reports database trouble
        return None
    age = (utcnow() - oldest).total_seconds() if oldest else 0.0
    details: dict[str, Any] = {"outbox": {"pending": pending, "oldest_age_seconds": round(age, 1)}}
    relay = app_services(app).relay
    if relay is not None:
        details["relay"] = {
            "published_total": relay.published_total,
            # Events wait and the relay's last attempt failed: it is backing off.
            "waiting": pending > 0 and relay.last_error is not None,
            "last_error": relay.last_error,
            "last_error_at": _iso(relay.last_error_at),
            "last_published_at": _iso(relay.last_published_at),
            "lock_hold_max_ms": round(relay.lock_hold_max * 1000, 1),
        }
    return details


def _iso(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if timestamp is not None else None


SMTP_PROBE_REUSE_SECONDS = 10.0


class SharedResult(Generic[T]):
    """One computation answers every caller for ``reuse_seconds``; concurrent callers share the
    one in flight.

    Health is public. Without this, a flood of anonymous requests becomes a flood of checks
    against the database (exhausting its pool, so health itself reports it down) and of SMTP
    conversations with the mail provider (which may then throttle or block our real mail).
    """

    def __init__(self, reuse_seconds: float) -> None:
        self._reuse = reuse_seconds
        self._task: asyncio.Task[T] | None = None
        self._at = 0.0

    async def get(self, compute: Callable[[], Awaitable[T]]) -> T:
        stale = time.monotonic() - self._at > self._reuse
        if self._task is None or (self._task.done() and stale):
            self._task, self._at = asyncio.ensure_future(compute()), time.monotonic()
        return await asyncio.shield(self._task)


@dataclass
class HealthShares:
    """What anonymous callers share (operators get fresh answers), the SMTP probe, which
    everyone shares, and whether shut-down has begun, which readiness answers before anything
    shared."""

    report: SharedResult[HealthReport] = field(default_factory=lambda: SharedResult(1.0))
    readiness: SharedResult[str | None] = field(default_factory=lambda: SharedResult(1.0))
    smtp: SharedResult[CheckResult] = field(
        default_factory=lambda: SharedResult(SMTP_PROBE_REUSE_SECONDS)
    )
    # Set once, at the very start of shut-down (``begin_draining``): from then on /ready says
    # "not ready", so load balancers stop sending traffic before anything is closed.
    draining: bool = False


def shares(app: FastAPI) -> HealthShares:
    return app_services(app).health


# The reason /ready gives operators from the start of shut-down.
SHUTTING_DOWN = "shutting down"


def begin_draining(app: FastAPI) -> None:
    """Mark shut-down as begun: readiness turns "not ready" at once (even for a "ready" an
    anonymous caller would otherwise share for a second), while liveness stays 200. Called first
    by shut-down, before anything is closed, so no probe sees a half-closed service as ready."""
    services: AppServices | None = getattr(app.state, "services", None)
    if services is not None:
        services.health.draining = True


def is_draining(app: FastAPI) -> bool:
    """Whether shut-down has begun. An app without its services (taken apart at the end of
    shut-down, or never started) is not serving either."""
    services: AppServices | None = getattr(app.state, "services", None)
    return services is None or services.health.draining


async def check_mail_health(app: FastAPI) -> CheckResult:
    """A live SMTP conversation (connect, TLS as configured, EHLO, AUTH when SMTP_USERNAME is
    set, QUIT), shared for
    ``SMTP_PROBE_REUSE_SECONDS``, plus the counters of the courier running in this process."""
    settings: Settings = app.state.settings
    courier = app_services(app).courier
    if not settings.mail_enabled:
        result = CheckResult(status=CheckStatus.DISABLED)
    else:
        timeout = settings.HEALTH_CHECK_TIMEOUT
        probe = await shares(app).smtp.get(
            lambda: _run(lambda: check_smtp(settings, timeout), timeout)
        )
        result = probe.model_copy()
    if courier is not None:
        result.details = {"courier": courier.stats()}
    return result


async def health_report(app: FastAPI) -> HealthReport:
    database, redis, kafka, mail = await asyncio.gather(
        check_database_health(app),
        check_redis_health(app),
        check_kafka_health(app),
        check_mail_health(app),
    )
    if database.status is CheckStatus.UNHEALTHY:
        overall = OverallStatus.UNHEALTHY
    elif CheckStatus.UNHEALTHY in (redis.status, kafka.status, mail.status):
        overall = OverallStatus.DEGRADED
    else:
        overall = OverallStatus.HEALTHY
    return HealthReport(
        status=overall,
        version=__version__,
        checks={"database": database, "redis": redis, "kafka": kafka, "mail": mail},
    )


async def readiness(app: FastAPI) -> str | None:
    """``None`` when ready to serve; otherwise why not (shutting down, database unreachable or
    not migrated). Shut-down is asked first and costs no I/O: a draining instance must say so
    even when the database no longer answers."""
    if is_draining(app):
        return SHUTTING_DOWN
    settings: Settings = app.state.settings
    timeout = settings.HEALTH_CHECK_TIMEOUT
    try:
        async with asyncio.timeout(timeout):
            current, head = await migration_status(app_services(app).engine)
    except Exception as exc:  # noqa: BLE001
        return f"database unreachable: {_error_text(exc, timeout)}"
    if current != head and not is_newer_schema(current):
        # A newer schema is ready: during a rolling deploy the previous release serves on it.
        return "database not migrated"
    return None
