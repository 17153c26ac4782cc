"""Overload: the excess is refused at once, the admitted keep going, the logs stay readable, and a
busy event loop is not mistaken for a lost Redis or Kafka."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from src.app.container import app_services
from src.config.logging import RepeatFilter, _UTCFormatter, audit_line
from src.config.settings import Settings
from src.services import supervisor
from src.services.connections import Connections
from src.services.supervisor import INCONCLUSIVE_LIMIT, LoopLag
from tests.support.app import bearer, eventually, login, register, running_app
from tests.support.auth import QUICK_SETTINGS, assert_unauthenticated

ME = "/api/v1/users/me"


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**QUICK_SETTINGS, **overrides})

    return factory


# --- requests beyond the cap -------------------------------------------------------------------


async def test_beyond_the_cap_a_request_gets_an_immediate_503_and_probes_still_answer(
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running_app(make_settings(MAX_REQUESTS_IN_FLIGHT=1)) as (app, client):
        user = await register(client)
        auth = bearer(await login(client, user["email"]))
        # The one place is taken by a request whose cache read is held back (the rest is real).
        cache = app_services(app).security.cache
        release = asyncio.Event()
        real_read = cache.get_auth

        async def held_read(*args: Any) -> Any:
            await release.wait()
            return await real_read(*args)

        monkeypatch.setattr(cache, "get_auth", held_read)
        held = asyncio.ensure_future(client.get(ME, headers=auth))
        await eventually(lambda: app.state.load.in_flight == 1)

        with caplog.at_level(logging.WARNING, logger="src.api.middleware"):
            refused = [await client.get(ME, headers=auth) for _ in range(3)]
        for reply in refused:
            assert reply.status_code == 503
            assert reply.headers["retry-after"] == "1"
            assert reply.headers["content-type"] == "application/problem+json"
            assert reply.headers["x-content-type-options"] == "nosniff"
            assert reply.headers["cache-control"] == "no-store"
            assert reply.json()["status"] == 503
        assert app.state.load.refused == 3
        overload_lines = [r for r in caplog.records if "Overloaded" in r.getMessage()]
        assert len(overload_lines) == 1  # one line for the three, with the count

        # Health probes are never refused: a busy process is alive.
        assert (await client.get("/api/v1/health/live")).status_code == 200

        release.set()
        assert (await held).status_code == 200
        assert app.state.load.in_flight == 0
        assert (await client.get(ME, headers=auth)).status_code == 200


async def test_a_body_still_on_its_way_takes_no_place(
    make_settings: Callable[..., Settings],
) -> None:
    """Slow bodies (a slowloris) hold their own connections, not everyone's places."""
    async with running_app(make_settings(MAX_REQUESTS_IN_FLIGHT=1)) as (app, client):
        user = await register(client)
        auth = bearer(await login(client, user["email"]))
        releases = [asyncio.Event() for _ in range(3)]

        async def slow_body(release: asyncio.Event) -> AsyncIterator[bytes]:
            yield b'{"email": '
            await release.wait()
            yield b'"nobody@example.com"}'

        dribbling = [
            asyncio.ensure_future(
                client.post(
                    "/api/v1/auth/password-reset/request",
                    content=slow_body(release),
                    headers={"Content-Type": "application/json"},
                )
            )
            for release in releases
        ]
        await asyncio.sleep(0)
        assert (await client.get(ME, headers=auth)).status_code == 200
        assert app.state.load.in_flight == 0 and app.state.load.refused == 0
        for release, request in zip(releases, dribbling, strict=True):
            release.set()  # each one, once its body is in, is served like any other
            assert (await request).status_code == 202


async def test_without_a_cap_nothing_is_refused(make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings(MAX_REQUESTS_IN_FLIGHT=0)) as (app, client):
        replies = await asyncio.gather(*(client.get(ME) for _ in range(20)))
        for reply in replies:
            assert_unauthenticated(reply)
        assert app.state.load.refused == 0


