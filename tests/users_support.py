"""Helpers for the user and admin API tests: outbox reads, problem checks, quick settings."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import jwt
from fastapi import FastAPI
from sqlalchemy import select

from src.db.models import OutboxEvent
from tests.helpers import PASSWORD, login, register

API = "/api/v1"
PUBLIC_FIELDS = {
    "id",
    "email",
    "full_name",
    "role",
    "is_active",
    "email_verified",
    "created_at",
    "updated_at",
    "version",
}
USER_EVENTS = "user-events"
NOTIFICATIONS = "user-notifications"

# Every test here logs in from the same in-process client address; the per-IP login limit is for
# attackers, not for a test suite. Cheap hashing keeps account creation fast; the real parameters
# are covered by the password tests.
QUICK_SETTINGS: dict[str, Any] = {
    "LOGIN_RATE_LIMIT_PER_IP": 100_000,
    "LOGIN_RATE_LIMIT_PER_ACCOUNT": 100_000,
    "ARGON2_TIME_COST": 1,
    "ARGON2_MEMORY_COST": 8192,
    "KAFKA_ENABLED": False,
}


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """An RFC 9457 answer with this status; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"], body
    return body


def assert_unauthenticated(response: httpx.Response) -> None:
    assert_problem(response, 401)
    assert response.headers.get("www-authenticate") == "Bearer"


def session_id(tokens: dict[str, Any]) -> str:
    """The session (``sid``) an access token belongs to, read without verifying it."""
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    return str(claims["sid"])


async def outbox(
    app: FastAPI, user_id: str | uuid.UUID | None = None, type_: str | None = None
) -> list[OutboxEvent]:
    """Outbox rows in recording order, optionally for one user and of one type."""
    query = select(OutboxEvent).order_by(OutboxEvent.position)
    if user_id is not None:
        query = query.where(OutboxEvent.aggregate_id == uuid.UUID(str(user_id)))
    if type_ is not None:
        query = query.where(OutboxEvent.type == type_)
    async with app.state.sessionmaker() as db:
        return list((await db.execute(query)).scalars().all())


async def event_types(app: FastAPI, user_id: str | uuid.UUID) -> list[str]:
    return [row.type for row in await outbox(app, user_id)]


async def last_event(app: FastAPI, user_id: str | uuid.UUID, type_: str) -> OutboxEvent:
    """The newest event of this type for this user, checked for topic and aggregate."""
    rows = await outbox(app, user_id, type_)
    assert rows, f"no {type_} event for {user_id}; have {await event_types(app, user_id)}"
    row = rows[-1]
    assert str(row.aggregate_id) == str(user_id)
    expected = NOTIFICATIONS if type_.endswith("_requested") else USER_EVENTS
    assert row.topic == expected, (type_, row.topic)
    return row


def keys_anywhere(value: Any) -> set[str]:
    """Every mapping key at any depth of a JSON document."""
    if isinstance(value, dict):
        found = set(value)
        for item in value.values():
            found |= keys_anywhere(item)
        return found
    if isinstance(value, list):
        found = set()
        for item in value:
            found |= keys_anywhere(item)
        return found
    return set()


async def assert_outbox_carries_no_secrets(app: FastAPI, *passwords: str) -> int:
    """No row carries a password or hash; only notification rows carry a token. Returns the
    number of rows checked."""
    rows = await outbox(app)
    for row in rows:
        text = json.dumps(row.payload)
        keys = keys_anywhere(row.payload)
        assert not keys & {"password", "password_hash", "hashed_password"}, (row.type, keys)
        assert "$argon2" not in text, row.type
        for password in (PASSWORD, *passwords):
            assert password not in text, row.type
        if "token" in keys:
            assert row.type in {
                "user.verification_requested",
                "user.password_reset_requested",
            }, row.type
            assert row.topic == NOTIFICATIONS
        else:
            assert row.topic == USER_EVENTS, (row.type, row.topic)
    return len(rows)


async def with_tokens(
    client: httpx.AsyncClient, **extra: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Register a fresh user and sign it in: (user, token response)."""
    user = await register(client, **extra)
    return user, await login(client, user["email"])


async def admin_creates(
    client: httpx.AsyncClient, admin: dict[str, str], **fields: Any
) -> dict[str, Any]:
    """POST /users as an admin; ``email`` and ``password`` default to fresh/PASSWORD."""
    fields.setdefault("email", f"user-{uuid.uuid4().hex[:10]}@example.com")
    fields.setdefault("password", PASSWORD)
    response = await client.post(f"{API}/users", json=fields, headers=admin)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def admin_creates_signed_in(
    client: httpx.AsyncClient, admin: dict[str, str], **fields: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An account made by the admin and signed in: (user, token response)."""
    user = await admin_creates(client, admin, **fields)
    tokens = await login(client, user["email"])
    return user, tokens


async def fetch(client: httpx.AsyncClient, admin: dict[str, str], user_id: str) -> dict[str, Any]:
    """The user as an admin sees it now."""
    response = await client.get(f"{API}/users/{user_id}", headers=admin)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body
