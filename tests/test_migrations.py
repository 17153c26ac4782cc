"""Migrations on a database that already holds data: what 0004 does to readable one-time tokens.

Before 0004, reset and verification events carried their token and link readable in
``outbox.payload``; upgrading must leave none behind. Both ways are run on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest_asyncio
from alembic import command

from src.db.session import alembic_config


@pytest_asyncio.fixture
async def empty_database(database_url: str) -> AsyncIterator[str]:
    """A database of its own next to the run's (migrations go up and down in it)."""
    admin = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    name = f"ums_migrations_{uuid.uuid4().hex[:10]}"
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


async def _migrate(url: str, revision: str, down: bool = False) -> None:
    step = command.downgrade if down else command.upgrade
    await asyncio.to_thread(step, alembic_config(url), revision)


async def test_upgrading_removes_readable_tokens_from_the_outbox(empty_database: str) -> None:
    await _migrate(empty_database, "0003")
    dsn = empty_database.replace("postgresql+asyncpg://", "postgresql://", 1)
    conn = await asyncpg.connect(dsn)
    try:
        rows = [
            ("user.password_reset_requested", {"email": "a@example.com", "token": "secret-1"}),
            ("user.verification_requested", {"url": "https://x/verify?token=secret-2"}),
            ("user.updated", {"email": "a@example.com", "full_name": "A"}),
        ]
        for kind, payload in rows:
            await conn.execute(
                "INSERT INTO outbox (id, topic, type, aggregate_id, payload, created_at, attempts)"
                " VALUES ($1, 't', $2, $3, $4::jsonb, now(), 0)",
                uuid.uuid4(),
                kind,
                uuid.uuid4(),
                json.dumps(payload),
            )
        await _migrate(empty_database, "head")
        stored = {
            row["type"]: json.loads(row["payload"])
            for row in await conn.fetch("SELECT type, payload FROM outbox")
        }
        assert "secret" not in json.dumps(stored)
        assert stored["user.updated"] == {"email": "a@example.com", "full_name": "A"}

        await _migrate(empty_database, "0003", down=True)
        await _migrate(empty_database, "head")
    finally:
        await conn.close()
