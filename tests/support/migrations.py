"""Moving a test database's schema to a revision, up or down, the way `user-service migrate`
does (Alembic, with the service's own configuration)."""

from __future__ import annotations

import asyncio

from alembic import command

from src.db.session import alembic_config


async def migrate_to(url: str, revision: str, down: bool = False) -> None:
    step = command.downgrade if down else command.upgrade
    await asyncio.to_thread(step, alembic_config(url), revision)
