"""Fixtures: real PostgreSQL, Redis and Kafka-protocol broker, and apps built on them.

Environment variables that point the tests at existing servers (all optional):
- ``TEST_DATABASE_URL``: a PostgreSQL admin URL; each test run creates and drops its own database.
- ``TEST_REDIS_URL``: ``redis://host:port/db``; the run uses that database and flushes it first.
- ``TEST_KAFKA_BOOTSTRAP_SERVERS``: ``host:port`` of a Kafka-protocol broker.
Without them the harness starts its own servers from pip-installed binaries.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncpg
import httpx
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from src.config.settings import Settings
from src.db.session import upgrade_database
from tests.support.app import OPERATOR_TOKEN, bearer, login, running_app
from tests.support.oidc import ADMIN_PASSWORD as ADMIN_PASSWORD
from tests.support.oidc import ISSUER
from tests.support.servers import KafkaBroker, RedisServer, postgres_admin_url

# Every log line of the session is scanned for passwords, tokens and hashes (fails the run).
pytest_plugins = ["tests.support.log_scan"]


def _to_asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _with_database(url: str, name: str) -> str:
    parsed = urlparse(url)
    return parsed._replace(path=f"/{name}").geturl()


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def database_url(tmp_root: Path) -> AsyncIterator[str]:
    """A fresh, migrated PostgreSQL database for this test run (dropped at the end)."""
    admin = await asyncio.to_thread(postgres_admin_url, tmp_root)
    name = f"ums_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_to_asyncpg_dsn(admin))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = _with_database(admin, name).replace("postgresql://", "postgresql+asyncpg://", 1)
    await asyncio.to_thread(upgrade_database, url)
    yield url
    conn = await asyncpg.connect(_to_asyncpg_dsn(admin))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def redis_location() -> Iterator[tuple[str, int, int]]:
    """(host, port, db) of the shared Redis for this run."""
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        parsed = urlparse(url)
        db = int(parsed.path.lstrip("/") or 0)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
        # Leftovers of an earlier run (cache entries, counters) must not leak into this one.
        flush = SyncRedis(host=host, port=port, db=db, socket_timeout=5)
        flush.flushdb()
        flush.close()
        yield host, port, db
        return
    server = RedisServer()
    server.start()
    try:
        yield "127.0.0.1", server.port, 0
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap address of the shared Kafka-protocol broker for this run."""
    existing = os.environ.get("TEST_KAFKA_BOOTSTRAP_SERVERS")
    if existing:
        yield existing
        return
    broker = KafkaBroker()
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def redis_process() -> Iterator[RedisServer]:
    """A Redis the test owns and may stop and restart."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kafka_process() -> Iterator[KafkaBroker]:
    """A broker the test owns and may stop and restart."""
    broker = KafkaBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def jwt_key_file(tmp_root: Path) -> Path:
    """One RSA signing key for the run (generating one per app would cost ~100 ms each)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_root / "jwt-test.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(
    database_url: str,
    redis_location: tuple[str, int, int],
    kafka_bootstrap: str,
    jwt_key_file: Path,
    tmp_path: Path,
) -> SettingsFactory:
    """Settings for the shared servers; keyword arguments override any field."""
    host, port, db = redis_location

    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "ENVIRONMENT": "test",
            "DATABASE_URL": database_url,
            "DATA_DIR": tmp_path / "data",
            "JWT_PRIVATE_KEY_FILE": jwt_key_file,
            "REDIS_HOST": host,
            "REDIS_PORT": port,
            "REDIS_DB": db,
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "KAFKA_ENABLE_IDEMPOTENCE": False,
            "SUPERVISOR_INTERVAL": 0.3,
            "RECONNECT_BACKOFF_INITIAL": 0.2,
            "RECONNECT_BACKOFF_MAX": 1.0,
            "LOG_LEVEL": "INFO",
            # CI is a loaded 2-core machine whose disk is shared with every test's fsyncs: a
            # connection, a ping or a COMMIT may take more than the production bounds there.
            # The tests about the bounds (tests/test_database_faults.py) set their own.
            "DATABASE_CONNECT_TIMEOUT": 10.0,
            "DATABASE_PING_TIMEOUT": 5.0,
            "DATABASE_COMMAND_TIMEOUT": 10.0,
            "DATABASE_STATEMENT_TIMEOUT": 8.0,
            # Every test request comes from 127.0.0.1 through one Redis: tests about limits set
            # their own; the rest must not trip over each other's counters.
            "LOGIN_RATE_LIMIT_PER_IP": 100_000,
            # Tests that fill the cache and then change the database behind it rely on the
            # cache answering; those about its age set their own.
            "AUTH_CACHE_MAX_AGE_SECONDS": 300,
            "MAIL_RATE_LIMIT_PER_IP": 100_000,
            "MAIL_RATE_LIMIT_PER_ADDRESS": 100_000,
            # Tests that read health details send it (tests.support.app.OPERATOR).
            "HEALTH_DETAILS_TOKEN": OPERATOR_TOKEN,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return factory


@pytest_asyncio.fixture
async def app_client(make_settings: SettingsFactory) -> AsyncIterator[httpx.AsyncClient]:
    """A client for an app on the shared servers with default test settings."""
    async with running_app(make_settings()) as (_, client):
        yield client


@pytest_asyncio.fixture
async def redis_client(redis_location: tuple[str, int, int]) -> AsyncIterator[Redis]:
    host, port, db = redis_location
    client = Redis(host=host, port=port, db=db, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def clean_db(database_url: str) -> None:
    """Empty every table (tests that count users or admins need a known starting point)."""
    conn = await asyncpg.connect(_to_asyncpg_dsn(database_url))
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'alembic_version'"
        )
        # DELETE, not TRUNCATE: the tables hold a few rows, and TRUNCATE replaces every table's
        # and index's files (an fsync storm that stalls the other tests' commits on CI).
        async with conn.transaction():
            for row in tables:
                await conn.execute(f'DELETE FROM "{row["tablename"]}"')
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def empty_database(database_url: str) -> AsyncIterator[str]:
    """A database of its own next to the run's, never migrated (migration tests go up and down
    in it); dropped after the test."""
    admin = _to_asyncpg_dsn(database_url)
    name = f"ums_empty_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, _ = database_url.rpartition("/")
    yield f"{base}/{name}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def admin_app(
    make_settings: SettingsFactory, clean_db: None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, dict[str, str]]]:
    """An app whose first admin exists (created at start-up), with that admin signed in."""
    email = f"admin-{uuid.uuid4().hex[:8]}@example.com"
    settings = make_settings(FIRST_ADMIN_EMAIL=email, FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD)
    async with running_app(settings) as (app, client):
        tokens = await login(client, email, ADMIN_PASSWORD)
        yield app, client, bearer(tokens)


@pytest_asyncio.fixture
async def provider(
    make_settings: SettingsFactory, clean_db: None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, dict[str, str]]]:
    """The OpenID Connect provider at ``tests.support.oidc.ISSUER`` (https, so its cookies are
    ``__Host-`` and Secure), with its first admin signed in: (app, client, admin header)."""
    admin_email = f"admin-{uuid.uuid4().hex[:8]}@example.com"
    settings = make_settings(
        PUBLIC_BASE_URL=ISSUER, FIRST_ADMIN_EMAIL=admin_email, FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD
    )
    async with running_app(settings) as (app, _):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as client:
            yield app, client, bearer(await login(client, admin_email, ADMIN_PASSWORD))
