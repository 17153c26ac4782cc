"""PostgreSQL failing under a running service: every request gets a bounded, honest answer.

A fault-injection run found requests hanging for 32 s on a silent PostgreSQL (asyncpg's 30 s
command timeout, then SQLAlchemy's 2 s polite close), a connection lost mid-query answered with a
500, and a failing session close cutting off a complete answer. Here the app talks to the test
PostgreSQL through ``tests.support.tcp_proxy.TcpProxy``, which refuses, resets or black-holes the
link on demand, so each fault is real TCP behaviour, not a mock.

Timing: the database bounds are about a second (``BOUNDS``); a request fails its test only if it
takes ``HANG`` (10 s), which a loaded 2-core CI never needs, and which the old code always did.
The elapsed times are printed (``-s``) for the record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from src.app.container import app_services
from src.auth import service as auth_service
from src.auth.context import Principal, Security
from src.config.settings import Settings
from src.db.session import create_engine, describe
from src.users import repository
from tests.conftest import SettingsFactory
from tests.support.app import PASSWORD, eventually, register, running_app, signed_in
from tests.support.auth import QUICK_SETTINGS
from tests.support.servers import free_port
from tests.support.tcp_proxy import TcpProxy

ME = "/api/v1/users/me"
LOGIN = "/api/v1/auth/login"
LOGOUT = "/api/v1/auth/logout"
REGISTER = "/api/v1/auth/register"

# Each database wait about a second: a silent server costs at most ping + connect (2 s), or a
# reply + the close (2.5 s). DATABASE_STATEMENT_TIMEOUT stays below the command timeout.
BOUNDS: dict[str, Any] = {
    "DATABASE_CONNECT_TIMEOUT": 1.0,
    "DATABASE_PING_TIMEOUT": 1.0,
    "DATABASE_COMMAND_TIMEOUT": 1.5,
    "DATABASE_STATEMENT_TIMEOUT": 1.0,
    "DATABASE_CLOSE_TIMEOUT": 1.0,
}
# Bounds no request may wait out within HANG: a test using them proves nothing waited at all.
LONG_BOUNDS: dict[str, Any] = {
    "DATABASE_CONNECT_TIMEOUT": 30.0,
    "DATABASE_PING_TIMEOUT": 30.0,
    "DATABASE_COMMAND_TIMEOUT": 30.0,
    "DATABASE_STATEMENT_TIMEOUT": 20.0,
    "DATABASE_CLOSE_TIMEOUT": 30.0,
}
HANG = 10.0


def _bound(settings: Settings) -> float:
    """The longest a request may wait on a silent database with these settings."""
    acquire = settings.DATABASE_PING_TIMEOUT + settings.DATABASE_CONNECT_TIMEOUT
    reply = settings.DATABASE_COMMAND_TIMEOUT + settings.DATABASE_CLOSE_TIMEOUT
    return max(acquire, reply)


@pytest.fixture
def proxy(database_url: str) -> Iterator[TcpProxy]:
    """A proxy in front of this run's PostgreSQL."""
    url = make_url(database_url)
    link = TcpProxy(url.port or 5432, url.host or "127.0.0.1").start()
    try:
        yield link
    finally:
        link.stop()


@pytest.fixture
def settings_via(
    make_settings: SettingsFactory, database_url: str, proxy: TcpProxy
) -> Callable[..., Settings]:
    """Settings whose database is reached through ``proxy``; no cache (Redis off) can answer."""
    proxied = make_url(database_url).set(port=proxy.port).render_as_string(hide_password=False)

    def factory(**overrides: Any) -> Settings:
        values = {**QUICK_SETTINGS, **BOUNDS, "REDIS_ENABLED": False, "DATABASE_URL": proxied}
        return make_settings(**{**values, **overrides})

    return factory


def _heal(proxy: TcpProxy) -> None:
    """End the fault. Links silenced by a black hole stay silent (as real ones would): end them
    too, or the app's shut-down would wait on each while closing its pool."""
    proxy.blackhole(False)
    proxy.refuse(False)
    proxy.reset()


