"""Metrics of real processes: several uvicorn workers sharing ``PROMETHEUS_MULTIPROC_DIR`` (one
scrape of any of them counts the requests of all), and the relay run as a process of its own."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from tests.conftest import SettingsFactory
from tests.support.app import eventually, register, running_app
from tests.support.servers import free_port
from tests.test_metrics import parse, value

ROOT = Path(__file__).resolve().parent.parent
LIVE = "/api/v1/health/live"


@pytest.fixture
def process_log(tmp_path: Path) -> Iterator[Path]:
    """Where the service writes; shown when the test fails."""
    path = tmp_path / "service.log"
    yield path
    if path.exists():
        print(path.read_text(errors="replace")[-4000:])


def _requests_in(path: Path) -> float:
    """The requests to ``LIVE`` one process's counter file holds."""
    merged = MultiProcessCollector.merge([str(path)], accumulate=False)  # type: ignore[no-untyped-call]
    return sum(
        float(sample.value)
        for family in merged
        for sample in family.samples
        if sample.name == "ums_http_requests_total" and sample.labels.get("route") == LIVE
    )


def _env(database_url: str, jwt_key_file: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    """A process's environment: the test database, no Redis, metrics open."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "REDIS_", "FIRST_"))}
    env.update(
        ENVIRONMENT="test",
        DATABASE_URL=database_url,
        DATA_DIR=str(data_dir),
        JWT_PRIVATE_KEY_FILE=str(jwt_key_file),
        # One key for every process (each would otherwise make its own on first start).
        ENCRYPTION_KEY=base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("="),
        REDIS_ENABLED="false",
        METRICS="open",
        LOG_LEVEL="INFO",
        **extra,
    )
    return env


async def test_two_workers_are_summed_in_one_scrape(
    database_url: str, jwt_key_file: Path, tmp_path: Path, process_log: Path
) -> None:
    shared = tmp_path / "metrics"
    shared.mkdir()
    port = free_port()
    env = _env(
        database_url,
        jwt_key_file,
        tmp_path / "data",
        KAFKA_ENABLED="false",
        WEB_CONCURRENCY="2",
        PROMETHEUS_MULTIPROC_DIR=str(shared),
    )
    command = [
        sys.executable, "-m", "uvicorn", "src.main:app", "--host", "127.0.0.1",
        "--port", str(port), "--workers", "2", "--no-access-log",
    ]  # fmt: skip
    with process_log.open("ab") as log:
        service = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        # A fresh connection per request: the kernel hands each to whichever process accepts.
        async def get(path: str) -> httpx.Response:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                return await c.get(path)

        async def both_started() -> bool:
            try:
                await get(LIVE)
            except httpx.TransportError:
                assert service.poll() is None, "the service exited"
                return False
            return len(list(shared.glob("counter_*.db"))) == 2

        sent = 0

        async def both_served() -> bool:
            nonlocal sent
            for _ in range(10):
                assert (await get(LIVE)).status_code == 200
            sent += 10
            files = list(shared.glob("counter_*.db"))
            return len(files) == 2 and all(_requests_in(path) > 0 for path in files)

        await eventually(both_started, timeout=60, interval=0.2)
        await eventually(both_served, timeout=60, interval=0)
        in_files = sum(_requests_in(path) for path in shared.glob("counter_*.db"))

        scrape = await get("/metrics")
        assert scrape.status_code == 200
        samples = parse(scrape.text)
        counted = value(samples, "ums_http_requests_total", method="GET", route=LIVE, status="200")
        # Every request of both processes in one scrape (those of both_started included).
        assert counted == in_files >= sent
        # Read from the database once for the scrape, not once per process.
        pending = [key for key in samples if key[0] == "ums_outbox_pending_events"]
        assert len(pending) == 1
    finally:
        service.send_signal(signal.SIGTERM)
        await asyncio.to_thread(service.wait, 30)
    # Each process took its live gauges out as it stopped; the counters stay.
    assert not list(shared.glob("gauge_live*.db"))
    assert len(list(shared.glob("counter_*.db"))) == 2


async def test_the_relay_run_apart_serves_its_own_metrics(
    make_settings: SettingsFactory,
    kafka_bootstrap: str,
    database_url: str,
    jwt_key_file: Path,
    tmp_path: Path,
    process_log: Path,
) -> None:
    # An app with Kafka disabled runs no relay: what it records waits in the outbox.
    async with running_app(make_settings(KAFKA_ENABLED=False)) as (_, client):
        await register(client)  # user.registered and user.verification_requested
    port = free_port()
    env = _env(
        database_url,
        jwt_key_file,
        tmp_path / "data",
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        KAFKA_ENABLE_IDEMPOTENCE="false",
        OUTBOX_POLL_INTERVAL="0.2",
        METRICS_PORT=str(port),
    )
    with process_log.open("ab") as log:
        relay = subprocess.Popen(
            [sys.executable, "-m", "src.events.relay"], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as side:

            async def published() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
                assert relay.poll() is None, "the relay exited"
                try:
                    samples = parse((await side.get("/metrics")).text)
                except httpx.TransportError:
                    return None
                done = value(samples, "ums_relay_published_events_total") >= 2
                return samples if done else None

            samples = await eventually(published, timeout=30, interval=0.2)
        assert value(samples, "ums_relay_publish_latency_seconds_count") >= 2
        assert value(samples, "ums_outbox_backlog_query_success") == 1
    finally:
        relay.terminate()
        returncode = await asyncio.to_thread(relay.wait, 15)
    assert returncode == 0, "SIGTERM should stop the relay cleanly"
