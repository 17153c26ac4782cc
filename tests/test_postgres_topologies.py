"""PostgreSQL behind PgBouncer in transaction mode, and a multi-host URL that must find the
writable server: both through a real PgBouncer (Debian's, installed by ``.ci/run``).

docs/deploy.md tells operators what these show: ``DATABASE_PGBOUNCER=true`` is what a
transaction-mode pooler needs, and ``target_session_attrs=read-write`` skips a server that can
only read (a standby after a failover), here stood in for by a PgBouncer logging in as a role
whose transactions are read-only.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from src.app.container import app_services
from src.config.settings import Settings
from src.db.session import create_engine
from tests.conftest import SettingsFactory
from tests.support.app import bearer, login, register, running_app, unique_email
from tests.support.auth import QUICK_SETTINGS
from tests.support.servers import PgBouncer, free_port, pgbouncer_binary

pytestmark = pytest.mark.skipif(pgbouncer_binary() is None, reason="pgbouncer is not installed")


def _server(database_url: str) -> tuple[str, int, str]:
    url = make_url(database_url)
    if not url.host or url.host.startswith("/"):
        pytest.skip("needs PostgreSQL over TCP (TEST_DATABASE_URL)")
    return url.host, url.port or 5432, url.database or "postgres"


def _through(database_url: str, port: int) -> str:
    return make_url(database_url).set(host="127.0.0.1", port=port).render_as_string(False)


@pytest.fixture
def bouncer(database_url: str) -> Iterator[PgBouncer]:
    host, port, _ = _server(database_url)
    server = PgBouncer(server_host=host, server_port=port, pool_mode="transaction", pool_size=2)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_transaction_pooler_loses_cached_prepared_statements_without_the_setting(
    make_settings: SettingsFactory, database_url: str, bouncer: PgBouncer
) -> None:
    """Why the setting exists: a statement prepared (and cached) in one transaction is gone in
    the next when PgBouncer hands that one to another server connection. (The statement timeout
    is off here: PgBouncer would refuse the connection itself.)"""
    settings = make_settings(
        DATABASE_URL=_through(database_url, bouncer.port), DATABASE_STATEMENT_TIMEOUT=0
    )
    engine = create_engine(settings)
    statement = text("SELECT count(*) FROM users WHERE id = :id")
    try:
        async with engine.connect() as first, engine.connect() as second:
            await first.execute(statement, {"id": None})  # prepared on server connection 1
            await first.commit()
            # The other client takes server connection 1 (PgBouncer reuses the last one freed)
            # and keeps it, so the first client's next transaction runs on connection 2.
            await second.execute(text("SELECT 1"))
            with pytest.raises(DBAPIError, match="prepared statement"):
                await first.execute(statement, {"id": None})
            await first.rollback()
            await second.rollback()
    finally:
        await engine.dispose()

    pooled = create_engine(settings.model_copy(update={"DATABASE_PGBOUNCER": True}))
    try:
        async with pooled.connect() as first, pooled.connect() as second:
            await first.execute(statement, {"id": None})
            await first.commit()
            await second.execute(text("SELECT 1"))
            assert (await first.execute(statement, {"id": None})).scalar() == 0
            await first.rollback()
            await second.rollback()
    finally:
        await pooled.dispose()


async def test_behind_pgbouncer_in_transaction_mode_the_service_serves_in_parallel(
    make_settings: SettingsFactory, database_url: str, bouncer: PgBouncer
) -> None:
    # make_settings keeps DATABASE_STATEMENT_TIMEOUT on: PgBouncer would refuse the connection if
    # it were still sent as a start-up parameter.
    settings = make_settings(
        **QUICK_SETTINGS,
        DATABASE_URL=_through(database_url, bouncer.port),
        DATABASE_PGBOUNCER=True,
    )
    async with running_app(settings) as (_, client):

        async def one_user() -> dict[str, Any]:
            user = await register(client)
            tokens = await login(client, user["email"])
            me = await client.get("/api/v1/users/me", headers=bearer(tokens))
            assert me.status_code == 200, me.text
            sessions = await client.get("/api/v1/users/me/sessions", headers=bearer(tokens))
            assert sessions.status_code == 200, sessions.text
            body: dict[str, Any] = me.json()
            return body

        # Twenty users at once through PgBouncer's two server connections: every request's
        # transactions land on either, whichever is free.
        users = await asyncio.gather(*(one_user() for _ in range(20)))
        assert len({user["id"] for user in users}) == 20
        health = await client.get("/api/v1/health/ready")
        assert health.status_code == 200, health.text


@pytest.fixture
async def read_only_role(database_url: str) -> Any:
    name = f"ums_test_standby_{uuid.uuid4().hex[:8]}"
    admin = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE ROLE "{name}" LOGIN')
        await conn.execute(f'ALTER ROLE "{name}" SET default_transaction_read_only = on')
    finally:
        await conn.close()
    yield name
    conn = await asyncpg.connect(admin)
    try:
        # Its sessions (PgBouncer's server connections) are gone once the bouncer stopped.
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name
        )
        await conn.execute(f'DROP ROLE IF EXISTS "{name}"')
    finally:
        await conn.close()


async def test_a_multi_host_url_with_read_write_finds_the_writable_server(
    make_settings: SettingsFactory, database_url: str, read_only_role: str
) -> None:
    host, port, database = _server(database_url)
    # Session mode, and the statement timeout let through: it stands in for a PostgreSQL server.
    standby = PgBouncer(
        server_host=host,
        server_port=port,
        server_user=read_only_role,
        pool_mode="session",
        ignore_startup_parameters="extra_float_digits,statement_timeout",
    )
    standby.start()
    try:
        # The stand-in is really read-only: connected to it alone, a transaction cannot write.
        alone = await asyncpg.connect(
            host="127.0.0.1", port=standby.port, user="postgres", database=database
        )
        try:
            assert await alone.fetchval("SHOW transaction_read_only") == "on"
        finally:
            await alone.close()

        nobody = free_port()  # a host that is down: the next one is tried
        url = (
            f"postgresql://postgres@/{database}?host=127.0.0.1:{nobody}"
            f"&host=127.0.0.1:{standby.port}&host={host}:{port}"
            "&target_session_attrs=read-write"
        )
        settings: Settings = make_settings(**QUICK_SETTINGS, DATABASE_URL=url)

        # Without the attribute the first server that answers is taken: the read-only one.
        careless = create_engine(
            make_settings(DATABASE_URL=url.removesuffix("&target_session_attrs=read-write"))
        )
        try:
            async with careless.connect() as conn:
                assert (await conn.execute(text("SELECT current_user"))).scalar() == read_only_role
        finally:
            await careless.dispose()

        async with running_app(settings) as (app, client):
            email = unique_email()
            await register(client, email)
            await login(client, email)
            engine = app_services(app).engine
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT current_user"))).scalar() == "postgres"
                assert (await conn.execute(text("SHOW transaction_read_only"))).scalar() == "off"
                count = await conn.execute(
                    text("SELECT count(*) FROM users WHERE email = :e"), {"e": email}
                )
                assert count.scalar() == 1
    finally:
        standby.stop()
