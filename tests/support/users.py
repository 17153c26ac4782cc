"""Helpers for the user and admin API tests: outbox reads, problem checks, quick settings."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from fastapi import FastAPI

from src.db.models import OutboxEvent
from src.events.outbox import NOTIFICATION_EVENTS
from tests.support.app import PASSWORD, login, register
from tests.support.auth import API, outbox

USER_EVENTS = "user-events"
NOTIFICATIONS = "user-notifications"


async def event_types(app: FastAPI, user_id: str | uuid.UUID) -> list[str]:
    return [row.type for row in await outbox(app, user_id)]


async def last_event(app: FastAPI, user_id: str | uuid.UUID, type_: str) -> OutboxEvent:
    """The newest event of this type for this user, checked for topic and aggregate."""
    rows = await outbox(app, user_id, type_)
    assert rows, f"no {type_} event for {user_id}; have {await event_types(app, user_id)}"
    row = rows[-1]
    assert str(row.aggregate_id) == str(user_id)
    expected = NOTIFICATIONS if type_ in NOTIFICATION_EVENTS else USER_EVENTS
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
    """No row carries a password, a hash, or a readable token or link (notifications keep theirs
    sealed, in a column of their own). Returns the number of rows checked."""
    rows = await outbox(app)
    for row in rows:
        text = json.dumps(row.payload) + (row.sealed or "")
        keys = keys_anywhere(row.payload)
        assert not keys & {"password", "password_hash", "hashed_password"}, (row.type, keys)
        assert not keys & {"token", "url", "refresh_token"}, (row.type, keys)
        assert "$argon2" not in text, row.type
        for password in (PASSWORD, *passwords):
            assert password not in text, row.type
        if row.type in NOTIFICATION_EVENTS:
            assert row.topic == NOTIFICATIONS
        else:
            assert row.topic == USER_EVENTS, (row.type, row.topic)
            assert row.sealed is None, row.type
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
