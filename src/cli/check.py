"""``user-service check``: can this service reach its database, Redis and Kafka with its settings?

The connections are built by the service's own code from the same settings (environment and
``.env``), so a pass here means the service would connect too. The database gets ``SELECT 1`` and
its migration status; Redis a PING and a SET/GET/TTL/DEL of a temporary key; Kafka a metadata
request and one message sent to a scratch topic. One line per service, then exit 0 only when
every enabled service passed. Every network wait is bounded: a host that never answers costs
seconds, not the 40 s of aiokafka's defaults. ``test_connections.py`` (Redis and Kafka only) runs
the same checks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from src.config.settings import Settings, load_settings
from src.db.session import check_database, create_engine, describe, migration_status
from src.services.kafka.manager import KafkaManager
from src.services.redis_client import create_redis_client, ping

KAFKA_CHECK_TOPIC = "ums-connection-check"
REDIS_KEY_PREFIX = "ums:connection-check:"
REDIS_KEY_TTL_SECONDS = 60
DEFAULT_TIMEOUT = 5.0


class Status(StrEnum):
    OK = "OK"
    FAILED = "FAILED"
    DISABLED = "DISABLED"


@dataclass(frozen=True)
class Result:
    service: str
    status: Status
    detail: str

    def line(self, width: int = 6) -> str:
        return f"{self.service:<{width}} {self.status.value:<8} ({self.detail})"


class StepFailed(Exception):
    """A check answered, but not what it should have."""


def _reason(exc: BaseException, timeout: float) -> str:
    # Client errors name hosts and ports, never credentials, so they are safe to print.
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    return str(exc) or type(exc).__name__


async def check_database_status(settings: Settings, timeout: float) -> Result:
    """``SELECT 1``, then whether the schema is at the migrations' head (the service refuses to
    start otherwise)."""
    engine = create_engine(settings)
    where = engine.url.render_as_string(hide_password=True)
    try:
        step = "SELECT 1"
        # Connecting is bounded by DATABASE_CONNECT_TIMEOUT, as in the service.
        latency = await check_database(engine, settings.DATABASE_CONNECT_TIMEOUT + timeout)
        step = "migration status"
        async with asyncio.timeout(timeout):
            current, head = await migration_status(engine)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a FAILED line
        reason = _reason(exc, timeout) if isinstance(exc, TimeoutError) else describe(exc)
        return Result("Database", Status.FAILED, f"{where}: {step}: {reason}")
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(engine.dispose(), timeout)
    if current != head:
        at = ", ".join(sorted(current)) or "nothing"
        detail = f"{where}: not migrated: at {at}, head is {', '.join(sorted(head))}"
        return Result("Database", Status.FAILED, f"{detail}; run `user-service migrate`")
    revision = ", ".join(sorted(head))
    return Result("Database", Status.OK, f"{where}, {latency:.1f} ms, at head {revision}")


async def check_redis(settings: Settings, timeout: float) -> Result:
    where = f"{settings.REDIS_HOST}:{settings.REDIS_PORT}/{settings.REDIS_DB}"
    if not settings.REDIS_ENABLED:
        return Result("Redis", Status.DISABLED, "REDIS_ENABLED=false")
    client = create_redis_client(settings)
    key = f"{REDIS_KEY_PREFIX}{uuid.uuid4().hex}"
    try:
        step = "PING"
        latency = await ping(client, timeout)
        async with asyncio.timeout(timeout):
            step = "SET"
            await client.set(key, "ok", ex=REDIS_KEY_TTL_SECONDS)
            step = "GET"
            if (value := await client.get(key)) != "ok":
                raise StepFailed(f"read back {value!r} instead of 'ok'")
            step = "TTL"
            if not 0 < (ttl := await client.ttl(key)) <= REDIS_KEY_TTL_SECONDS:
                raise StepFailed(f"TTL is {ttl}, expected 1..{REDIS_KEY_TTL_SECONDS}")
            step = "DEL"
            if (deleted := await client.delete(key)) != 1:
                raise StepFailed(f"deleted {deleted} keys instead of 1")
    except Exception as exc:  # noqa: BLE001 - every failure becomes a FAILED line
        return Result("Redis", Status.FAILED, f"{where}: {step}: {_reason(exc, timeout)}")
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.aclose(), timeout)
    return Result("Redis", Status.OK, f"{where}, {latency:.1f} ms")


async def check_kafka(settings: Settings, timeout: float) -> Result:
    where = settings.KAFKA_BOOTSTRAP_SERVERS
    if not settings.KAFKA_ENABLED:
        return Result("Kafka", Status.DISABLED, "KAFKA_ENABLED=false")
    manager = KafkaManager(settings)
    try:
        step = "cluster metadata"
        latency = await manager.check_cluster(timeout)
        # start() is bounded by KAFKA_CONNECT_TIMEOUT, the same bound the service runs with, and
        # stops a producer whose start failed; the outer bound is only a safety net.
        step = "producer start"
        async with asyncio.timeout(settings.KAFKA_CONNECT_TIMEOUT + timeout):
            await manager.start()
        step = f"send to {KAFKA_CHECK_TOPIC}"
        message = {"check": "connection", "at": datetime.now(UTC)}
        await manager.send(KAFKA_CHECK_TOPIC, message, key=uuid.uuid4().hex, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a FAILED line
        return Result("Kafka", Status.FAILED, f"{where}: {step}: {_reason(exc, timeout)}")
    finally:
        # stop() bounds each close itself; this only caps the total.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(manager.stop(), settings.KAFKA_CONNECT_TIMEOUT * 3 + timeout)
    return Result("Kafka", Status.OK, f"{where}, {latency:.1f} ms, sent to {KAFKA_CHECK_TOPIC}")


async def run_checks(settings: Settings, timeout: float, *, database: bool = False) -> list[Result]:
    """Redis and Kafka (and the database first, when asked), concurrently: the worst case is the
    slowest service rather than the sum."""
    checks = [check_redis(settings, timeout), check_kafka(settings, timeout)]
    if database:
        checks.insert(0, check_database_status(settings, timeout))
    return list(await asyncio.gather(*checks))


def report(results: list[Result], started: float, width: int = 6) -> int:
    """Print one line per service and the summary; the exit code: 0 when none failed."""
    for result in results:
        print(result.line(width))
    failed = [r.service for r in results if r.status is Status.FAILED]
    elapsed = time.perf_counter() - started
    if failed:
        print(f"FAILED: {', '.join(failed)} ({elapsed:.1f} s)")
        return 1
    print(f"All enabled services OK ({elapsed:.1f} s)")
    return 0


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "check",
        help="check the database, Redis and Kafka with the service's settings",
        description="Check that the service can reach the database (SELECT 1, migrated to "
        "head), Redis (PING, SET/GET/TTL/DEL of a temporary key) and Kafka (cluster metadata, "
        "one message to the ums-connection-check topic) with its own settings. One line per "
        "service: OK, FAILED (with the step and the reason) or DISABLED (REDIS_ENABLED or "
        "KAFKA_ENABLED is false).",
        epilog="Exit codes: 0 every enabled service passed, 1 one failed, 2 bad usage or "
        "settings. See docs/cli.md.",
    )
    parser.add_argument(
        "--timeout",
        type=positive,
        default=DEFAULT_TIMEOUT,
        help=f"seconds each network step may take (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--verbose", action="store_true", help="show the client libraries' logs")
    parser.set_defaults(run=check_command)


async def check_command(args: argparse.Namespace) -> int:
    # The clients retry loudly while a host is down; the summary line already says so.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL)
    settings = load_settings()
    started = time.perf_counter()
    results = await run_checks(settings, args.timeout, database=True)
    return report(results, started, width=8)
