"""Readiness turns 503 as soon as shut-down begins; liveness answers 200 to the end.

Load balancers take an instance out of rotation on a failing readiness probe. Shut-down therefore
says "not ready" first, before it closes anything, and a cached "ready" (anonymous callers share
one for a second) must not outlive that. The end-to-end test holds the real lifespan's shut-down
at its first closing step with an event (no sleeps) and probes the app from another task meanwhile.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from src.app import wiring
from src.app.container import app_services
from src.app.health import SHUTTING_DOWN, begin_draining, is_draining, readiness
from src.main import create_app
from tests.conftest import SettingsFactory
from tests.support.app import BOUND, OPERATOR, bounded_app, eventually

HEALTH = "/api/v1/health"
READY = f"{HEALTH}/ready"
LIVE = f"{HEALTH}/live"
NOT_READY = {"status": "not_ready"}
NOT_READY_DETAILED = {"status": "not_ready", "reason": SHUTTING_DOWN}


async def _ready(client: httpx.AsyncClient) -> bool:
    """Ready once the database check answered in time (a loaded CI machine sometimes misses the
    sub-second bound; that is not what these tests test)."""
    return (await client.get(READY)).status_code == 200


async def test_an_app_without_its_services_is_not_ready() -> None:
    """Before start-up or after shut-down has taken the services apart: 503, never a 500."""
    app = FastAPI()
    assert is_draining(app)
    assert await readiness(app) == SHUTTING_DOWN


async def test_begin_draining_turns_readiness_at_once_and_leaves_liveness(
    make_settings: SettingsFactory,
) -> None:
    async with bounded_app(make_settings()) as (app, client):
        # An anonymous "ready" is now shared for a second; draining must not wait it out.
        await eventually(lambda: _ready(client), timeout=BOUND)
        assert not is_draining(app)

        begin_draining(app)

        assert app_services(app).health.draining and is_draining(app)
        assert await readiness(app) == SHUTTING_DOWN
        anonymous = await client.get(READY)
        assert anonymous.status_code == 503 and anonymous.json() == NOT_READY
        operator = await client.get(READY, headers=OPERATOR)
        assert operator.status_code == 503 and operator.json() == NOT_READY_DETAILED
        assert (await client.head(READY)).status_code == 503
        live = await client.get(LIVE)
        assert live.status_code == 200 and live.json() == {"status": "alive"}


async def test_ready_is_503_during_the_real_shut_down_and_live_stays_200(
    make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shut-down is held at its first closing step (cancelling background work) until a task
    started meanwhile has probed the app; then it runs to its end."""
    shutting_down, release = asyncio.Event(), asyncio.Event()
    cancel = wiring._cancel

    async def held_cancel(tasks: list[asyncio.Task[None]]) -> None:
        shutting_down.set()
        await release.wait()
        await cancel(tasks)

    monkeypatch.setattr(wiring, "_cancel", held_cancel)
    app = create_app(make_settings())
    manager = LifespanManager(app, startup_timeout=BOUND, shutdown_timeout=BOUND)
    transport = httpx.ASGITransport(app=manager.app)

    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def probe_during_shut_down() -> dict[str, httpx.Response]:
            try:
                await shutting_down.wait()
                return {
                    "anonymous": await client.get(READY),
                    "operator": await client.get(READY, headers=OPERATOR),
                    "head": await client.head(READY),
                    "live": await client.get(LIVE),
                }
            finally:
                release.set()

        async with asyncio.timeout(BOUND * 2):
            async with manager:
                await eventually(lambda: _ready(client), timeout=BOUND)
                probe = asyncio.create_task(probe_during_shut_down())
            # The lifespan's shut-down has run to its end, the probe in its middle.
            during = await probe

        assert during["anonymous"].status_code == 503, during["anonymous"].text
        assert during["anonymous"].json() == NOT_READY
        assert during["operator"].status_code == 503
        assert during["operator"].json() == NOT_READY_DETAILED
        assert during["head"].status_code == 503
        assert during["live"].status_code == 200 and during["live"].json() == {"status": "alive"}

        # After the end, with the services gone: liveness still answers, readiness says no.
        assert (await client.get(LIVE)).status_code == 200
        after = await client.get(READY, headers=OPERATOR)
        assert after.status_code == 503 and after.json() == NOT_READY_DETAILED