# --- repeated log lines ------------------------------------------------------------------------


def _record(message: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("src.test", level, __file__, 1, message, args, None)


def test_a_repeated_warning_is_written_once_per_interval_with_a_count() -> None:
    now = [0.0]
    repeats = RepeatFilter(10.0, clock=lambda: now[0])
    template = "Database unavailable while serving %s: %s"
    assert repeats.filter(_record(template, "/a", "OperationalError"))
    for path in ("/b", "/c", "/d", "/e"):
        assert not repeats.filter(_record(template, path, "OperationalError"))
    # Another message, and anything below WARNING, are not held back by it.
    assert repeats.filter(_record("Something else went wrong"))
    assert repeats.filter(_record(template, "/f", "x", level=logging.INFO))
    now[0] = 10.0
    later = _record(template, "/g", "OperationalError")
    assert repeats.filter(later)
    line = _UTCFormatter("%(message)s").format(later)
    assert line.endswith("[4 more like this left out]")
    assert later.getMessage() == "Database unavailable while serving /g: OperationalError"


def test_the_audit_trail_is_never_thinned() -> None:
    """An attacker's own refused sign-in must not hide the next victim's line (each is the same
    message from the same place: only its fields differ)."""
    repeats = RepeatFilter(10.0, clock=lambda: 0.0)
    kept: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record)

    audit = logging.getLogger("src.auth.audit")
    handler = Keep(logging.WARNING)
    handler.addFilter(repeats)
    audit.addHandler(handler)
    try:
        for user in ("attacker", "victim-1", "victim-2"):
            audit_line(
                audit,
                "password check refused",
                level=logging.WARNING,
                user=user,
                ip="192.0.2.1",
                reason="rate_limited",
            )
    finally:
        audit.removeHandler(handler)
    assert [getattr(r, "user", None) for r in kept] == ["attacker", "victim-1", "victim-2"]


def test_an_interval_of_zero_writes_every_line() -> None:
    repeats = RepeatFilter(0)
    assert all(repeats.filter(_record("same %s", n)) for n in range(5))


# --- a busy event loop is not a lost dependency -----------------------------------------------


async def test_the_loop_lag_shows_a_blocked_event_loop() -> None:
    lag = LoopLag(period=0.01)
    task = asyncio.create_task(lag.run())
    try:
        await asyncio.sleep(0)  # the sleeper is waiting
        time.sleep(0.3)  # the event loop is kept from running anything (deliberately)
        assert lag.seconds() >= 0.29
    finally:
        task.cancel()


class _Lag(LoopLag):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self._seconds = seconds

    def seconds(self) -> float:
        return self._seconds


async def _watch_until_down(lag: LoopLag, error: Exception) -> int:
    """How many failed probes it takes the watcher to declare Redis lost."""
    settings = Settings(
        SUPERVISOR_INTERVAL=0.01, RECONNECT_BACKOFF_INITIAL=0.01, HEALTH_CHECK_TIMEOUT=0.5
    )
    connections = Connections()
    connections.redis_available = True
    probes = 0

    async def probe() -> None:
        nonlocal probes
        probes += 1
        raise error

    task = asyncio.create_task(
        supervisor._watch(connections, "Redis", "redis_available", probe, settings, lag=lag)
    )
    try:
        await eventually(lambda: not connections.redis_available, timeout=10, interval=0.01)
        return probes
    finally:
        task.cancel()


async def test_a_timeout_while_the_loop_runs_late_is_retried_before_it_counts() -> None:
    assert await _watch_until_down(_Lag(10.0), TimeoutError()) == INCONCLUSIVE_LIMIT + 1


async def test_a_timeout_on_an_idle_loop_counts_at_once() -> None:
    assert await _watch_until_down(_Lag(0.0), TimeoutError()) == 1


async def test_a_refused_connection_counts_at_once_however_busy_the_loop() -> None:
    assert await _watch_until_down(_Lag(10.0), ConnectionRefusedError()) == 1
