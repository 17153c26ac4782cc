"""Brute-force protection: sliding windows and escalating lock-outs in real Redis, and the
in-process limiter that takes over while Redis is down.

Redis tests use tiny windows (one or two seconds) and a fresh IP and account per test, because
the shared Redis is shared with the rest of the suite. The in-process limiter is tested with an
injected clock, so those tests never sleep.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from src.auth.rate_limit import PREFIX, InProcessLimiter, LoginGuard, LoginPolicy, account_digest
from src.config.settings import Settings
from src.services.redis_client import create_redis_client
from tests.conftest import SettingsFactory
from tests.servers import RedisServer, SilentServer

GuardFactory = Callable[..., tuple[LoginGuard, Redis]]


def unique(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:10]}"


def unique_account() -> str:
    return f"{unique('user')}@example.com"


@pytest_asyncio.fixture
async def redis_guard(
    make_settings: SettingsFactory,
) -> AsyncIterator[GuardFactory]:
    """Build a guard on a real Redis client from settings overrides; clients are closed after."""
    clients: list[Redis] = []

    def factory(**overrides: Any) -> tuple[LoginGuard, Redis]:
        settings = make_settings(**overrides)
        client = create_redis_client(settings)
        clients.append(client)
        return LoginGuard(settings, lambda: client), client

    yield factory
    for client in clients:
        await client.aclose()


def fallback_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "src.auth.rate_limit" and r.levelno == logging.WARNING
    ]


# --- Redis: sliding windows ----------------------------------------------------------------------


async def test_per_ip_limit_and_retry_after(redis_guard: GuardFactory) -> None:
    guard, _ = redis_guard(
        LOGIN_RATE_LIMIT_PER_IP=3,
        LOGIN_RATE_LIMIT_PER_ACCOUNT=100,
        LOGIN_RATE_LIMIT_WINDOW_SECONDS=2,
    )
    ip = unique("ip")
    for _ in range(3):
        assert await guard.check(ip, unique_account()) is None
    wait = await guard.check(ip, unique_account())
    assert wait is not None and 1 <= wait <= 2 and wait == int(wait)
    # Other addresses are not affected.
    assert await guard.check(unique("ip"), unique_account()) is None
    assert guard.fallback_count == 0


async def test_refused_attempt_is_not_counted_against_the_other_key(
    redis_guard: GuardFactory,
) -> None:
    guard, _ = redis_guard(
        LOGIN_RATE_LIMIT_PER_IP=1,
        LOGIN_RATE_LIMIT_PER_ACCOUNT=1,
        LOGIN_RATE_LIMIT_WINDOW_SECONDS=30,
    )
    busy_ip, account = unique("ip"), unique_account()
    assert await guard.check(busy_ip, unique_account()) is None
    assert await guard.check(busy_ip, account) is not None  # refused by the IP limit...
    # ...so the account's single slot is still free.
    assert await guard.check(unique("ip"), account) is None
    assert await guard.check(unique("ip"), account) is not None


async def test_per_account_limit(redis_guard: GuardFactory) -> None:
    guard, _ = redis_guard(
        LOGIN_RATE_LIMIT_PER_IP=100,
        LOGIN_RATE_LIMIT_PER_ACCOUNT=2,
        LOGIN_RATE_LIMIT_WINDOW_SECONDS=5,
    )
    account = unique_account()
    assert await guard.check(unique("ip"), account) is None
    assert await guard.check(unique("ip"), account) is None
    wait = await guard.check(unique("ip"), account)
    assert wait is not None and 1 <= wait <= 5
    assert await guard.check(unique("ip"), unique_account()) is None


async def test_window_slides(redis_guard: GuardFactory) -> None:
    guard, _ = redis_guard(
        LOGIN_RATE_LIMIT_PER_IP=2,
        LOGIN_RATE_LIMIT_PER_ACCOUNT=100,
        LOGIN_RATE_LIMIT_WINDOW_SECONDS=2,
    )
    ip = unique("ip")
    assert await guard.check(ip, unique_account()) is None
    await asyncio.sleep(1.0)
    assert await guard.check(ip, unique_account()) is None
    assert await guard.check(ip, unique_account()) is not None
    await asyncio.sleep(1.2)
    # The first attempt has left the window, the second has not: exactly one slot (a fixed window
    # would have reset both).
    assert await guard.check(ip, unique_account()) is None
    wait = await guard.check(ip, unique_account())
    assert wait == 1


async def test_keys_expire_and_never_contain_the_email(
    redis_guard: GuardFactory, redis_client: Redis
) -> None:
    guard, _ = redis_guard(LOGIN_RATE_LIMIT_WINDOW_SECONDS=7)
    ip, account = unique("ip"), unique_account()
    assert await guard.check(ip, account) is None
    assert await guard.record_failure(ip, account) is None
    digest = account_digest(account)
    keys = [f"{PREFIX}ip:{ip}", f"{PREFIX}account:{digest}", f"{PREFIX}failures:{digest}"]
    for key in keys:
        ttl = await redis_client.pttl(key)
        assert ttl > 0, key
    assert 6000 < await redis_client.pttl(keys[0]) <= 7000
    local_part = account.split("@")[0]
    assert [k async for k in redis_client.scan_iter(match=f"*{local_part}*")] == []


async def test_concurrent_checks_admit_exactly_the_limit(redis_guard: GuardFactory) -> None:
    guard, _ = redis_guard(
        LOGIN_RATE_LIMIT_PER_IP=7,
        LOGIN_RATE_LIMIT_PER_ACCOUNT=5,
        LOGIN_RATE_LIMIT_WINDOW_SECONDS=30,
    )
    ip = unique("ip")
    results = await asyncio.gather(*(guard.check(ip, unique_account()) for _ in range(60)))
    assert sum(r is None for r in results) == 7
    account = unique_account()
    results = await asyncio.gather(*(guard.check(unique("ip"), account) for _ in range(60)))
    assert sum(r is None for r in results) == 5
    assert guard.fallback_count == 0


# --- Redis: lock-out -----------------------------------------------------------------------------


def lockout(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "LOGIN_RATE_LIMIT_PER_IP": 1000,
        "LOGIN_RATE_LIMIT_PER_ACCOUNT": 1000,
        "LOCKOUT_FAILURE_THRESHOLD": 3,
        "LOCKOUT_WAIT_INCREMENT_SECONDS": 1,
        "LOCKOUT_MAX_WAIT_SECONDS": 60,
        "LOCKOUT_FAILURE_RESET_SECONDS": 60,
    }
    values.update(overrides)
    return values


async def test_lockout_after_threshold_even_for_the_right_password(
    redis_guard: GuardFactory,
) -> None:
    guard, _ = redis_guard(**lockout())
    ip, account = unique("ip"), unique_account()
    for _ in range(2):
        assert await guard.check(ip, account) is None
        assert await guard.record_failure(ip, account) is None
    assert await guard.check(ip, account) is None
    assert await guard.record_failure(ip, account) == 1.0
    # The next attempt (whatever its password) is refused before the password is looked at.
    assert await guard.check(ip, account) == 1.0
    assert await guard.check(unique("ip"), account) == 1.0
    assert await guard.check(ip, unique_account()) is None  # only this account is locked
    await asyncio.sleep(1.1)
    assert await guard.check(ip, account) is None
    await guard.record_success(account)
    assert await guard.check(ip, account) is None


async def test_lockout_escalates(redis_guard: GuardFactory) -> None:
    guard, _ = redis_guard(**lockout())
    ip, account = unique("ip"), unique_account()
    for _ in range(3):
        assert await guard.check(ip, account) is None
        locked = await guard.record_failure(ip, account)
    assert locked == 1.0
    await asyncio.sleep(1.1)
    assert await guard.check(ip, account) is None
    assert await guard.record_failure(ip, account) == 2.0
    assert await guard.check(ip, account) == 2.0


async def test_lockout_is_capped(redis_guard: GuardFactory) -> None:
    guard, _ = redis_guard(**lockout(LOCKOUT_MAX_WAIT_SECONDS=3))
    ip, account = unique("ip"), unique_account()
    # Failures recorded back to back, as concurrent requests that all passed check() would.
    waits = [await guard.record_failure(ip, account) for _ in range(7)]
    assert waits == [None, None, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert await guard.check(ip, account) == 3.0


async def test_success_resets_failures(redis_guard: GuardFactory) -> None:
    guard, _ = redis_guard(**lockout())
    ip, account = unique("ip"), unique_account()
    assert await guard.record_failure(ip, account) is None
    assert await guard.record_failure(ip, account) is None
    await guard.record_success(account)
    assert await guard.record_failure(ip, account) is None
    assert await guard.record_failure(ip, account) is None
    assert await guard.record_failure(ip, account) == 1.0


async def test_failures_are_forgotten_after_the_reset_period(
    redis_guard: GuardFactory,
) -> None:
    guard, _ = redis_guard(**lockout(LOCKOUT_FAILURE_RESET_SECONDS=1))
    ip, account = unique("ip"), unique_account()
    assert await guard.record_failure(ip, account) is None
    assert await guard.record_failure(ip, account) is None
    await asyncio.sleep(1.2)
    assert await guard.record_failure(ip, account) is None  # a new streak of one
    assert await guard.record_failure(ip, account) is None
    assert await guard.record_failure(ip, account) == 1.0


async def test_failure_streak_resets_even_while_a_longer_lockout_runs(
    redis_guard: GuardFactory,
) -> None:
    # The lock-out (3 s) outlives the reset period (1 s); a failure recorded after the reset period
    # by a request that passed check() just before the lock starts a new streak.
    guard, _ = redis_guard(
        **lockout(
            LOCKOUT_FAILURE_THRESHOLD=2,
            LOCKOUT_WAIT_INCREMENT_SECONDS=3,
            LOCKOUT_FAILURE_RESET_SECONDS=1,
        )
    )
    ip, account = unique("ip"), unique_account()
    assert await guard.record_failure(ip, account) is None
    assert await guard.record_failure(ip, account) == 3.0
    await asyncio.sleep(1.2)
    assert await guard.record_failure(ip, account) is None
    assert await guard.check(ip, account) is not None  # the running lock-out is kept


# --- Redis down ----------------------------------------------------------------------------------


async def test_redis_stopped_mid_test_falls_back_and_recovers(
    make_settings: SettingsFactory,
    redis_process: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="src")
    settings = make_settings(
        REDIS_PORT=redis_process.port,
        REDIS_DB=0,
        **lockout(LOGIN_RATE_LIMIT_PER_IP=3, LOGIN_RATE_LIMIT_WINDOW_SECONDS=60),
    )
    client = create_redis_client(settings)
    guard = LoginGuard(settings, lambda: client)
    try:
        ip = unique("ip")
        assert await guard.check(ip, unique_account()) is None
        assert guard.fallback_count == 0 and not guard.degraded

        redis_process.stop()
        # The in-process limiter starts empty but enforces the same limits.
        results = [await guard.check(ip, unique_account()) for _ in range(5)]
        assert results[:3] == [None, None, None]
        assert results[3] is not None and results[4] is not None
        account = unique_account()
        waits = [await guard.record_failure(ip, account) for _ in range(3)]
        assert waits == [None, None, 1.0]
        assert await guard.check(unique("ip"), account) == 1.0
        assert guard.degraded
        assert guard.fallback_count == 9
        assert len(fallback_warnings(caplog)) == 1

        redis_process.start()
        fresh = unique("ip")
        assert await guard.check(fresh, unique_account()) is None
        assert guard.fallback_count == 9 and not guard.degraded
        assert await client.zcard(f"{PREFIX}ip:{fresh}") == 1
        assert any(
            r.levelno == logging.INFO and "Redis again" in r.getMessage() for r in caplog.records
        )
        assert len(fallback_warnings(caplog)) == 1
    finally:
        await client.aclose()


async def test_redis_disabled_uses_the_in_process_limiter(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="src")
    settings = make_settings(REDIS_ENABLED=False, LOGIN_RATE_LIMIT_PER_ACCOUNT=2)
    guard = LoginGuard(settings, lambda: None)
    account = unique_account()
    assert await guard.check(unique("ip"), account) is None
    assert await guard.check(unique("ip"), account) is None
    assert await guard.check(unique("ip"), account) is not None
    assert guard.fallback_count == 3
    assert len(fallback_warnings(caplog)) == 1


async def test_silent_redis_times_out_into_the_fallback(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="src")
    silent = SilentServer()
    settings = make_settings(
        REDIS_PORT=silent.port,
        REDIS_SOCKET_TIMEOUT=5,
        REDIS_CONNECT_TIMEOUT=5,
        HEALTH_CHECK_TIMEOUT=0.3,
        LOGIN_RATE_LIMIT_PER_IP=1,
    )
    client = create_redis_client(settings)
    guard = LoginGuard(settings, lambda: client)
    try:
        ip = unique("ip")
        assert await guard.check(ip, unique_account()) is None
        assert await guard.check(ip, unique_account()) is not None
        assert guard.fallback_count == 2
        assert len(fallback_warnings(caplog)) == 1
    finally:
        await client.aclose()
        silent.close()


# --- the in-process limiter with an injected clock -----------------------------------------------


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def policy(**overrides: int) -> LoginPolicy:
    values = {
        "window_ms": 10_000,
        "per_ip": 3,
        "per_account": 2,
        "threshold": 3,
        "increment_ms": 60_000,
        "max_wait_ms": 150_000,
        "reset_ms": 600_000,
    }
    values.update(overrides)
    return LoginPolicy(**values)


def test_local_windows_slide_with_exact_waits() -> None:
    clock = FakeClock()
    limiter = InProcessLimiter(policy(), clock)
    assert limiter.check("ip:a", "acct:1", "f:1") == 0
    clock.advance(4)
    assert limiter.check("ip:a", "acct:2", "f:2") == 0
    clock.advance(1)
    assert limiter.check("ip:a", "acct:3", "f:3") == 0
    assert limiter.check("ip:a", "acct:4", "f:4") == pytest.approx(5_000)  # first leaves at 10 s
    clock.advance(5)
    assert limiter.check("ip:a", "acct:4", "f:4") == 0
    assert limiter.check("ip:a", "acct:5", "f:5") == pytest.approx(4_000)
    # Per account, from any address; acct:4's refused attempt at 5 s was not counted.
    assert limiter.check("ip:b", "acct:4", "f:4") == 0
    assert limiter.check("ip:c", "acct:4", "f:4") == pytest.approx(10_000)
    assert limiter.check("ip:d", "acct:6", "f:6") == 0


def test_local_lockout_escalates_caps_and_resets() -> None:
    clock = FakeClock()
    limiter = InProcessLimiter(policy(per_ip=1000, per_account=1000), clock)
    assert [limiter.record_failure("f") for _ in range(3)] == [0, 0, 60_000]
    assert limiter.check("ip", "acct", "f") == pytest.approx(60_000)
    clock.advance(59)
    assert limiter.check("ip", "acct", "f") == pytest.approx(1_000)
    clock.advance(1)
    assert limiter.check("ip", "acct", "f") == 0
    assert limiter.record_failure("f") == 120_000
    clock.advance(120)
    assert limiter.record_failure("f") == 150_000  # 180 s, capped
    clock.advance(150)
    limiter.record_success("f")
    assert [limiter.record_failure("f") for _ in range(3)] == [0, 0, 60_000]
    clock.advance(60 + 600)  # no failure for the reset period: the streak is forgotten
    assert limiter.record_failure("f") == 0


def test_local_state_is_pruned_and_bounded() -> None:
    clock = FakeClock()
    limiter = InProcessLimiter(policy(), clock, max_keys=50)
    for i in range(500):
        limiter.check(f"ip:{i}", f"acct:{i}", f"f:{i}")
        limiter.record_failure(f"f:{i}")
        assert limiter.tracked_keys <= 100
    # The most recent keys survive eviction; expired ones are pruned on the next call.
    assert limiter.record_failure("f:499") == 0
    assert limiter.record_failure("f:499") == 60_000
    clock.advance(700)
    limiter.check("ip:new", "acct:new", "f:new")
    assert limiter.tracked_keys == 2


def test_local_clock_stepping_back_does_not_reopen_a_window() -> None:
    clock = FakeClock()
    limiter = InProcessLimiter(policy(per_ip=1), clock)
    assert limiter.check("ip", "acct:1", "f:1") == 0
    clock.advance(-3600)
    assert limiter.check("ip", "acct:2", "f:2") == pytest.approx(10_000)


async def test_guard_without_redis_rounds_waits_up_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="src")
    settings = Settings(
        _env_file=None,
        REDIS_ENABLED=False,
        LOGIN_RATE_LIMIT_PER_IP=2,
        LOGIN_RATE_LIMIT_WINDOW_SECONDS=10,
        LOCKOUT_FAILURE_THRESHOLD=2,
        LOCKOUT_WAIT_INCREMENT_SECONDS=30,
    )
    clock = FakeClock()
    guard = LoginGuard(settings, lambda: None, clock=clock)
    assert await guard.check("10.0.0.1", "a@example.com") is None
    clock.advance(8.5)
    assert await guard.check("10.0.0.1", "b@example.com") is None
    clock.advance(1.2)
    assert await guard.check("10.0.0.1", "c@example.com") == 1.0  # 0.3 s, rounded up to 1
    clock.advance(0.8)
    assert await guard.check("10.0.0.1", "c@example.com") is None
    assert await guard.record_failure("10.0.0.1", "c@example.com") is None
    assert await guard.record_failure("10.0.0.1", "c@example.com") == 30.0
    clock.advance(10.5)
    assert await guard.check("10.0.0.9", "c@example.com") == 20.0  # 19.5 s, rounded up
    assert guard.fallback_count == 7
    assert len(fallback_warnings(caplog)) == 1
    assert "example.com" not in caplog.text
