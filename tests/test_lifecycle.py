"""Start-up and shut-down against real servers: absent, silent and late dependencies, a database
that is down or not migrated, and the real ``uvicorn`` process (launch time, SIGTERM, bad config).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from src.app.container import app_services
from src.config.events import StartupError
from src.config.settings import Settings
from src.services.connections import connections_of, get_kafka_from_app, get_redis_from_app
from tests.conftest import SettingsFactory
from tests.support.app import (
    BOUND,
    OPERATOR,
    assert_no_leftover_tasks,
    bounded_app,
    eventually,
    running_app,
)
from tests.support.servers import KafkaBroker, RedisServer, SilentServer, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
HEALTH = "/api/v1/health"


def _warnings(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("src") and r.levelno == logging.WARNING and word in r.getMessage()
    ]


async def _health(client: httpx.AsyncClient, status: str | None = None) -> dict[str, object]:
    """The detailed report once the database check (and, given ``status``, every check) has
    answered in time: each is cut off under a second, which a busy CI machine sometimes misses;
    that is not what these tests test."""

    async def report() -> dict[str, object] | None:
        response = await client.get(HEALTH, headers=OPERATOR)
        body: dict[str, object] = response.json()
        if response.status_code != 200 or (status is not None and body["status"] != status):
            return None
        return body

    found: dict[str, object] = await eventually(report, timeout=10, interval=0.2)
    return found


def _check_statuses(body: dict[str, object]) -> dict[str, str]:
    checks = body["checks"]
    assert isinstance(checks, dict)
    return {name: check["status"] for name, check in checks.items()}


# --- start-up without Redis and Kafka -----------------------------------------------------------


async def test_starts_fast_and_degraded_when_redis_and_kafka_are_absent(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    settings = make_settings(
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=free_port(),
        REDIS_PASSWORD=secret,
        KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
    )
    caplog.set_level(logging.INFO)
    before = asyncio.all_tasks()
    async with bounded_app(settings) as (app, client):
        assert (
            connections_of(app).redis_available is False
            and connections_of(app).kafka_available is False
        )
        assert get_redis_from_app(app) is None and get_kafka_from_app(app) is None

        body = await _health(client)
        assert body["status"] == "degraded"
        checks = body["checks"]
        assert isinstance(checks, dict)
        assert checks["database"]["status"] == "healthy"
        for name in ("redis", "kafka"):
            assert checks[name]["status"] == "unhealthy", checks[name]
            assert checks[name]["error"], checks[name]
            single = await client.get(f"{HEALTH}/{name}", headers=OPERATOR)
            assert single.status_code == 503, single.text
            assert single.json()["status"] == "unhealthy" and single.json()["error"]
        ready = await client.get(f"{HEALTH}/ready")
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
        assert (await client.get(f"{HEALTH}/live")).status_code == 200

        # Several supervisor rounds fail meanwhile (however many a loaded machine manages, the
        # count below holds): a long outage is still one warning each.
        await asyncio.sleep(1.0)
        assert len(_warnings(caplog, "Redis")) == 1, _warnings(caplog, "Redis")
        assert len(_warnings(caplog, "Kafka")) == 1, _warnings(caplog, "Kafka")
        assert secret not in repr(body)
    assert secret not in caplog.text
    assert "Shut-down complete" in caplog.text
    await assert_no_leftover_tasks(before)


async def test_silent_hosts_do_not_stall_start_up_or_shut_down(
    make_settings: SettingsFactory,
) -> None:
    """Hosts that accept TCP and never answer, with the DEFAULT timeouts (no overrides)."""
    redis_host, kafka_host = SilentServer(), SilentServer()
    try:
        settings = make_settings(
            REDIS_HOST="127.0.0.1",
            REDIS_PORT=redis_host.port,
            KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{kafka_host.port}",
        )
        defaults = Settings.model_fields
        for name in ("REDIS_CONNECT_TIMEOUT", "REDIS_SOCKET_TIMEOUT", "KAFKA_CONNECT_TIMEOUT"):
            assert getattr(settings, name) == defaults[name].default, name
        before = asyncio.all_tasks()
        async with bounded_app(settings) as (app, client):
            assert (
                connections_of(app).redis_available is False
                and connections_of(app).kafka_available is False
            )
            # Each live check is cut off at HEALTH_CHECK_TIMEOUT (< 1 s); redis-py's own timeouts
            # and retries against a silent host would take 16 s or more.
            async with asyncio.timeout(10):
                body = await _health(client)
            assert body["status"] == "degraded"
            statuses = _check_statuses(body)
            assert statuses == {
                "database": "healthy",
                "redis": "unhealthy",
                "kafka": "unhealthy",
                "mail": "disabled",
            }
            # Let the supervisor be mid-attempt against the silent hosts at shut-down (any
            # moment will do: shut-down must end within its bound whatever they are doing).
            await asyncio.sleep(0.7)
        await assert_no_leftover_tasks(before)
    finally:
        redis_host.close()
        kafka_host.close()


# --- late arrival ---------------------------------------------------------------------------------


async def test_dependencies_arriving_late_are_picked_up_without_restart(
    make_settings: SettingsFactory, redis_process: RedisServer, kafka_process: KafkaBroker
) -> None:
    redis_process.stop()
    kafka_process.stop()
    settings = make_settings(
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=redis_process.port,
        REDIS_DB=0,
        KAFKA_BOOTSTRAP_SERVERS=kafka_process.bootstrap,
    )
    async with running_app(settings) as (app, client):
        assert (await _health(client))["status"] == "degraded"
        assert get_redis_from_app(app) is None and get_kafka_from_app(app) is None

        await asyncio.to_thread(redis_process.start)
        await asyncio.to_thread(kafka_process.start)

        await _health(client, "healthy")
        await eventually(lambda: get_redis_from_app(app) is not None, timeout=5)
        await eventually(lambda: get_kafka_from_app(app) is not None, timeout=5)
        redis = get_redis_from_app(app)
        kafka = get_kafka_from_app(app)
        assert redis is connections_of(app).redis and kafka is connections_of(app).kafka
        assert redis is not None and kafka is not None
        await redis.set("lifecycle:late", "yes")
        assert await redis.get("lifecycle:late") == "yes"
        metadata = await kafka.send("lifecycle-late", {"arrived": True}, key="k", timeout=10)
        assert metadata.offset >= 0


# --- disabled dependencies -----------------------------------------------------------------------


def _supervisor_tasks(app: FastAPI) -> list[asyncio.Task[None]]:
    return [t for t in app_services(app).tasks if t.get_name().startswith("supervisor:")]


@pytest.mark.parametrize(
    ("redis_enabled", "kafka_enabled", "watched"),
    [
        (False, False, set()),
        (False, True, {"supervisor:kafka"}),
        (True, False, {"supervisor:redis"}),
    ],
)
async def test_disabled_dependencies_get_no_watcher(
    make_settings: SettingsFactory,
    redis_enabled: bool,
    kafka_enabled: bool,
    watched: set[str],
) -> None:
    settings = make_settings(REDIS_ENABLED=redis_enabled, KAFKA_ENABLED=kafka_enabled)
    async with running_app(settings) as (app, client):
        tasks = _supervisor_tasks(app)
        assert {t.get_name() for t in tasks} == watched
        body = await _health(client, "healthy")
        statuses = _check_statuses(body)
        assert statuses["redis"] == ("healthy" if redis_enabled else "disabled")
        assert statuses["kafka"] == ("healthy" if kafka_enabled else "disabled")
        assert (get_redis_from_app(app) is None) is not redis_enabled
        assert (get_kafka_from_app(app) is None) is not kafka_enabled
    # Shut-down cancels the watchers; none outlives the app.
    assert all(t.done() for t in tasks)
    assert connections_of(app).redis is None and connections_of(app).kafka is None


# --- the database ---------------------------------------------------------------------------------


def _startup_error(exc: BaseException) -> StartupError | None:
    """The ``StartupError`` inside whatever the lifespan machinery wrapped it in."""
    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_error(inner)
            if found is not None:
                return found
    cause = exc.__cause__ or exc.__context__
    return _startup_error(cause) if cause is not None else None


async def _expect_startup_failure(settings: Settings, bound: float) -> StartupError:
    """Start-up fails with a StartupError, within ``bound`` (a hang would fail the test)."""
    before = asyncio.all_tasks()
    try:
        async with asyncio.timeout(bound), running_app(settings):
            pass
    except BaseException as exc:  # noqa: BLE001 - inspected below
        error = _startup_error(exc)
        assert error is not None, repr(exc)
        # A failed start-up closes whatever it had opened.
        await assert_no_leftover_tasks(before)
        return error
    raise AssertionError("start-up succeeded but should have failed")


async def test_unreachable_database_fails_start_up_quickly(
    make_settings: SettingsFactory,
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    url = f"postgresql+asyncpg://ums:{password}@127.0.0.1:{free_port()}/ums"
    error = await _expect_startup_failure(make_settings(DATABASE_URL=url), bound=BOUND)
    assert "database unreachable" in str(error) and "ConnectionRefusedError" in str(error)
    # The message names where it looked (to be fixable) but never the password.
    assert "127.0.0.1" in str(error)
    assert password not in str(error)


async def test_silent_database_fails_start_up_within_its_timeout(
    make_settings: SettingsFactory,
) -> None:
    silent = SilentServer()
    try:
        url = f"postgresql+asyncpg://ums:pw@127.0.0.1:{silent.port}/ums"
        settings = make_settings(DATABASE_URL=url, DATABASE_CONNECT_TIMEOUT=0.5)
        error = await _expect_startup_failure(settings, bound=BOUND)
        assert "database unreachable" in str(error) and "timed out" in str(error)
    finally:
        silent.close()


async def test_unmigrated_sqlite_database_fails_start_up(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    error = await _expect_startup_failure(make_settings(DATABASE_URL=url), bound=BOUND)
    assert "not migrated" in str(error)


async def test_unmigrated_postgres_database_fails_start_up(
    make_settings: SettingsFactory, empty_database: str
) -> None:
    error = await _expect_startup_failure(make_settings(DATABASE_URL=empty_database), BOUND)
    assert "not migrated" in str(error)
    assert "alembic upgrade head" in str(error)


# --- the real process ----------------------------------------------------------------------------


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Only what the service needs: no TEST_* variables and none of the caller's settings."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
        "DATA_DIR": str(tmp_path / "data"),
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(free_port()),
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
    }
    env.update(extra)
    return env


def _migrate(env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def _wait_for_live(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll until ``/health/live`` answers 200 (how soon is measured by ``make bench``)."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}{HEALTH}/live"
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the service exited with {process.returncode}"
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"/health/live did not answer within {timeout}s")


def test_process_serves_without_redis_and_kafka_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    env = _clean_env(tmp_path)
    _migrate(env)
    port = free_port()
    log_path = tmp_path / "service.log"
    # Run from a scratch directory so a developer's .env cannot change the defaults under test.
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "src.main:app", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for_live(port, process, timeout=60)
            body = httpx.get(f"http://127.0.0.1:{port}{HEALTH}", timeout=5).json()
            assert body["status"] == "degraded", body

            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = log_path.read_text()
    # uvicorn shuts down gracefully, then re-raises the signal it caught (as servers should), so
    # a clean stop is "terminated by SIGTERM"; anything else (a crash, a kill) fails here.
    assert returncode in (0, -signal.SIGTERM), f"{returncode}\n{output}"
    assert "Start-up complete" in output, output
    assert "Shut-down complete" in output, output
    assert "Traceback" not in output, output


def test_invalid_setting_stops_the_process_with_one_line_naming_it(tmp_path: Path) -> None:
    env = _clean_env(tmp_path, REDIS_PORT="abc")
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "src.main:app", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "REDIS_PORT" in line]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