@pytest.fixture
def quiet_proxy(proxy: TcpProxy) -> Iterator[TcpProxy]:
    """The proxy, healed when the test ends whatever it left it as."""
    try:
        yield proxy
    finally:
        _heal(proxy)


async def _timed(request: Any) -> tuple[httpx.Response, float]:
    """Await a request; fail only if it hangs (HANG), and return how long it took."""
    started = time.perf_counter()
    async with asyncio.timeout(HANG):
        response: httpx.Response = await request
    return response, time.perf_counter() - started


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["status"] == 503


def _assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A database outage is logged as one line per request, never as a stack."""
    stacks = [r for r in caplog.records if r.exc_info or r.stack_info]
    assert not stacks, [f"{r.name}: {r.getMessage()}" for r in stacks]
    assert "Traceback" not in caplog.text


def _unavailable_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "src.api.errors" and r.getMessage().startswith("Database unavailable")
    ]


def _login_form(email: str) -> dict[str, str]:
    return {"grant_type": "password", "username": email, "password": PASSWORD}


def _engine(app: FastAPI) -> AsyncEngine:
    return app_services(app).engine


def _on_statement(app: FastAPI, marker: str, action: Callable[[], None]) -> Callable[[], None]:
    """Run ``action`` right before the next statement containing ``marker`` goes out (once);
    returns the function that removes the listener."""
    fired = False

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        nonlocal fired
        if not fired and marker in statement:
            fired = True
            action()

    target = _engine(app).sync_engine
    event.listen(target, "before_cursor_execute", before)
    return lambda: event.remove(target, "before_cursor_execute", before)


async def _warm_pool(client: httpx.AsyncClient, auth: dict[str, str], n: int = 4) -> None:
    """Several requests at once, so the pool holds several idle connections afterwards."""
    answers = await asyncio.gather(*(client.get(ME, headers=auth) for _ in range(n)))
    assert {a.status_code for a in answers} == {200}


# --- (1) a silent database ---------------------------------------------------------------------


@pytest.mark.parametrize("path", [ME, LOGIN])
async def test_silent_database_gets_a_503_within_the_bound(
    settings_via: Callable[..., Settings],
    quiet_proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    """Black hole: pooled connections and new ones alike stop answering. The check before use
    gives up after DATABASE_PING_TIMEOUT, the one reconnection after DATABASE_CONNECT_TIMEOUT."""
    settings = settings_via()
    async with running_app(settings) as (_, client):
        user, auth = await signed_in(client)
        await _warm_pool(client, auth)
        quiet_proxy.blackhole(True)
        if path == ME:
            request = client.get(ME, headers=auth)
        else:
            request = client.post(LOGIN, data=_login_form(user["email"]))
        response, elapsed = await _timed(request)
        print(f"silent database, {path}: 503 after {elapsed:.2f}s (bound {_bound(settings)}s)")
        _assert_unavailable(response)
        assert len(_unavailable_lines(caplog)) == 1
        _heal(quiet_proxy)
    _assert_no_traceback(caplog)


async def test_database_going_silent_mid_statement_gets_a_503_within_the_bound(
    settings_via: Callable[..., Settings],
    quiet_proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The link dies after the connection passed its check: the statement waits
    DATABASE_COMMAND_TIMEOUT; the connection, stuck mid-query, is discarded without waiting for
    the rollback of the session close (which the old code waited 30 s more for)."""
    settings = settings_via()
    async with running_app(settings) as (app, client):
        _, auth = await signed_in(client)
        remove = _on_statement(app, "FROM users", lambda: quiet_proxy.blackhole(True))
        try:
            response, elapsed = await _timed(client.get(ME, headers=auth))
        finally:
            remove()
        print(f"silent mid-statement: 503 after {elapsed:.2f}s (bound {_bound(settings)}s)")
        _assert_unavailable(response)
        assert len(_unavailable_lines(caplog)) == 1
        _heal(quiet_proxy)
    _assert_no_traceback(caplog)


