"""``python test_connections.py`` run as a user runs it: a subprocess configured by environment.

It must pass against the harness's servers, fail (exit 1) against closed ports and silent hosts
within seconds rather than aiokafka's 40 s defaults, and skip what is disabled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from redis import Redis as SyncRedis

from tests.support.servers import SilentServer, free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "test_connections.py"
# Generous: the script's own bound is a few seconds; this only says "it did not hang".
MAX_SECONDS = 15.0
TOPIC = "ums-connection-check"


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def line(self, service: str) -> str:
        for line in self.stdout.splitlines():
            if line.startswith(service):
                return line
        raise AssertionError(f"no {service} line in output:\n{self.stdout}\n{self.stderr}")


def run_script(**variables: str) -> Run:
    """Run the script with only ``variables`` as its Redis/Kafka/database configuration."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("REDIS_", "KAFKA_", "DATABASE_"))
    }
    env.update(variables)
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, str(SCRIPT)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Run(completed.returncode, completed.stdout, completed.stderr, time.monotonic() - started)


def redis_variables(location: tuple[str, int, int]) -> dict[str, str]:
    host, port, db = location
    return {
        "REDIS_ENABLED": "true",
        "REDIS_HOST": host,
        "REDIS_PORT": str(port),
        "REDIS_DB": str(db),
    }


def kafka_variables(bootstrap: str) -> dict[str, str]:
    # tansu has no InitProducerId, so the idempotent producer cannot work against it.
    return {
        "KAFKA_ENABLED": "true",
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_ENABLE_IDEMPOTENCE": "false",
    }


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


def leftover_check_keys(location: tuple[str, int, int]) -> list[str]:
    host, port, db = location
    client = SyncRedis(host=host, port=port, db=db, socket_timeout=5, decode_responses=True)
    try:
        return list(client.scan_iter(match="ums:connection-check:*"))
    finally:
        client.close()


async def check_messages(bootstrap: str) -> list[dict[str, str]]:
    consumer = AIOKafkaConsumer(
        TOPIC,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        request_timeout_ms=5000,
    )
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=5000)
    finally:
        await consumer.stop()
    return [json.loads(record.value) for records in batches.values() for record in records]


async def test_passes_against_live_servers(
    redis_location: tuple[str, int, int], kafka_bootstrap: str
) -> None:
    run = run_script(**redis_variables(redis_location), **kafka_variables(kafka_bootstrap))

    assert run.returncode == 0, run.stdout + run.stderr
    host, port, db = redis_location
    assert re.match(
        rf"Redis\s+OK\s+\({re.escape(host)}:{port}/{db}, [\d.]+ ms\)", run.line("Redis")
    )
    assert re.match(rf"Kafka\s+OK\s+\({re.escape(kafka_bootstrap)}, ", run.line("Kafka"))
    # The temporary key is gone, and the message really reached the broker.
    assert leftover_check_keys(redis_location) == []
    messages = await check_messages(kafka_bootstrap)
    assert any(message.get("check") == "connection" for message in messages), messages


def test_fails_fast_against_closed_ports() -> None:
    run = run_script(
        REDIS_ENABLED="true",
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=str(free_port()),
        **kafka_variables(f"127.0.0.1:{free_port()}"),
    )

    assert run.returncode == 1, run.stdout + run.stderr
    assert re.match(r"Redis\s+FAILED\s+\(127\.0\.0\.1:\d+/0: PING: ", run.line("Redis"))
    assert re.match(r"Kafka\s+FAILED\s+\(127\.0\.0\.1:\d+: cluster metadata: ", run.line("Kafka"))
    assert run.seconds < MAX_SECONDS


def test_silent_kafka_fails_within_bounds(
    redis_location: tuple[str, int, int], silent_server: SilentServer
) -> None:
    run = run_script(
        **redis_variables(redis_location),
        **kafka_variables(f"127.0.0.1:{silent_server.port}"),
    )

    assert run.returncode == 1, run.stdout + run.stderr
    assert re.match(r"Redis\s+OK\s", run.line("Redis"))
    assert "Kafka  FAILED" in run.line("Kafka")
    assert "no answer within" in run.line("Kafka")
    assert run.seconds < MAX_SECONDS


def test_silent_redis_fails_within_bounds(silent_server: SilentServer) -> None:
    run = run_script(
        REDIS_ENABLED="true",
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=str(silent_server.port),
        KAFKA_ENABLED="false",
    )

    assert run.returncode == 1, run.stdout + run.stderr
    assert re.match(r"Redis\s+FAILED\s+\(127\.0\.0\.1:\d+/0: PING: ", run.line("Redis"))
    assert re.match(r"Kafka\s+DISABLED\s", run.line("Kafka"))
    assert run.seconds < MAX_SECONDS


def test_disabled_services_are_skipped_not_failed() -> None:
    # Ports that refuse connections: had the script tried them, it would have failed.
    run = run_script(
        REDIS_ENABLED="false",
        REDIS_PORT=str(free_port()),
        KAFKA_ENABLED="false",
        KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
    )

    assert run.returncode == 0, run.stdout + run.stderr
    assert re.match(r"Redis\s+DISABLED\s", run.line("Redis"))
    assert re.match(r"Kafka\s+DISABLED\s", run.line("Kafka"))


def test_invalid_settings_exit_1_naming_the_variable() -> None:
    run = run_script(REDIS_PORT="not-a-port", KAFKA_ENABLED="false")

    assert run.returncode == 1
    assert "Invalid configuration: REDIS_PORT" in run.stderr
    assert "Traceback" not in run.stderr
