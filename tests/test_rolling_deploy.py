"""A rolling deploy: the previous release keeps serving, and may restart, on a database a newer
release has already migrated; a database that is *behind* the code still stops start-up.

docs/deploy.md ("Migrations") says what this asks of migrations: each stays compatible with the
release before it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from src.app.wiring import StartupError
from src.db.session import alembic_config, is_newer_schema, upgrade_database
from tests.conftest import SettingsFactory
from tests.support.app import register, running_app
from tests.support.auth import QUICK_SETTINGS


async def _database_at(tmp_path: Path, revision: str) -> str:
    """A migrated SQLite database whose recorded revision is then set to ``revision``."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    await asyncio.to_thread(upgrade_database, url)
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        await engine.dispose()
    return url


def test_only_revisions_this_code_has_never_seen_count_as_newer() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    assert head is not None
    assert not is_newer_schema({head})
    assert not is_newer_schema(set())
    assert is_newer_schema({"0099_from_a_newer_release"})


async def test_the_previous_release_starts_and_serves_on_a_newer_schema(
    make_settings: SettingsFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = await _database_at(tmp_path, "0099_from_a_newer_release")
    caplog.set_level(logging.WARNING, logger="src.app.wiring")
    async with running_app(make_settings(**QUICK_SETTINGS, DATABASE_URL=url)) as (_, client):
        await register(client)
        ready = await client.get("/api/v1/health/ready")
        assert ready.status_code == 200, ready.text
    warnings = [r.getMessage() for r in caplog.records if r.name == "src.app.wiring"]
    assert any("newer than this code" in message for message in warnings), warnings


async def test_a_database_behind_the_code_still_stops_start_up(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    script = ScriptDirectory.from_config(alembic_config())
    older = [revision.revision for revision in script.walk_revisions()][1]
    url = await _database_at(tmp_path, older)
    with pytest.raises(StartupError, match="not migrated"):
        async with running_app(make_settings(**QUICK_SETTINGS, DATABASE_URL=url)):
            pass
