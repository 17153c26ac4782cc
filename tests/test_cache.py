"""The user cache under faults: a revocation reaches every instance within a bound whatever Redis
does, any Redis failure is a miss (never a 500), and entries another version wrote are misses.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from src.app.container import app_services
from src.config.settings import Settings
from src.db.types import utcnow
from src.services.connections import connections_of
from src.users.cache import SessionState, UserCache, session_key, user_key
from src.users.schemas import UserPublic
from tests.support.app import bearer, eventually, login, register, running_app
from tests.support.auth import QUICK_SETTINGS, assert_unauthenticated
from tests.support.tcp_proxy import TcpProxy

ME = "/api/v1/users/me"


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**QUICK_SETTINGS, **overrides})

    return factory


# --- a revocation reaches every instance -------------------------------------------------------


async def test_a_logout_reaches_an_instance_whose_cache_is_stale(
    make_settings: Callable[..., Settings], redis_location: tuple[str, int, int]
) -> None:
    """Instance A loses its link to Redis; a logout on A cannot drop the shared cached "active"
    entry. Instance B, still reading that entry, must refuse the token once the entry is older
    than AUTH_CACHE_MAX_AGE_SECONDS — not when it expires minutes later."""
    host, port, _ = redis_location
    proxy = TcpProxy(port, host).start()
    try:
        settings_b = make_settings(AUTH_CACHE_MAX_AGE_SECONDS=0.5, CACHE_TTL_SECONDS=600)
        settings_a = make_settings(
            AUTH_CACHE_MAX_AGE_SECONDS=0.5, CACHE_TTL_SECONDS=600, REDIS_PORT=proxy.port
        )
        async with running_app(settings_a) as (app_a, a), running_app(settings_b) as (_, b):
            user = await register(a)
            auth = bearer(await login(a, user["email"]))
            assert (await b.get(ME, headers=auth)).status_code == 200  # B caches "active"

            proxy.refuse(True)
            assert (await a.post("/api/v1/auth/logout", headers=auth)).status_code == 204
            assert connections_of(app_a).redis_available is False  # A gave up on Redis
            assert_unauthenticated(await a.get(ME, headers=auth))

            async def b_refuses() -> bool:
                return (await b.get(ME, headers=auth)).status_code == 401

            await eventually(b_refuses, timeout=10, interval=0.1)
    finally:
        proxy.stop()


def _state(checked_at: datetime, revoked: bool = False) -> SessionState:
    return SessionState(
        user_id=uuid.uuid4(), expires_at=utcnow() + timedelta(days=1), revoked=revoked,
        checked_at=checked_at,
    )  # fmt: skip


async def test_cached_answers_are_believed_for_the_max_age_only(redis_client: Redis) -> None:
    now = utcnow()
    clock = [now]
    cache = UserCache(
        lambda: redis_client,
        ttl_seconds=600,
        timeout=1,
        on_write_failure=lambda: None,
        max_age_seconds=2.0,
        clock=lambda: clock[0],
    )
    user = UserPublic(
        id=uuid.uuid4(), email="a@example.com", full_name=None, role="user", is_active=True,
        email_verified=False, created_at=now, updated_at=now, version=1,
    )  # fmt: skip
    session_id = uuid.uuid4()
    await cache.store(user, session_id, _state(now))
    assert await cache.get_auth(user.id, session_id) is not None
    clock[0] = now + timedelta(seconds=2)
    assert await cache.get_auth(user.id, session_id) is not None
    clock[0] = now + timedelta(seconds=2.001)
    assert await cache.get_auth(user.id, session_id) is None  # ask the database again


# --- failures are misses -----------------------------------------------------------------------


async def test_any_redis_failure_is_a_miss_or_a_bypass_never_a_500(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop reports a reset connection as RuntimeError from inside redis-py."""
    async with running_app(make_settings()) as (app, client):
        user = await register(client)
        auth = bearer(await login(client, user["email"]))
        redis = connections_of(app).redis
        assert redis is not None

        def broken(*_: Any, **__: Any) -> Any:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

        for method in ("mget", "pipeline", "delete"):
            monkeypatch.setattr(redis, method, broken)
        assert (await client.get(ME, headers=auth)).status_code == 200
        renamed = await client.patch(ME, json={"full_name": "Still works"}, headers=auth)
        assert renamed.status_code == 200, renamed.text
        # The failed invalidation made this instance stop trusting Redis until it is emptied.
        assert connections_of(app).redis_available is False
        logout = await client.post("/api/v1/auth/logout", headers=auth)
        assert logout.status_code == 204
        assert_unauthenticated(await client.get(ME, headers=auth))


async def test_entries_that_no_longer_validate_are_misses(
    make_settings: Callable[..., Settings], redis_client: Redis
) -> None:
    async with running_app(make_settings()) as (app, client):
        user = await register(client)
        tokens = await login(client, user["email"])
        assert (await client.get(ME, headers=bearer(tokens))).status_code == 200
        sid = uuid.UUID(app_services(app).security.tokens.decode(tokens["access_token"]).sid)
        # What an older or newer deploy might have left under today's keys.
        await redis_client.set(user_key(uuid.UUID(user["id"])), '{"id": "not a user"}')
        await redis_client.set(session_key(sid), "not even JSON")
        response = await client.get(ME, headers=bearer(tokens))
        assert response.status_code == 200 and response.json()["id"] == user["id"]


def test_keys_carry_the_schema_version() -> None:
    assert ":v" in user_key(uuid.uuid4()) and ":v" in session_key(uuid.uuid4())
