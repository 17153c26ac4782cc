"""The authenticated request's fast path: what it skips must never weaken what it checks.

One MGET serves the reads of many requests at once, concurrent misses of one session share one
database read, a verified token is not verified again (but its expiry and its key still count),
and whether a client is first-party is looked up once a moment. Each shortcut has a test that it
happens and a test that a logout, an expiry, a retired key or a demoted client still wins.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import event

from src.app.container import app_services
from src.auth import jwt as jwt_module
from src.auth.jwt import TokenError, generate_signing_key
from src.auth.passwords import hash_workers
from src.config.settings import Settings
from src.db.types import utcnow
from src.oauth.clients import FirstPartyClients
from src.users.cache import SessionState, UserCache, user_key
from src.users.schemas import UserPublic
from tests.support.app import bearer, login, register, running_app
from tests.support.auth import QUICK_SETTINGS, assert_unauthenticated

ME = "/api/v1/users/me"


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**QUICK_SETTINGS, **overrides})

    return factory


def _user(email: str) -> UserPublic:
    now = utcnow()
    return UserPublic(
        id=uuid.uuid4(), email=email, full_name=None, role="user", is_active=True,
        email_verified=False, created_at=now, updated_at=now, version=1,
    )  # fmt: skip


def _state(user_id: uuid.UUID) -> SessionState:
    return SessionState(
        user_id=user_id, expires_at=utcnow() + timedelta(days=1), revoked=False,
        checked_at=utcnow(),
    )  # fmt: skip


def _cache(redis_client: Redis) -> UserCache:
    return UserCache(
        lambda: redis_client, ttl_seconds=600, timeout=2, on_write_failure=lambda: None,
        max_age_seconds=60,
    )  # fmt: skip


class _Spy:
    """Counts the calls of one method of a real object; the real method still runs."""

    def __init__(self, target: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = getattr(target, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await real(*args, **kwargs)

        monkeypatch.setattr(target, name, counted)


# --- one MGET for the reads of one turn of the event loop -------------------------------------


async def test_reads_made_together_go_to_redis_as_one_command_and_each_gets_its_own(
    redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _cache(redis_client)
    entries = []
    for n in range(20):
        user, session_id = _user(f"batch-{n}@example.com"), uuid.uuid4()
        await cache.store(user, session_id, _state(user.id))
        entries.append((user, session_id))
    spy = _Spy(redis_client, "mget", monkeypatch)

    answers = await asyncio.gather(*(cache.get_auth(u.id, s) for u, s in entries))

    assert spy.calls == 1
    for (user, _), answer in zip(entries, answers, strict=True):
        assert answer is not None
        assert answer[0] == user and answer[1].user_id == user.id
    # A lone read is not held back for company: it goes out on its own, and answers.
    alone = await cache.get_auth(entries[0][0].id, entries[0][1])
    assert alone is not None and spy.calls == 2


async def test_a_failed_batch_is_a_miss_for_every_reader(
    redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _cache(redis_client)
    user, session_id = _user("failing@example.com"), uuid.uuid4()
    await cache.store(user, session_id, _state(user.id))

    async def broken(*_: Any, **__: Any) -> Any:
        raise ConnectionError("reset")

    monkeypatch.setattr(redis_client, "mget", broken)
    answers = await asyncio.gather(*(cache.get_auth(user.id, session_id) for _ in range(5)))
    assert answers == [None] * 5


# --- concurrent misses share one database read ---------------------------------------------------


async def test_concurrent_misses_of_one_session_read_the_database_once(
    make_settings: Callable[..., Settings], redis_client: Redis
) -> None:
    async with running_app(make_settings()) as (app, client):
        user = await register(client)
        auth = bearer(await login(client, user["email"]))
        await redis_client.flushdb()  # every request below misses
        statements: list[str] = []

        def seen(*args: Any) -> None:
            statements.append(args[2])

        engine = app_services(app).engine.sync_engine
        event.listen(engine, "before_cursor_execute", seen)
        try:
            replies = await asyncio.gather(*(client.get(ME, headers=auth) for _ in range(20)))
        finally:
            event.remove(engine, "before_cursor_execute", seen)
        assert [r.status_code for r in replies] == [200] * 20
        user_reads = [s for s in statements if s.lstrip().startswith("SELECT users.")]
        assert len(user_reads) == 1, statements


async def test_a_request_after_a_logout_never_shares_a_read_from_before_it(
    redis_client: Redis,
) -> None:
    """A read started before a logout may answer "active"; a request that starts after the
    logout dropped the entry must make its own read."""
    cache = _cache(redis_client)
    user_id, session_id = uuid.uuid4(), uuid.uuid4()
    release = asyncio.Event()

    async def before_logout() -> str:
        await release.wait()
        return "active"

    async def after_logout() -> str:
        return "revoked"

    early = asyncio.ensure_future(cache.load_once(user_id, session_id, before_logout))
    await asyncio.sleep(0)  # the early read is running
    await cache.invalidate(session_ids=[session_id])
    assert await cache.load_once(user_id, session_id, after_logout) == "revoked"
    release.set()
    assert await early == "active"  # its own caller still gets what it read


async def test_a_logout_is_refused_at_once_while_the_session_is_busy(
    make_settings: Callable[..., Settings],
) -> None:
    """Requests in flight and refreshes in the background do not let a logged-out token
    through: the next request after the logout is refused."""
    async with running_app(make_settings(AUTH_CACHE_MAX_AGE_SECONDS=0.2)) as (_, client):
        user = await register(client)
        auth = bearer(await login(client, user["email"]))
        busy = await asyncio.gather(*(client.get(ME, headers=auth) for _ in range(30)))
        assert {r.status_code for r in busy} == {200}
        assert (await client.post("/api/v1/auth/logout", headers=auth)).status_code == 204
        after = await asyncio.gather(*(client.get(ME, headers=auth) for _ in range(10)))
        for reply in after:
            assert_unauthenticated(reply)


# --- a verified token is not verified again ----------------------------------------------------


async def test_a_verified_token_is_remembered_but_its_expiry_still_counts(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_app(make_settings()) as (app, client):
        user = await register(client)
        token = (await login(client, user["email"]))["access_token"]
        codec = app_services(app).security.tokens
        claims = codec.decode(token)
        spy_calls = []
        real = codec._access_claims

        def counted(value: str) -> Any:
            spy_calls.append(value)
            return real(value)

        monkeypatch.setattr(codec, "_access_claims", counted)
        assert codec.decode(token) == claims
        assert spy_calls == []  # not checked again

        class _Later:
            @staticmethod
            def time() -> float:
                return claims.exp + codec._leeway + 1

        monkeypatch.setattr(jwt_module, "time", _Later)
        with pytest.raises(TokenError, match="expired"):
            codec.decode(token)


async def test_tokens_of_a_key_taken_out_of_the_ring_are_refused_at_once(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings()) as (app, client):
        user = await register(client)
        token = (await login(client, user["email"]))["access_token"]
        assert (await client.get(ME, headers=bearer(token))).status_code == 200  # remembered
        codec = app_services(app).security.tokens
        replacement = generate_signing_key(codec.signing_key.algorithm)
        codec.set_keys(replacement, [replacement])
        with pytest.raises(TokenError, match="unknown signing key"):
            codec.decode(token)
        assert_unauthenticated(await client.get(ME, headers=bearer(token)))


async def test_forged_tokens_never_enter_the_memory_of_verified_tokens(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings()) as (app, client):
        user = await register(client)
        token = (await login(client, user["email"]))["access_token"]
        codec = app_services(app).security.tokens
        header, payload, signature = token.split(".")
        forged = f"{header}.{payload}.{signature[::-1]}"
        for _ in range(3):
            assert_unauthenticated(await client.get(ME, headers=bearer(forged)))
        assert forged not in codec._ring.verified


def test_the_memory_of_verified_tokens_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jwt_module, "VERIFIED_TOKENS_MAX", 3)
    key = generate_signing_key("ES256")
    settings = Settings(JWT_ALGORITHM="ES256")
    codec = jwt_module.AccessTokenCodec(key, settings)
    tokens = [codec.issue(uuid.uuid4(), uuid.uuid4(), "user")[0] for _ in range(5)]
    for token in tokens:
        codec.decode(token)
    assert list(codec._ring.verified) == tokens[2:]  # the oldest went first


# --- first-party clients, looked up once a moment ---------------------------------------------


async def test_a_demoted_client_is_refused_once_the_answer_is_older_than_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pure logic: the lookup itself is get_client's, tested with the clients API."""
    from src.oauth import clients as clients_module

    now = [100.0]
    first_party = FirstPartyClients(max_age_seconds=1.0, clock=lambda: now[0])
    answers = iter([True, False])
    lookups = []

    class _Client:
        def __init__(self, flag: bool) -> None:
            self.first_party = flag

    async def get_client(_db: Any, client_id: str) -> Any:
        lookups.append(client_id)
        return _Client(next(answers))

    monkeypatch.setattr(clients_module, "get_client", get_client)

    class _Session:
        async def __aenter__(self) -> _Session:
            return self

        async def __aexit__(self, *_: Any) -> None:
            return None

    sessions: Any = _Session
    assert await first_party.check(sessions, "app") is True
    now[0] += 1.0
    assert await first_party.check(sessions, "app") is True  # within the bound: remembered
    assert lookups == ["app"]
    now[0] += 0.01
    assert await first_party.check(sessions, "app") is False  # asked again: demoted
    assert lookups == ["app", "app"]


