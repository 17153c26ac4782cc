"""Check that this service can reach Redis and Kafka with its own settings.

    python test_connections.py [--timeout SECONDS] [--verbose]

Settings come from the environment and ``.env``, exactly as the service reads them, and the
connections are built by the service's own code, so a pass here means the service would connect
too. Redis gets a PING and a SET/GET/TTL/DEL of a temporary key; Kafka gets a metadata request
and one message sent to a scratch topic. One line per service, then exit 0 only when every enabled
service passed. Every network wait is bounded: a host that never answers costs seconds, not the
40 s of aiokafka's defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from src.config.settings import Settings, load_settings
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

    def line(self) -> str:
        return f"{self.service:<6} {self.status.value:<8} ({self.detail})"


class StepFailed(Exception):
    """A check answered, but not what it should have."""


def _reason(exc: BaseException, timeout: float) -> str:
    # Client errors name hosts and ports, never credentials, so they are safe to print.
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    return str(exc) or type(exc).__name__


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


async def run_checks(settings: Settings, timeout: float) -> list[Result]:
    # Concurrently, so the worst case is the slowest service rather than the sum.
    return list(
        await asyncio.gather(check_redis(settings, timeout), check_kafka(settings, timeout))
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds each network step may take (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--verbose", action="store_true", help="show the client libraries' logs")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # The clients retry loudly while a host is down; the summary line already says so.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL)
    settings = load_settings()  # raises SettingsError (exit 1, one line per bad variable)
    started = time.perf_counter()
    results = asyncio.run(run_checks(settings, args.timeout))
    for result in results:
        print(result.line())
    failed = [r.service for r in results if r.status is Status.FAILED]
    elapsed = time.perf_counter() - started
    if failed:
        print(f"FAILED: {', '.join(failed)} ({elapsed:.1f} s)")
        return 1
    print(f"All enabled services OK ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
