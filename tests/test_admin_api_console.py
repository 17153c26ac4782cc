"""The admin API endpoints the console needed, tested as API (any client may use them): a user's
sessions (list, revoke), a password reset sent by an administrator, a user's second factors, the
signing keys (list, rotate) and the events across users. Each is admin-only, answers errors as
problem+json, and records the administrator as ``actor_id`` where it changes something."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pyotp
import pytest
from fastapi import FastAPI

from src.app.container import app_services
from src.config.settings import Settings
from src.db.models import AuditEvent
from tests.support.app import bearer, login, register, unique_email
from tests.support.auth import QUICK_SETTINGS, assert_problem, outbox

API = "/api/v1"
AdminApp = tuple[FastAPI, httpx.AsyncClient, dict[str, str]]


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**QUICK_SETTINGS, **overrides})

    return factory


async def _admin_id(client: httpx.AsyncClient, admin: dict[str, str]) -> str:
    return str((await client.get(f"{API}/users/me", headers=admin)).json()["id"])


async def _user_with_session(client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, str]]:
    user = await register(client, unique_email("held"))
    return user, bearer(await login(client, user["email"]))


async def test_an_admin_lists_and_revokes_a_users_session(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    user, auth = await _user_with_session(client)
    uid = user["id"]
    sessions = await client.get(f"{API}/users/{uid}/sessions", headers=admin)
    assert sessions.status_code == 200, sessions.text
    [session] = sessions.json()
    assert session["kind"] == "token" and session["current"] is False

    revoked = await client.delete(f"{API}/users/{uid}/sessions/{session['id']}", headers=admin)
    assert revoked.status_code == 204, revoked.text
    assert (await client.get(f"{API}/users/me", headers=auth)).status_code == 401
    assert (await client.get(f"{API}/users/{uid}/sessions", headers=admin)).json() == []
    [event] = await outbox(app, uid, "user.session_revoked")
    assert event.payload["actor_id"] == await _admin_id(client, admin)
    assert event.payload["session_id"] == session["id"]

    # Gone now, another user's, or no user at all: 404 problems.
    again = await client.delete(f"{API}/users/{uid}/sessions/{session['id']}", headers=admin)
    assert_problem(again, 404)
    other, _ = await _user_with_session(client)
    wrong = await client.delete(
        f"{API}/users/{other['id']}/sessions/{session['id']}", headers=admin
    )
    assert_problem(wrong, 404)
    assert_problem(await client.get(f"{API}/users/{uuid.uuid4()}/sessions", headers=admin), 404)


async def test_only_admins_see_or_end_another_users_sessions(admin_app: AdminApp) -> None:
    _, client, _ = admin_app
    user, auth = await _user_with_session(client)
    other, _ = await _user_with_session(client)
    for path in (f"{API}/users/{other['id']}/sessions", f"{API}/users/{user['id']}/sessions"):
        assert_problem(await client.get(path, headers=auth), 403)
    sid = uuid.uuid4()
    revoke = await client.delete(f"{API}/users/{other['id']}/sessions/{sid}", headers=auth)
    assert_problem(revoke, 403)
    assert_problem(await client.get(f"{API}/users/{other['id']}/sessions"), 401)


async def test_an_admin_sends_a_password_reset_that_names_them(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    user, auth = await _user_with_session(client)
    uid = user["id"]
    sent = await client.post(f"{API}/users/{uid}/password-reset", headers=admin)
    assert sent.status_code == 202, sent.text
    [event] = await outbox(app, uid, "user.password_reset_requested")
    assert event.payload["actor_id"] == await _admin_id(client, admin)
    assert event.payload["email"] == user["email"]
    assert_problem(await client.post(f"{API}/users/{uid}/password-reset", headers=auth), 403)
    missing = await client.post(f"{API}/users/{uuid.uuid4()}/password-reset", headers=admin)
    assert_problem(missing, 404)
    deactivated = await client.patch(f"{API}/users/{uid}", json={"is_active": False}, headers=admin)
    assert deactivated.status_code == 200
    assert_problem(await client.post(f"{API}/users/{uid}/password-reset", headers=admin), 409)


async def test_an_admin_sees_a_users_second_factors(admin_app: AdminApp) -> None:
    _, client, admin = admin_app
    user, auth = await _user_with_session(client)
    uid = user["id"]
    empty = await client.get(f"{API}/users/{uid}/mfa", headers=admin)
    assert empty.status_code == 200, empty.text
    assert empty.json() == {"factors": [], "recovery_codes_left": 0}
    started = await client.post(f"{API}/users/me/mfa/totp", json={"name": "Phone"}, headers=auth)
    assert started.status_code == 201, started.text
    code = {"code": pyotp.TOTP(started.json()["secret"]).now()}
    factor_id = started.json()["factor_id"]
    confirm = await client.post(
        f"{API}/users/me/mfa/totp/{factor_id}/confirm", json=code, headers=auth
    )
    assert confirm.status_code == 200, confirm.text
    listed = (await client.get(f"{API}/users/{uid}/mfa", headers=admin)).json()
    assert [(f["name"], f["confirmed"]) for f in listed["factors"]] == [("Phone", True)]
    assert listed["recovery_codes_left"] > 0
    assert "secret" not in str(listed)
    assert_problem(await client.get(f"{API}/users/{uid}/mfa", headers=auth), 403)
    assert_problem(await client.get(f"{API}/users/{uuid.uuid4()}/mfa", headers=admin), 404)


async def test_signing_keys_are_listed_and_rotated_by_admins(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    keys = await client.get(f"{API}/keys", headers=admin)
    assert keys.status_code == 200, keys.text
    states = {key["state"]: key["kid"] for key in keys.json()}
    assert {"active", "next"} <= set(states)
    assert all("private" not in str(key).lower() for key in keys.json())

    # The next key was published moments ago: refused unless forced.
    refused = await client.post(f"{API}/keys/rotate", headers=admin)
    body = assert_problem(refused, 409)
    assert "Rotation refused" in body["detail"]
    rotated = await client.post(f"{API}/keys/rotate", json={"force": True}, headers=admin)
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["active"]["kid"] == states["next"]
    assert rotated.json()["retired"]["kid"] == states["active"]
    # This instance signs with the new key at once.
    assert app_services(app).security.tokens.signing_key.kid == states["next"]
    _, auth = await _user_with_session(client)
    assert_problem(await client.get(f"{API}/keys", headers=auth), 403)
    assert_problem(await client.post(f"{API}/keys/rotate", headers=auth), 403)
    bad = await client.post(f"{API}/keys/rotate", json={"force": "soon"}, headers=admin)
    assert_problem(bad, 422)


async def test_events_across_users_filter_by_type_user_and_time(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    first, second = uuid.uuid4(), uuid.uuid4()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        (first, "user.registered", start),
        (first, "user.deactivated", start + timedelta(hours=1)),
        (second, "user.registered", start + timedelta(hours=2)),
        (second, "user.deactivated", start + timedelta(hours=3)),
    ]
    async with app_services(app).sessionmaker() as db:
        for offset, (user_id, type_, time) in enumerate(rows):
            db.add(
                AuditEvent(
                    event_id=uuid.uuid4(),
                    type=type_,
                    user_id=user_id,
                    source="/tests",
                    time=time,
                    data={"id": str(user_id)},
                    topic="user-events",
                    partition=0,
                    offset=offset,
                )
            )
        await db.commit()

    async def search(**params: Any) -> list[tuple[uuid.UUID, str]]:
        answer = await client.get(f"{API}/events", params=params, headers=admin)
        assert answer.status_code == 200, answer.text
        return [(uuid.UUID(e["user_id"]), e["type"]) for e in answer.json()["items"]]

    assert await search(type="user.deactivated") == [
        (second, "user.deactivated"),
        (first, "user.deactivated"),
    ]
    assert await search(user_id=str(first)) == [
        (first, "user.deactivated"),
        (first, "user.registered"),
    ]
    window = {"since": "2026-01-01T01:00:00Z", "until": "2026-01-01T03:00:00Z"}
    assert await search(**window) == [(second, "user.registered"), (first, "user.deactivated")]

    # Keyset pages, newest first, that add up to the whole.
    page = await client.get(f"{API}/events", params={"limit": 3, **window}, headers=admin)
    assert page.json()["next_cursor"] is None
    first_page = (await client.get(f"{API}/events", params={"limit": 1}, headers=admin)).json()
    cursor = first_page["next_cursor"]
    assert cursor is not None
    rest = await client.get(f"{API}/events", params={"limit": 1, "cursor": cursor}, headers=admin)
    assert rest.json()["items"][0]["id"] != first_page["items"][0]["id"]

    assert_problem(await client.get(f"{API}/events?cursor=x", headers=admin), 422)
    assert_problem(await client.get(f"{API}/events?since=2026-01-01T00:00:00", headers=admin), 422)
    _, auth = await _user_with_session(client)
    assert_problem(await client.get(f"{API}/events", headers=auth), 403)


def test_the_new_endpoints_are_documented() -> None:
    from src.main import create_app

    schema = create_app().openapi()
    paths = schema["paths"]
    for path, method in (
        ("/api/v1/users/{user_id}/sessions", "get"),
        ("/api/v1/users/{user_id}/sessions/{session_id}", "delete"),
        ("/api/v1/users/{user_id}/password-reset", "post"),
        ("/api/v1/users/{user_id}/mfa", "get"),
        ("/api/v1/keys", "get"),
        ("/api/v1/keys/rotate", "post"),
        ("/api/v1/events", "get"),
    ):
        operation = paths[path][method]
        assert "403" in operation["responses"], (path, method)
        assert operation.get("description") or operation.get("summary"), (path, method)
    assert not [path for path in paths if path.startswith("/admin")]