# --- (2) a connection reset --------------------------------------------------------------------


async def test_reset_while_a_statement_is_in_flight_is_a_503_and_the_next_requests_succeed(
    settings_via: Callable[..., Settings],
    quiet_proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncpg reports a connection lost mid-statement as ConnectionDoesNotExistError inside
    SQLAlchemy's generic DBAPIError: that is the database unavailable (503), not a bug (500)."""
    async with running_app(settings_via(**LONG_BOUNDS)) as (app, client):
        _, auth = await signed_in(client)
        remove = _on_statement(app, "FROM users", quiet_proxy.reset)
        try:
            response, elapsed = await _timed(client.get(ME, headers=auth))
        finally:
            remove()
        print(f"reset mid-statement: {response.status_code} after {elapsed:.2f}s")
        _assert_unavailable(response)
        # Lost mid-statement (ConnectionDoesNotExistError, or "connection is closed" when asyncpg
        # saw the reset first): either way the connection is gone, which makes it unavailable.
        assert "OperationalError (" in _unavailable_lines(caplog)[0]
        # The link is back at once: the lost connection was discarded, the others are checked.
        for _ in range(3):
            assert (await client.get(ME, headers=auth)).status_code == 200
        assert _engine(app).pool.checkedout() == 0  # type: ignore[attr-defined]
    _assert_no_traceback(caplog)


async def test_requests_after_a_reset_reconnect_without_anyone_noticing(
    settings_via: Callable[..., Settings], quiet_proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Every pooled connection is dead after a reset (as after a server restart). The check
    before use finds each one closed at once and replaces it: no request fails, none waits."""
    async with running_app(settings_via(**LONG_BOUNDS)) as (_, client):
        user, auth = await signed_in(client)
        await _warm_pool(client, auth)
        quiet_proxy.reset()
        for _ in range(6):  # more than the idle connections the warm-up left
            response, _ = await _timed(client.get(ME, headers=auth))
            assert response.status_code == 200, response.text
        response, _ = await _timed(client.post(LOGIN, data=_login_form(user["email"])))
        assert response.status_code == 200, response.text
    assert not _unavailable_lines(caplog)
    _assert_no_traceback(caplog)


# --- (3) a refusing database -------------------------------------------------------------------


@pytest.mark.parametrize("path", [ME, LOGIN])
async def test_refusing_database_gets_a_503_at_once(
    settings_via: Callable[..., Settings],
    quiet_proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    """Refused: open connections are reset, new ones refused. With bounds of 30 s, answering
    within HANG proves no wait was involved at all."""
    async with running_app(settings_via(**LONG_BOUNDS)) as (_, client):
        user, auth = await signed_in(client)
        await _warm_pool(client, auth)
        quiet_proxy.refuse(True)
        if path == ME:
            request = client.get(ME, headers=auth)
        else:
            request = client.post(LOGIN, data=_login_form(user["email"]))
        response, elapsed = await _timed(request)
        print(f"refusing database, {path}: 503 after {elapsed:.3f}s")
        _assert_unavailable(response)
        # The socket's own error (ConnectionResetError), raw from asyncpg, as OperationalError.
        assert "OperationalError (" in _unavailable_lines(caplog)[0]
        quiet_proxy.refuse(False)
        assert (await client.get(ME, headers=auth)).status_code == 200
    _assert_no_traceback(caplog)


# --- (4) the session close failing after the work committed ------------------------------------


async def test_a_committed_logout_gets_its_complete_answer_when_the_close_fails(
    settings_via: Callable[..., Settings],
    quiet_proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The logout commits; the session then holds a new transaction (here: a read after the
    commit, as any handler answering with fresh data has) when the link goes silent. Its close,
    after the 204 has gone out, cannot roll back: it gives up within DATABASE_CLOSE_TIMEOUT,
    discards the connection and logs one line. The client gets the complete 204 (the old code
    raised into the finished response: a dropped connection), and the logout holds."""
    real_logout = auth_service.logout

    async def logout_then_read_then_silence(
        db: AsyncSession, sec: Security, principal: Principal
    ) -> None:
        await real_logout(db, sec, principal)  # commits
        await db.execute(text("SELECT 1"))  # a new transaction, open until the session closes
        quiet_proxy.blackhole(True)

    monkeypatch.setattr(auth_service, "logout", logout_then_read_then_silence)
    settings = settings_via()
    async with running_app(settings) as (app, client):
        _, auth = await signed_in(client)
        response, elapsed = await _timed(client.post(LOGOUT, headers=auth))
        print(f"close failing after a committed logout: 204 after {elapsed:.2f}s")
        assert response.status_code == 204, response.text
        assert response.content == b""
        closes = [r for r in caplog.records if r.name == "src.db.session"]
        assert [r.levelno for r in closes] == [logging.WARNING], [r.getMessage() for r in closes]
        assert _engine(app).pool.checkedout() == 0  # type: ignore[attr-defined]

        _heal(quiet_proxy)
        # The logout committed: once the link is back, the token no longer works.
        response, _ = await _timed(client.get(ME, headers=auth))
        assert response.status_code == 401, response.text
    assert not _unavailable_lines(caplog)
    _assert_no_traceback(caplog)


# --- (5) recovery ------------------------------------------------------------------------------


async def test_the_pool_recovers_when_the_link_comes_back(
    settings_via: Callable[..., Settings], quiet_proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Connections silenced during the black hole stay silent after it (as real ones would):
    each fails its check before use within DATABASE_PING_TIMEOUT and is replaced, so requests
    succeed again without a restart and nothing is left checked out."""
    async with running_app(settings_via()) as (app, client):
        _, auth = await signed_in(client)
        await _warm_pool(client, auth)
        quiet_proxy.blackhole(True)
        for _ in range(2):
            response, _ = await _timed(client.get(ME, headers=auth))
            _assert_unavailable(response)
        # More at once: each idle connection in turn fails its check and is discarded.
        answers = await asyncio.gather(*(client.get(ME, headers=auth) for _ in range(4)))
        assert {a.status_code for a in answers} == {503}
        quiet_proxy.blackhole(False)

        async def recovered() -> bool:
            return (await client.get(ME, headers=auth)).status_code == 200

        await eventually(recovered, timeout=HANG, interval=0.1)
        # Every connection now in the pool answers: a burst all succeeds.
        answers = await asyncio.gather(*(client.get(ME, headers=auth) for _ in range(6)))
        assert [a.status_code for a in answers] == [200] * 6
        assert _engine(app).pool.checkedout() == 0  # type: ignore[attr-defined]
        _heal(quiet_proxy)  # idle connections the burst did not reach may still be silenced
    _assert_no_traceback(caplog)


# --- (6) data errors stay what they are ----------------------------------------------------------


async def test_a_registration_race_lost_at_the_unique_index_is_still_a_409(
    settings_via: Callable[..., Settings],
    quiet_proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two registrations of one address both pass the "is it taken?" check; the database's
    unique index decides. Its IntegrityError is the service's 409, not a database outage."""

    async def nobody_has_it(*_: Any, **__: Any) -> bool:
        return False  # as if the other registration committed right after this check

    async with running_app(settings_via()) as (_, client):
        first = await register(client)
        monkeypatch.setattr(repository, "email_taken", nobody_has_it)
        response, _ = await _timed(
            client.post(REGISTER, json={"email": first["email"], "password": PASSWORD})
        )
        assert response.status_code == 409, response.text
        assert response.headers["content-type"] == "application/problem+json"
    assert not _unavailable_lines(caplog)


@pytest.fixture
async def direct_engine(make_settings: SettingsFactory) -> AsyncIterator[AsyncEngine]:
    """The service's engine on the test database, without a proxy."""
    engine = create_engine(make_settings(**{**BOUNDS, "DATABASE_STATEMENT_TIMEOUT": 0.3}))
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "statement, parameters",
    [
        ("SELECT CAST(:v AS integer)", {"v": "not a number"}),  # refused by asyncpg's encoder
        ("SELECT CAST('not a number' AS integer)", {}),  # refused by the server (22P02)
        ("SELECT 1 / 0", {}),  # 22012
    ],
)
async def test_a_bad_value_is_not_a_database_outage(
    direct_engine: AsyncEngine, statement: str, parameters: dict[str, Any]
) -> None:
    async with direct_engine.connect() as connection:
        with pytest.raises(DBAPIError) as caught:
            await connection.execute(text(statement), parameters)
        assert not isinstance(caught.value, OperationalError), repr(caught.value)
        assert not caught.value.connection_invalidated
        await connection.rollback()
        assert await connection.scalar(text("SELECT 1")) == 1


async def test_a_duplicate_key_is_an_integrity_error(direct_engine: AsyncEngine) -> None:
    async with direct_engine.connect() as connection:
        await connection.execute(text("CREATE TEMPORARY TABLE t (k int PRIMARY KEY)"))
        await connection.execute(text("INSERT INTO t VALUES (1)"))
        with pytest.raises(IntegrityError) as caught:
            await connection.execute(text("INSERT INTO t VALUES (1)"))
        assert not caught.value.connection_invalidated


async def test_statement_timeout_is_unavailable_and_keeps_the_connection(
    direct_engine: AsyncEngine,
) -> None:
    """PostgreSQL cancels the statement (57014) before the client's command timeout: a 503 for
    the request, and the connection lives on."""
    async with direct_engine.connect() as connection:
        with pytest.raises(OperationalError) as caught:
            await connection.execute(text("SELECT pg_sleep(5)"))
        assert describe(caught.value) == "OperationalError (QueryCanceledError)"
        assert not caught.value.connection_invalidated
        await connection.rollback()
        assert await connection.scalar(text("SELECT 1")) == 1


async def test_connection_refused_is_an_operational_error(make_settings: SettingsFactory) -> None:
    """asyncpg raises the socket's ConnectionRefusedError raw; it leaves the engine wrapped."""
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres"
    engine = create_engine(make_settings(DATABASE_URL=url))
    try:
        with pytest.raises(OperationalError) as caught:
            async with engine.connect():
                pass
        assert describe(caught.value) == "OperationalError (ConnectionRefusedError)"
    finally:
        await engine.dispose()


# --- which errors the API calls "database unavailable" -------------------------------------------


def _raising_app(exc: Exception) -> FastAPI:
    from src.api.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise exc

    return app


@pytest.mark.parametrize(
    "exc, status",
    [
        (TimeoutError(), 503),
        (OperationalError("SELECT 1", {}, ConnectionResetError()), 503),
        (OSError("No space left on device"), 500),  # no database outage
        (PermissionError("key file"), 500),
        (ConnectionRefusedError("some other service"), 500),
    ],
)
async def test_only_database_failures_are_503(exc: Exception, status: int) -> None:
    transport = httpx.ASGITransport(app=_raising_app(exc), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/boom")
    assert response.status_code == status
    assert ("retry-after" in response.headers) is (status == 503)


# --- shut-down ---------------------------------------------------------------------------------


async def test_shut_down_does_not_wait_on_a_silent_database(
    settings_via: Callable[..., Settings], quiet_proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Closing the pool says goodbye to each idle connection without waiting for the answer:
    with 30 s bounds, one polite close on the silent link would outlast HANG."""
    async with asyncio.timeout(HANG), running_app(settings_via(**LONG_BOUNDS)) as (_, client):
        _, auth = await signed_in(client)
        await _warm_pool(client, auth)
        quiet_proxy.blackhole(True)
        started = time.perf_counter()
    print(f"shut-down with a silent database: {time.perf_counter() - started:.2f}s")
    _assert_no_traceback(caplog)
