"""Events across real processes: a service killed between commit and publish, the standalone
relay command, and the example consumer another service would start from."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from src.app.container import app_services
from src.events.outbox import EventType, record_event
from tests.conftest import SettingsFactory
from tests.support.app import eventually, register, running_app
from tests.support.events import (
    FAST_GROUP_JOIN,
    NOTIFICATIONS,
    USER_EVENTS,
    audit_counts,
    of_types,
    outbox_rows,
    subjects,
    wait_for_records,
)
from tests.support.servers import KafkaBroker, free_port

ROOT = Path(__file__).resolve().parent.parent


def _service_env(
    database_url: str, bootstrap: str, jwt_key_file: Path, data_dir: Path
) -> dict[str, str]:
    """The environment of a service process: the test database, a given broker, no Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "REDIS_", "FIRST_"))}
    env.update(
        ENVIRONMENT="test",
        DATABASE_URL=database_url,
        DATA_DIR=str(data_dir),
        JWT_PRIVATE_KEY_FILE=str(jwt_key_file),
        REDIS_ENABLED="false",
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        KAFKA_ENABLE_IDEMPOTENCE="false",
        SUPERVISOR_INTERVAL="0.3",
        RECONNECT_BACKOFF_INITIAL="0.2",
        RECONNECT_BACKOFF_MAX="1",
        OUTBOX_POLL_INTERVAL="0.2",
        LOG_LEVEL="INFO",
    )
    return env


@pytest.fixture
def process_log(tmp_path: Path) -> Iterator[Path]:
    """Where a child process writes; shown when the test fails."""
    path = tmp_path / "process.log"
    yield path
    if path.exists():
        print(path.read_text(errors="replace")[-3000:])


# --- 5. killed between commit and publish ---------------------------------------------------------


