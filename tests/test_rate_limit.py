"""Brute-force protection and request throttles, in real Redis and in the in-process fallback.

Every behaviour is checked against both backends with the same injected clock (Redis scripts take
"now" from the caller when a clock is injected), so nothing here sleeps, and the two
implementations are held to the same answers. Keys are fresh per test because Redis is shared
with the rest of the suite.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from src.auth.rate_limit import (
    PREFIX,
    InProcessLimiter,
    LoginGuard,
    RequestThrottle,
    account_digest,
    client_key,
)
from src.config.settings import Settings
from src.services.redis_client import create_redis_client
from tests.conftest import SettingsFactory
from tests.support.servers import RedisServer, SilentServer


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def unique_ip() -> str:
    return f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"


def unique_account() -> str:
    return f"user-{uuid.uuid4().hex[:10]}@example.com"


async def known() -> bool:
    return True


async def unknown() -> bool:
    return False


def limits(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "LOGIN_RATE_LIMIT_PER_IP": 1000,
        "LOGIN_RATE_LIMIT_WINDOW_SECONDS": 60,
        "LOCKOUT_FAILURE_THRESHOLD": 3,
        "LOCKOUT_WAIT_INCREMENT_SECONDS": 10,
        "LOCKOUT_MAX_WAIT_SECONDS": 25,
        "LOCKOUT_FAILURE_RESET_SECONDS": 600,
        "LOCKOUT_ACCOUNT_THRESHOLD": 1000,
        "LOCKOUT_ACCOUNT_DELAY_SECONDS": 5,
        "LOCKOUT_ACCOUNT_MAX_DELAY_SECONDS": 12,
    }
    values.update(overrides)
    return values


Backend = Callable[..., Any]


@pytest_asyncio.fixture(params=["redis", "in-process"])
async def backend(
    request: pytest.FixtureRequest, make_settings: SettingsFactory
) -> AsyncIterator[tuple[Callable[..., Any], FakeClock]]:
    """Build a LoginGuard or RequestThrottle (``kind``) on one backend, sharing one fake clock."""
    clock = FakeClock()
    clients: list[Redis] = []

    def build(kind: type[Any], **overrides: Any) -> Any:
        if request.param == "redis":
            settings = make_settings(**limits(**overrides))
            client = create_redis_client(settings)
            clients.append(client)
            return kind(settings, lambda: client, clock=clock)
        settings = make_settings(**limits(**overrides), REDIS_ENABLED=False)
        return kind(settings, lambda: None, clock=clock)

    yield build, clock
    for client in clients:
        await client.aclose()


async def attempt(guard: LoginGuard, ip: str, account: str, ask: Any = unknown) -> float | None:
    """One password attempt that turns out wrong: the wait if refused, else None."""
    return (await guard.admit(ip, account, ask)).wait


# --- per client address --------------------------------------------------------------------------


async def test_per_address_window_slides_with_exact_retry_after(backend: Any) -> None:
    build, clock = backend
    guard = build(LoginGuard, LOGIN_RATE_LIMIT_PER_IP=3, LOGIN_RATE_LIMIT_WINDOW_SECONDS=10)
    ip = unique_ip()
    assert await attempt(guard, ip, unique_account()) is None
    clock.advance(4)
    assert await attempt(guard, ip, unique_account()) is None
    assert await attempt(guard, ip, unique_account()) is None
    # The first leaves the window at 10 s: 6 s from now.
    assert await attempt(guard, ip, unique_account()) == 6.0
    assert await attempt(guard, unique_ip(), unique_account()) is None  # others are not affected
    clock.advance(6)
    assert await attempt(guard, ip, unique_account()) is None
    assert await attempt(guard, ip, unique_account()) == 4.0


async def test_ipv6_clients_are_counted_per_64(backend: Any) -> None:
    build, _ = backend
    guard = build(LoginGuard, LOGIN_RATE_LIMIT_PER_IP=2)
    prefix = f"2001:db8:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}"
    assert await attempt(guard, f"{prefix}::1", unique_account()) is None
    assert await attempt(guard, f"{prefix}:aaaa::2", unique_account()) is None
    # Another address of the same /64 is the same subscriber: no fresh allowance.
    assert await attempt(guard, f"{prefix}:ffff::3", unique_account()) is not None
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"


# --- per (account, address): the hard lock-out ---------------------------------------------------


async def test_lockout_stops_the_guessing_address_and_nobody_else(backend: Any) -> None:
    build, clock = backend
    guard = build(LoginGuard)
    attacker, owner, account = unique_ip(), unique_ip(), unique_account()
    for _ in range(3):
        assert await attempt(guard, attacker, account) is None
    # Locked for the increment, whatever the next password is...
    assert await attempt(guard, attacker, account) == 10.0
    # ...but only from there: the owner signs in from anywhere else, even a new address.
    decision = await guard.admit(owner, account, unknown)
    assert decision.wait is None and decision.lock_if_wrong is None
    await guard.succeeded(owner, account)
    assert await attempt(guard, attacker, account) == 10.0  # the owner's success frees no one else
    clock.advance(10)
    assert (await guard.admit(attacker, account, unknown)).lock_if_wrong == 20.0  # escalates
    clock.advance(20)
    assert (await guard.admit(attacker, account, unknown)).lock_if_wrong == 25.0  # capped
    clock.advance(25)
    await guard.succeeded(attacker, account)
    assert [(await guard.admit(attacker, account, unknown)).lock_if_wrong for _ in range(3)] == [
        None,
        None,
        10.0,
    ]


async def test_parallel_guesses_cannot_pass_the_threshold(backend: Any) -> None:
    """Attempts are counted before the password is checked: 20 at once, threshold 3, 3 checked."""
    build, _ = backend
    guard = build(LoginGuard)
    ip, account = unique_ip(), unique_account()
    decisions = await asyncio.gather(*(guard.admit(ip, account, unknown) for _ in range(20)))
    assert sum(d.wait is None for d in decisions) == 3
    assert sorted(d.lock_if_wrong or 0 for d in decisions if d.wait is None) == [0, 0, 10.0]


async def test_a_failure_streak_is_forgotten_after_the_reset_period(backend: Any) -> None:
    build, clock = backend
    guard = build(LoginGuard, LOCKOUT_FAILURE_RESET_SECONDS=60)
    ip, account = unique_ip(), unique_account()
    assert await attempt(guard, ip, account) is None
    assert await attempt(guard, ip, account) is None
    clock.advance(60)
    assert (await guard.admit(ip, account, unknown)).lock_if_wrong is None  # a new streak of one
    assert (await guard.admit(ip, account, unknown)).lock_if_wrong is None
    assert (await guard.admit(ip, account, unknown)).lock_if_wrong == 10.0


# --- per account: a gentle delay, never for an address the user signed in from -----------------


async def test_account_under_attack_slows_unknown_addresses_only(backend: Any) -> None:
    build, clock = backend
    guard = build(LoginGuard, LOCKOUT_ACCOUNT_THRESHOLD=4)
    account = unique_account()
    asked: list[str] = []

    async def ask() -> bool:
        asked.append("?")
        return False

    # Four failures from four addresses: no single address reaches its lock-out.
    for _ in range(4):
        assert await attempt(guard, unique_ip(), account, ask) is None
    assert asked == []  # nobody is asked while the account is below its threshold
    # Now a new address waits a little (5 s after the last attempt)...
    assert await attempt(guard, unique_ip(), account, ask) == 5.0
    assert asked == ["?"]
    clock.advance(5)
    assert await attempt(guard, unique_ip(), account) is None
    # ...a little more with each further failure (5 s per failure over the threshold)...
    assert await attempt(guard, unique_ip(), account) == 10.0
    clock.advance(10)
    assert await attempt(guard, unique_ip(), account) is None
    # ...but never more than LOCKOUT_ACCOUNT_MAX_DELAY_SECONDS.
    assert await attempt(guard, unique_ip(), account) == 12.0
    # An address that signed in recently goes straight through, and never waits.
    home = unique_ip()
    for _ in range(2):
        assert (await guard.admit(home, account, known)).wait is None
    # The user's own success ends the account's streak.
    await guard.succeeded(home, account)
    assert await attempt(guard, unique_ip(), account) is None


# --- state in Redis ------------------------------------------------------------------------------


async def test_redis_keys_expire_and_never_contain_the_email(
    make_settings: SettingsFactory, redis_client: Redis
) -> None:
    settings = make_settings(**limits(LOGIN_RATE_LIMIT_WINDOW_SECONDS=7))
    client = create_redis_client(settings)
    try:
        guard = LoginGuard(settings, lambda: client)
        ip, account = unique_ip(), unique_account()
        await guard.admit(ip, account, unknown)
        digest = account_digest(account)
        keys = [f"{PREFIX}ip:{ip}", f"{PREFIX}pair:{digest}:{ip}", f"{PREFIX}acct:{digest}"]
        for key in keys:
            assert await redis_client.pttl(key) > 0, key
        assert 6000 < await redis_client.pttl(keys[0]) <= 7000
        local_part = account.split("@")[0]
        assert [k async for k in redis_client.scan_iter(match=f"*{local_part}*")] == []
        await guard.succeeded(ip, account)
        assert await redis_client.exists(keys[1], keys[2]) == 0
    finally:
        await client.aclose()


def fallback_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "src.auth.rate_limit" and r.levelno == logging.WARNING
    ]


async def test_redis_stopped_mid_test_falls_back_and_recovers(
    make_settings: SettingsFactory,
    redis_process: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="src")
    settings = make_settings(REDIS_PORT=redis_process.port, REDIS_DB=0, **limits())
    client = create_redis_client(settings)
    guard = LoginGuard(settings, lambda: client)
    try:
        ip, account = unique_ip(), unique_account()
        assert await attempt(guard, ip, account) is None
        assert guard.fallback_count == 0 and not guard.degraded

        redis_process.stop()
        # The in-process limiter starts empty but enforces the same limits.
        assert [await attempt(guard, ip, account) for _ in range(4)][2:] == [None, 10.0]
        assert guard.degraded and guard.fallback_count == 4
        assert len(fallback_warnings(caplog)) == 1

        redis_process.start()
        fresh = unique_ip()
        assert await attempt(guard, fresh, unique_account()) is None
        assert guard.fallback_count == 4 and not guard.degraded
        assert await client.zcard(f"{PREFIX}ip:{fresh}") == 1
        assert any("Redis again" in r.getMessage() for r in caplog.records)
    finally:
        await client.aclose()


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
        **limits(LOGIN_RATE_LIMIT_PER_IP=1),
    )
    client = create_redis_client(settings)
    guard = LoginGuard(settings, lambda: client)
    try:
        ip = unique_ip()
        assert await attempt(guard, ip, unique_account()) is None
        assert await attempt(guard, ip, unique_account()) is not None
        assert guard.fallback_count == 2
        assert len(fallback_warnings(caplog)) == 1
    finally:
        await client.aclose()
        silent.close()


# --- throttles for mail and registration ---------------------------------------------------------


async def test_throttle_per_address_and_per_target(backend: Any) -> None:
    build, clock = backend
    throttle = build(
        RequestThrottle,
        MAIL_RATE_LIMIT_PER_IP=4,
        MAIL_RATE_LIMIT_PER_ADDRESS=2,
        MAIL_RATE_LIMIT_WINDOW_SECONDS=3600,
    )
    ip, target = unique_ip(), unique_account()
    assert await throttle.hit("password_reset", ip, target) is None
    assert await throttle.hit("password_reset", unique_ip(), target) is None
    # A third request for the same address, from anywhere: refused for the rest of the hour.
    assert await throttle.hit("password_reset", unique_ip(), target) == 3600.0
    # Other actions and other addresses count apart.
    assert await throttle.hit("verification", ip, target) is None
    for _ in range(3):
        assert await throttle.hit("password_reset", ip, unique_account()) is None
    # Four from one client address, whatever the targets.
    assert await throttle.hit("password_reset", ip, unique_account()) is not None
    clock.advance(3600)
    assert await throttle.hit("password_reset", ip, target) is None


# --- the in-process limiter's own bounds ---------------------------------------------------------


def test_local_state_is_pruned_and_bounded() -> None:
    clock = FakeClock()
    settings = Settings(_env_file=None, **limits(LOCKOUT_FAILURE_RESET_SECONDS=600))
    guard_policy = LoginGuard(settings, lambda: None)._policy
    limiter = InProcessLimiter(guard_policy.window_ms, clock, 50, guard_policy.reset_ms)
    for i in range(500):
        limiter.admit(guard_policy, f"ip:{i}", f"pair:{i}", f"acct:{i}", 0)
        assert limiter.tracked_keys <= 100
    # The most recent keys survive eviction; expired ones are pruned on the next call.
    assert limiter.admit(guard_policy, "ip:499", "pair:499", "acct:499", 0) == (0.0, 0.0)
    clock.advance(700)
    limiter.admit(guard_policy, "ip:new", "pair:new", "acct:new", 0)
    assert limiter.tracked_keys == 3


def test_local_clock_stepping_back_does_not_reopen_a_window() -> None:
    clock = FakeClock()
    limiter = InProcessLimiter(10_000, clock)
    assert limiter.hit([("ip", 1)]) == 0
    clock.advance(-3600)
    assert limiter.hit([("ip", 1)]) == pytest.approx(10_000)
