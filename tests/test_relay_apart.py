"""``OUTBOX_RELAY_IN_PROCESS=false``: the API leaves publishing to a relay run as its own process
(``python -m src.events.relay``, tests/test_events_processes.py), and stays healthy without one."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx

from src.app.container import app_services
from src.events.relay import OutboxRelay
from src.services.connections import get_kafka_from_app
from tests.conftest import SettingsFactory
from tests.support.app import OPERATOR, eventually, register, running_app
from tests.support.events import outbox_rows


async def _report(client: httpx.AsyncClient) -> dict[str, Any] | None:
    """The detailed health report once every check is healthy or off (each is cut off under a
    second, which a busy machine sometimes misses: not what this tests)."""
    response = await client.get("/api/v1/health", headers=OPERATOR)
    body: dict[str, Any] = response.json()
    checks = body["checks"].values()
    if response.status_code == 200 and all(c["status"] in ("healthy", "disabled") for c in checks):
        return body
    return None


async def test_no_relay_in_the_api_when_it_runs_apart(
    make_settings: SettingsFactory, database_url: str
) -> None:
    settings = make_settings(OUTBOX_RELAY_IN_PROCESS=False)
    async with running_app(settings) as (app, client):
        services = app_services(app)
        names = {task.get_name() for task in services.tasks}
        assert "outbox-relay" not in names
        assert services.relay is None
        # Expired sealed links must go even if no relay runs anywhere; the audit trail is
        # read back from Kafka by the API processes whoever publishes.
        assert {"outbox-housekeeping", "audit-consumer"} <= names

        report = await eventually(lambda: _report(client), timeout=15)
        assert report["status"] == "healthy"
        assert "relay" not in report["checks"]["kafka"]["details"]

        user = await register(client)
        waiting = await outbox_rows(database_url, [user["id"]])
        assert waiting and all(row.published_at is None for row in waiting)

        # What the relay process does: it publishes what the API left in the outbox.
        relay = OutboxRelay(settings, services.sessionmaker, lambda: get_kafka_from_app(app))
        task = asyncio.create_task(relay.run())
        try:

            async def published() -> bool:
                rows = await outbox_rows(database_url, [user["id"]])
                return all(r.published_at is not None for r in rows)

            await eventually(published, timeout=15)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_the_relay_runs_in_the_api_by_default(make_settings: SettingsFactory) -> None:
    async with running_app(make_settings()) as (app, _):
        names = {task.get_name() for task in app_services(app).tasks}
        assert "outbox-relay" in names
        assert "outbox-housekeeping" not in names
