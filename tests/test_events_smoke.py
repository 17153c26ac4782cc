"""Smoke: a registration travels outbox -> relay -> Kafka -> audit consumer -> audit trail."""

from __future__ import annotations

from src.app.container import app_services
from tests.conftest import SettingsFactory
from tests.support.app import OPERATOR, bearer, eventually, login, register, running_app
from tests.support.events import FAST_GROUP_JOIN


async def test_registration_reaches_the_audit_trail(make_settings: SettingsFactory) -> None:
    async with running_app(make_settings(**FAST_GROUP_JOIN)) as (app, client):
        user = await register(client)
        headers = bearer(await login(client, user["email"]))

        async def trail() -> list[str]:
            reply = await client.get(f"/api/v1/users/{user['id']}/events", headers=headers)
            assert reply.status_code == 200, reply.text
            return [item["type"] for item in reply.json()["items"]]

        types = await eventually(
            lambda: _has(trail, {"user.registered", "user.logged_in"}), timeout=20
        )
        assert "user.verification_requested" not in types  # notifications stay off the audit topic
        health = (await client.get("/api/v1/health/kafka", headers=OPERATOR)).json()
        assert health["status"] == "healthy"
        assert health["details"]["outbox"]["pending"] == 0
        relay = app_services(app).relay
        assert relay is not None and relay.published_total >= 3


async def _has(trail, wanted: set[str]) -> list[str] | None:  # type: ignore[no-untyped-def]
    types = await trail()
    return types if wanted <= set(types) else None