# --- the hashing threads ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "processes", "threads"), [(2, 1, 2), (2, 2, 1), (8, 3, 2), (1, 4, 1), (16, 4, 4)]
)
def test_hashing_threads_share_the_cores_among_the_processes(
    cores: int, processes: int, threads: int
) -> None:
    assert hash_workers(cores, processes) == threads


# --- a sign-in leaves the cache warm, unless it changed the user's row -----------------------


async def test_a_sign_in_keeps_the_users_cached_copy(
    make_settings: Callable[..., Settings], redis_client: Redis
) -> None:
    async with running_app(make_settings()) as (_, client):
        user = await register(client)
        auth = bearer(await login(client, user["email"]))
        assert (await client.get(ME, headers=auth)).status_code == 200
        key = user_key(uuid.UUID(user["id"]))
        assert await redis_client.exists(key) == 1
        await login(client, user["email"])
        assert await redis_client.exists(key) == 1


async def test_a_sign_in_that_upgrades_the_hash_drops_the_cached_copy(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings(ARGON2_TIME_COST=1)) as (_, client):
        user = await register(client)
        earlier = bearer(await login(client, user["email"]))
        assert (await client.get(ME, headers=earlier)).json()["version"] == 1  # cached now
    # The same database and Redis, with stronger parameters: the next sign-in rehashes.
    async with running_app(make_settings(ARGON2_TIME_COST=2)) as (_, client):
        await login(client, user["email"])
        me = await client.get(ME, headers=earlier)  # its session's entry is still cached
        assert me.status_code == 200
        assert me.json()["version"] == 2, "the cached copy from before the rehash was served"


# --- no pooled connection is held while argon2 works ---------------------------------------------


@pytest.mark.parametrize("what", ["login", "unknown", "register"])
async def test_no_database_connection_is_held_while_a_password_is_hashed(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    async with running_app(make_settings()) as (app, client):
        user = await register(client)
        services = app_services(app)
        pool = services.engine.sync_engine.pool
        held: list[int] = []
        hasher = services.security.hasher
        for name in ("verify", "verify_dummy", "hash"):
            real = getattr(hasher, name)

            async def watched(*args: Any, _real: Any = real) -> Any:
                held.append(pool.checkedout())  # type: ignore[attr-defined]
                return await _real(*args)

            monkeypatch.setattr(hasher, name, watched)
        if what == "register":
            await register(client)
        else:
            email = user["email"] if what == "login" else "nobody-here@example.com"
            await client.post(
                "/api/v1/auth/login",
                data={"grant_type": "password", "username": email, "password": "whatever-1234"},
            )
        assert held and held == [0] * len(held)