async def test_a_service_killed_before_publishing_loses_nothing(
    make_settings: SettingsFactory,
    kafka_process: KafkaBroker,
    database_url: str,
    jwt_key_file: Path,
    tmp_path: Path,
    process_log: Path,
) -> None:
    await asyncio.to_thread(kafka_process.stop)
    port = free_port()
    env = _service_env(database_url, kafka_process.bootstrap, jwt_key_file, tmp_path / "data")
    command = [sys.executable, "-m", "uvicorn", "src.main:app", "--host", "127.0.0.1"]
    with process_log.open("ab") as log:
        service = subprocess.Popen(
            [*command, "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def live() -> bool:
                try:
                    return (await client.get("/api/v1/health/live")).status_code == 200
                except httpx.TransportError:
                    assert service.poll() is None, "the service exited"
                    return False

            await eventually(live, timeout=30, interval=0.2)
            user = await register(client)
        rows = await outbox_rows(database_url, [user["id"]])
        assert "user.registered" in {row.type for row in rows}
        assert all(row.published_at is None for row in rows)  # committed, not yet published
    finally:
        service.send_signal(signal.SIGKILL)
        service.wait(timeout=10)
    assert service.returncode == -signal.SIGKILL

    await asyncio.to_thread(kafka_process.start)
    settings = make_settings(
        KAFKA_BOOTSTRAP_SERVERS=kafka_process.bootstrap, OUTBOX_POLL_INTERVAL=0.2, **FAST_GROUP_JOIN
    )
    async with running_app(settings):
        records = await wait_for_records(
            kafka_process.bootstrap,
            USER_EVENTS,
            lambda recs: user["id"] in subjects(recs, "user.registered"),
        )
        registered = next(row for row in rows if row.type == "user.registered")
        assert registered.id in {r.event_id for r in records}

        async def audited() -> bool:
            return (await audit_counts(database_url, [user["id"]])).get(registered.id) == 1

        await eventually(audited, timeout=30, interval=0.3)


# --- 6. the relay as a process of its own ---------------------------------------------------------


async def test_the_standalone_relay_publishes_pending_rows(
    make_settings: SettingsFactory,
    kafka_process: KafkaBroker,
    database_url: str,
    jwt_key_file: Path,
    tmp_path: Path,
    process_log: Path,
) -> None:
    # An app with Kafka disabled runs no relay: what it records stays in the outbox.
    async with running_app(make_settings(KAFKA_ENABLED=False)) as (_, client):
        user = await register(client)
    rows = await outbox_rows(database_url, [user["id"]])
    assert {row.type for row in rows} == {"user.registered", "user.verification_requested"}
    assert all(row.published_at is None for row in rows)

    env = _service_env(database_url, kafka_process.bootstrap, jwt_key_file, tmp_path / "data")
    with process_log.open("ab") as log:
        relay = subprocess.Popen(
            [sys.executable, "-m", "src.events.relay"], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    try:

        async def published() -> bool:
            assert relay.poll() is None, "the relay exited"
            current = await outbox_rows(database_url, [user["id"]])
            return all(row.published_at is not None for row in current)

        await eventually(published, timeout=30, interval=0.2)
        by_type = {row.type: row.id for row in rows}
        events = await wait_for_records(
            kafka_process.bootstrap,
            USER_EVENTS,
            lambda r: user["id"] in subjects(r, "user.registered"),
        )
        notices = await wait_for_records(
            kafka_process.bootstrap,
            NOTIFICATIONS,
            lambda r: user["id"] in subjects(r, "user.verification_requested"),
        )
        assert by_type["user.registered"] in {r.event_id for r in events}
        assert by_type["user.verification_requested"] in {r.event_id for r in notices}
    finally:
        relay.terminate()
        returncode = await asyncio.to_thread(relay.wait, 15)
    assert returncode == 0, "SIGTERM should stop the relay cleanly"
    assert "outbox relay stopped" in process_log.read_text()


# --- the example consumer -------------------------------------------------------------------------


async def test_the_example_consumer_prints_each_event_once(
    make_settings: SettingsFactory, kafka_process: KafkaBroker
) -> None:
    bootstrap = kafka_process.bootstrap
    settings = make_settings(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap, OUTBOX_POLL_INTERVAL=0.2, AUDIT_CONSUMER_ENABLED=False
    )
    async with running_app(settings) as (app, client):
        user = await register(client)
        records = await wait_for_records(
            bootstrap, USER_EVENTS, lambda recs: user["id"] in subjects(recs, "user.registered")
        )
        registered = next(
            r for r in of_types(records, "user.registered") if r.event["subject"] == user["id"]
        )
        # A redelivery: the same message again. Then a later event of the same user (same key,
        # same partition): once the example prints that one, it has read both copies.
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            await producer.send_and_wait(USER_EVENTS, registered.value, key=registered.key)
        finally:
            await producer.stop()
        async with app_services(app).sessionmaker() as db:
            record_event(db, settings, EventType.UPDATED, uuid.UUID(user["id"]), {"n": 1})
            await db.commit()
        await wait_for_records(
            bootstrap, USER_EVENTS, lambda recs: user["id"] in subjects(recs, "user.updated")
        )

    example = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "consume_user_events.py"),
        "--bootstrap-servers", bootstrap,
        "--group-id", f"example-{uuid.uuid4().hex[:8]}",
        "--max-seconds", "60",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert example.stdout is not None and example.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not any(line.startswith("user.updated") and user["id"] in line for line in lines):
                line = (await example.stdout.readline()).decode()
                assert line, "the example exited early"
                lines.append(line)
        example.send_signal(signal.SIGINT)  # Ctrl-C
        returncode = await asyncio.wait_for(example.wait(), 15)
    finally:
        if example.returncode is None:
            example.kill()
            await example.wait()
    lines += (await example.stdout.read()).decode().splitlines()
    stderr = (await example.stderr.read()).decode()
    assert returncode == 0, stderr
    mine = [line.split()[0] for line in lines if f"subject={user['id']}" in line]
    assert mine == ["user.registered", "user.updated"]  # the redelivered copy was dropped
    assert f"duplicate of event {registered.event_id} ignored" in stderr
    assert "stopped after" in stderr
