"""The health contract (README.md, "Health") on real PostgreSQL, Redis and a Kafka broker."""

from __future__ import annotations

import httpx

from tests.conftest import SettingsFactory
from tests.helpers import OPERATOR, running_app


async def test_all_healthy(app_client: httpx.AsyncClient) -> None:
    response = await app_client.get("/api/v1/health", headers=OPERATOR)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["version"]
    for name in ("database", "redis", "kafka"):
        check = body["checks"][name]
        assert check["status"] == "healthy", (name, check)
        assert 0 <= check["latency_ms"] < 1000
        assert "error" not in check


async def test_single_checks_and_probes(app_client: httpx.AsyncClient) -> None:
    for name in ("database", "redis", "kafka"):
        response = await app_client.get(f"/api/v1/health/{name}")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "healthy"
    live = await app_client.get("/api/v1/health/live")
    assert live.status_code == 200 and live.json() == {"status": "alive"}
    ready = await app_client.get("/api/v1/health/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


async def test_disabled_dependencies_are_disabled_not_unhealthy(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(REDIS_ENABLED=False, KAFKA_ENABLED=False)
    async with running_app(settings) as (app, client):
        assert app.state.redis is None and app.state.kafka is None
        body = (await client.get("/api/v1/health", headers=OPERATOR)).json()
        assert body["status"] == "healthy"
        assert body["checks"]["redis"] == {"status": "disabled"}
        # Kafka off still shows the outbox, where events wait for it.
        assert body["checks"]["kafka"]["status"] == "disabled"
        assert body["checks"]["kafka"]["details"]["outbox"]["pending"] >= 0
        for name in ("redis", "kafka"):
            response = await client.get(f"/api/v1/health/{name}")
            assert response.status_code == 200
            assert response.json()["status"] == "disabled"
