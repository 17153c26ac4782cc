"""Migrations on a database that already holds data: what 0004 does to readable one-time tokens.

Before 0004, reset and verification events carried their token and link readable in
``outbox.payload``; upgrading must leave none behind. Both ways are run on PostgreSQL.
"""

from __future__ import annotations

import json
import uuid

import asyncpg

from tests.support.migrations import migrate_to


async def test_upgrading_removes_readable_tokens_from_the_outbox(empty_database: str) -> None:
    await migrate_to(empty_database, "0003")
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
        await migrate_to(empty_database, "head")
        stored = {
            row["type"]: json.loads(row["payload"])
            for row in await conn.fetch("SELECT type, payload FROM outbox")
        }
        assert "secret" not in json.dumps(stored)
        assert stored["user.updated"] == {"email": "a@example.com", "full_name": "A"}

        await migrate_to(empty_database, "0003", down=True)
        await migrate_to(empty_database, "head")
    finally:
        await conn.close()
