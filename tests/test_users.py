"""The caller's own account (/users/me), the user cache, events and the OpenAPI error documents.

Against real PostgreSQL and Redis: each test reads the outbox table and Redis directly to check
what the API did, not only what it answered.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from src.config.settings import Settings
from src.services.connections import connections_of
from src.users.cache import PREFIX as CACHE_PREFIX
from src.users.cache import session_key, user_key
from src.users.schemas import UserUpdate
from src.users.service import event_for
from tests.conftest import ADMIN_PASSWORD
from tests.support.app import (
    PASSWORD,
    bearer,
    eventually,
    login,
    register,
    running_app,
    signed_in,
    unique_email,
)
from tests.support.auth import (
    API,
    PUBLIC_FIELDS,
    QUICK_SETTINGS,
    assert_problem,
    assert_unauthenticated,
    one_time_token,
    outbox,
    session_of,
)
from tests.support.servers import RedisServer
from tests.support.users import (
    NOTIFICATIONS,
    USER_EVENTS,
    admin_creates_signed_in,
    assert_outbox_carries_no_secrets,
    event_types,
    fetch,
    last_event,
    with_tokens,
)

AdminApp = tuple[FastAPI, httpx.AsyncClient, dict[str, str]]
ME = f"{API}/users/me"


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**QUICK_SETTINGS, **overrides})

    return factory


# --- GET /users/me --------------------------------------------------------------------------------


async def test_me_returns_public_fields_and_etag(app_client: httpx.AsyncClient) -> None:
    user, auth = await signed_in(app_client, full_name="Grace Hopper")
    response = await app_client.get(ME, headers=auth)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == PUBLIC_FIELDS
    assert body["id"] == user["id"] and body["email"] == user["email"]
    assert body["full_name"] == "Grace Hopper"
    assert (body["role"], body["is_active"], body["email_verified"]) == ("user", True, False)
    assert response.headers["etag"] == f'"{body["version"]}"' == '"1"'
    assert "argon2" not in response.text


# --- PATCH /users/me ------------------------------------------------------------------------------


async def test_patch_full_name_bumps_version(admin_app: AdminApp) -> None:
    app, client, _ = admin_app
    user, auth = await signed_in(client)
    response = await client.patch(ME, json={"full_name": "  Ada Lovelace "}, headers=auth)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["full_name"] == "Ada Lovelace"
    assert body["version"] == 2 and response.headers["etag"] == '"2"'
    assert body["updated_at"] > user["updated_at"]
    event = await last_event(app, user["id"], "user.updated")
    assert event.payload["full_name"] == "Ada Lovelace"
    assert event.payload["changes"] == ["full_name"]
    assert event.payload["actor_id"] == user["id"]

    # The same value again is not a change: no new version, no new event.
    again = await client.patch(ME, json={"full_name": "Ada Lovelace"}, headers=auth)
    assert again.status_code == 200 and again.json()["version"] == 2
    assert (await event_types(app, user["id"])).count("user.updated") == 1

    # A null name clears it (the name is optional).
    cleared = await client.patch(ME, json={"full_name": None}, headers=auth)
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["full_name"] is None and cleared.json()["version"] == 3


async def test_admin_email_change_resets_verification_and_asks_again(admin_app: AdminApp) -> None:
    """An administrator may move someone else's account directly (users move their own through
    POST /users/me/email, tested in tests/auth/test_account_security.py)."""
    app, client, admin = admin_app
    user, _ = await admin_creates_signed_in(client, admin, email_verified=True)
    assert user["email_verified"] is True
    assert "user.verification_requested" not in await event_types(app, user["id"])
    new_email = unique_email("moved")

    response = await client.patch(
        f"{API}/users/{user['id']}", json={"email": new_email.upper()}, headers=admin
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["email"] == new_email  # normalised
    assert body["email_verified"] is False
    assert body["version"] == user["version"] + 1

    updated = await last_event(app, user["id"], "user.updated")
    assert updated.payload["email"] == new_email
    assert "email" in updated.payload["changes"]
    request = await last_event(app, user["id"], "user.verification_requested")
    assert request.topic == NOTIFICATIONS
    assert request.payload["email"] == new_email and request.sealed
    assert request.position > updated.position
    # The account signs in with its new address only.
    await login(client, new_email)
    old = await client.post(
        f"{API}/auth/login",
        data={"grant_type": "password", "username": user["email"], "password": PASSWORD},
    )
    assert old.status_code == 400 and old.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    "body",
    [
        {"role": "admin"},
        {"is_active": False},
        {"email_verified": True},
        {"nickname": "sneaky"},
        {"full_name": "Legit", "role": "admin"},
        {"email": None},
        {"email": "not an email"},
        {"full_name": ""},
        {"full_name": "x" * 201},
    ],
    ids=lambda body: ",".join(f"{k}={str(v)[:10]}" for k, v in body.items()),
)
async def test_patch_me_refuses_what_it_may_not_change(
    app_client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    user, auth = await signed_in(app_client, full_name="Before")
    response = await app_client.patch(ME, json=body, headers=auth)
    assert_problem(response, 422)
    assert response.json()["errors"]
    after = (await app_client.get(ME, headers=auth)).json()
    assert after == user


async def test_if_match(admin_app: AdminApp) -> None:
    app, client, _ = admin_app
    user, auth = await signed_in(client)
    etag = (await client.get(ME, headers=auth)).headers["etag"]

    ok = await client.patch(ME, json={"full_name": "One"}, headers={**auth, "If-Match": etag})
    assert ok.status_code == 200, ok.text
    assert ok.headers["etag"] == '"2"'

    for stale in (etag, f"W/{etag}", '"99"'):
        refused = await client.patch(
            ME, json={"full_name": "Two"}, headers={**auth, "If-Match": stale}
        )
        assert_problem(refused, 412)
    for garbage in ("garbage", '"two"', '"-1"', ""):
        refused = await client.patch(
            ME, json={"full_name": "Two"}, headers={**auth, "If-Match": garbage}
        )
        assert_problem(refused, 412)
    now = await client.get(ME, headers=auth)
    assert now.json()["full_name"] == "One" and now.headers["etag"] == '"2"'
    assert (await event_types(app, user["id"])).count("user.updated") == 1

    # The current tag, weak or strong, and "*" all let the change through.
    for current, expected in (('W/"2"', 3), ("*", 4)):
        response = await client.patch(
            ME, json={"full_name": f"v{expected}"}, headers={**auth, "If-Match": current}
        )
        assert response.status_code == 200, response.text
        assert response.json()["version"] == expected


async def test_duplicate_email_is_409(admin_app: AdminApp) -> None:
    _, client, admin = admin_app
    other = await register(client)
    user, tokens = await with_tokens(client)
    auth = bearer(tokens)
    change = {"new_email": other["email"].upper(), "current_password": PASSWORD}
    assert_problem(await client.post(f"{ME}/email", json=change, headers=auth), 409)
    moved = {"email": other["email"]}
    assert_problem(await client.patch(f"{API}/users/{user['id']}", json=moved, headers=admin), 409)
    assert (await client.get(ME, headers=auth)).json() == (await fetch(client, admin, user["id"]))
    assert (await client.get(ME, headers=auth)).json()["email"] == user["email"]


async def test_concurrent_email_claims_give_one_winner(admin_app: AdminApp) -> None:
    """Two accounts confirm a change to one free address at once: the unique index decides,
    the loser gets 409."""
    app, client, _ = admin_app
    wanted = unique_email("contested")
    links = []
    for _ in range(2):
        user, tokens = await with_tokens(client)
        change = {"new_email": wanted, "current_password": PASSWORD}
        response = await client.post(f"{ME}/email", json=change, headers=bearer(tokens))
        assert response.status_code == 202, response.text
        links.append(await one_time_token(app, user["id"], "user.email_change_requested"))
    confirm = f"{API}/auth/email-change/confirm"
    answers = await asyncio.gather(*(client.post(confirm, json={"token": t}) for t in links))
    assert sorted(r.status_code for r in answers) == [200, 409], [r.text for r in answers]
    assert [r.json()["email"] for r in answers if r.status_code == 200] == [wanted]


# --- DELETE /users/me -----------------------------------------------------------------------------


async def test_delete_me(admin_app: AdminApp) -> None:
    app, client, _ = admin_app
    user, tokens = await with_tokens(client)
    other_session = await login(client, user["email"])

    response = await client.request(
        "DELETE", ME, json={"current_password": PASSWORD}, headers=bearer(tokens)
    )
    assert response.status_code == 204, response.text
    assert response.content == b""
    for token in (tokens, other_session):
        assert_unauthenticated(await client.get(ME, headers=bearer(token)))
    refresh = await client.post(
        f"{API}/auth/login",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
    )
    assert refresh.status_code == 400

    deleted = await last_event(app, user["id"], "user.deleted")
    assert deleted.payload["id"] == user["id"] and deleted.payload["actor_id"] == user["id"]
    again = await register(client, email=user["email"])
    assert again["id"] != user["id"]


# --- the cache ------------------------------------------------------------------------------------


async def test_cache_is_filled_and_invalidated(admin_app: AdminApp, redis_client: Redis) -> None:
    _, client, admin = admin_app
    user, tokens = await with_tokens(client)
    auth = bearer(tokens)
    user_entry = user_key(uuid.UUID(user["id"]))
    session_entry = session_key(uuid.UUID(session_of(tokens)))

    assert (await client.get(ME, headers=auth)).status_code == 200
    assert await redis_client.exists(user_entry, session_entry) == 2
    cached = json.loads(await redis_client.get(user_entry) or "{}")
    assert cached["id"] == user["id"] and "password_hash" not in cached

    # An admin's change drops the entry, and the user's very next request sees it.
    patched = await client.patch(
        f"{API}/users/{user['id']}", json={"full_name": "Renamed"}, headers=admin
    )
    assert patched.status_code == 200, patched.text
    assert not await redis_client.exists(user_entry)
    me = await client.get(ME, headers=auth)
    assert me.json()["full_name"] == "Renamed" and me.headers["etag"] == '"2"'
    assert json.loads(await redis_client.get(user_entry) or "{}")["full_name"] == "Renamed"

    # The cached role decides authorization, so a promotion and a demotion take effect at once.
    assert_problem(await client.get(f"{API}/users", headers=auth), 403)
    promote = await client.patch(f"{API}/users/{user['id']}", json={"role": "admin"}, headers=admin)
    assert promote.status_code == 200, promote.text
    assert (await client.get(f"{API}/users", headers=auth)).status_code == 200
    demote = await client.patch(f"{API}/users/{user['id']}", json={"role": "user"}, headers=admin)
    assert demote.status_code == 200, demote.text
    assert_problem(await client.get(f"{API}/users", headers=auth), 403)

    # Deactivation: the next request is refused, although the token itself has not expired.
    off = await client.patch(f"{API}/users/{user['id']}", json={"is_active": False}, headers=admin)
    assert off.status_code == 200, off.text
    assert_unauthenticated(await client.get(ME, headers=auth))


async def test_works_from_the_database_with_redis_stopped(
    make_settings: Callable[..., Settings], redis_process: RedisServer
) -> None:
    admin_email = unique_email("admin")
    settings = make_settings(
        REDIS_PORT=redis_process.port,
        REDIS_DB=0,
        FIRST_ADMIN_EMAIL=admin_email,
        FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD,
    )
    async with running_app(settings) as (app, client):
        admin = bearer(await login(client, admin_email, ADMIN_PASSWORD))
        user, tokens = await with_tokens(client, full_name="Cached")
        auth = bearer(tokens)
        assert (await client.get(ME, headers=auth)).status_code == 200
        direct = Redis(port=redis_process.port, decode_responses=True)
        try:
            assert await direct.exists(user_key(uuid.UUID(user["id"])))
        finally:
            await direct.aclose()

        redis_process.stop()
        me = await client.get(ME, headers=auth)
        assert me.status_code == 200, me.text
        assert me.json()["full_name"] == "Cached"
        patched = await client.patch(ME, json={"full_name": "Uncached"}, headers=auth)
        assert patched.status_code == 200, patched.text
        assert patched.json()["version"] == 2
        me = await client.get(ME, headers=auth)
        assert me.json()["full_name"] == "Uncached" and me.headers["etag"] == '"2"'
        assert (await fetch(client, admin, user["id"]))["full_name"] == "Uncached"

        # Revocation is enforced from the database while Redis is away.
        off = await client.patch(
            f"{API}/users/{user['id']}", json={"is_active": False}, headers=admin
        )
        assert off.status_code == 200, off.text
        assert_unauthenticated(await client.get(ME, headers=auth))
        assert await event_types(app, user["id"]) == [
            "user.registered",
            "user.verification_requested",
            "user.logged_in",
            "user.updated",
            "user.deactivated",
        ]


async def test_no_stale_entry_after_a_failed_invalidation(
    make_settings: Callable[..., Settings], redis_process: RedisServer
) -> None:
    """Redis refuses deletes for a moment while reads still work, so a deactivation cannot drop
    the cached "active" entries. Once Redis is used again, those entries must not be believed."""
    admin_email = unique_email("admin")
    settings = make_settings(
        REDIS_PORT=redis_process.port,
        REDIS_DB=0,
        FIRST_ADMIN_EMAIL=admin_email,
        FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD,
    )
    direct = Redis(port=redis_process.port, decode_responses=True)
    try:
        async with running_app(settings) as (app, client):
            admin = bearer(await login(client, admin_email, ADMIN_PASSWORD))
            user, tokens = await with_tokens(client)
            auth = bearer(tokens)
            user_entry = user_key(uuid.UUID(user["id"]))
            assert (await client.get(ME, headers=auth)).status_code == 200
            session_entry = session_key(uuid.UUID(session_of(tokens)))
            assert await direct.exists(user_entry, session_entry) == 2

            await direct.acl_setuser("default", enabled=True, commands=["-del", "-unlink"])
            try:
                off = await client.patch(
                    f"{API}/users/{user['id']}", json={"is_active": False}, headers=admin
                )
                assert off.status_code == 200, off.text
                assert await direct.exists(user_entry)  # the stale entry is still there
                assert_unauthenticated(await client.get(ME, headers=auth))
            finally:
                await direct.acl_setuser("default", enabled=True, commands=["+@all"])
            # The supervisor's next PING makes Redis "available" again.
            await eventually(lambda: connections_of(app).redis_available, timeout=5)
            for _ in range(3):
                assert_unauthenticated(await client.get(ME, headers=auth))
            cached = json.loads(await direct.get(user_entry) or "{}")
            assert cached.get("is_active", False) is False
            # And the admin's own requests are cached again, so Redis is really back in use.
            assert (await client.get(ME, headers=admin)).status_code == 200
            assert [key async for key in direct.scan_iter(match=f"{CACHE_PREFIX}*")]
    finally:
        await direct.aclose()


# --- events ---------------------------------------------------------------------------------------


async def test_events_carry_no_secrets(admin_app: AdminApp) -> None:
    """Drive every kind of change, then read every outbox row."""
    app, client, admin = admin_app
    new_password = "a different passphrase 42"
    user, tokens = await with_tokens(client, full_name="Eve")
    auth = bearer(tokens)
    bad = await client.post(
        f"{API}/auth/login",
        data={"grant_type": "password", "username": user["email"], "password": "wrong guess!"},
    )
    assert bad.status_code == 400
    moving = {"new_email": unique_email(), "current_password": PASSWORD}
    assert (await client.post(f"{ME}/email", json=moving, headers=auth)).status_code == 202
    link = await one_time_token(app, user["id"], "user.email_change_requested")
    confirmed = await client.post(f"{API}/auth/email-change/confirm", json={"token": link})
    assert confirmed.status_code == 200, confirmed.text
    changed = await client.post(
        f"{ME}/password",
        json={"current_password": PASSWORD, "new_password": new_password},
        headers=auth,
    )
    assert changed.status_code == 204, changed.text
    reset = await client.post(
        f"{API}/auth/password-reset/request",
        json={"email": (await client.get(ME, headers=auth)).json()["email"]},
    )
    assert reset.status_code == 202
    url = f"{API}/users/{user['id']}"
    for change in (
        {"role": "admin"},
        {"is_active": False},
        {"is_active": True},
        {"email_verified": True},
    ):
        assert (await client.patch(url, json=change, headers=admin)).status_code == 200
    assert (await client.delete(url, headers=admin)).status_code == 204

    types = await event_types(app, user["id"])
    for expected in (
        "user.registered",
        "user.verification_requested",
        "user.logged_in",
        "user.login_failed",
        "user.updated",
        "user.password_changed",
        "user.password_reset_requested",
        "user.email_change_requested",
        "user.email_change_notice",
        "user.role_changed",
        "user.deactivated",
        "user.activated",
        "user.email_verified",
        "user.deleted",
    ):
        await last_event(app, user["id"], expected)  # right topic and aggregate
        assert expected in types
    assert types[-1] == "user.deleted"
    assert await assert_outbox_carries_no_secrets(app, new_password, ADMIN_PASSWORD) >= len(types)
    assert all(row.topic in {USER_EVENTS, NOTIFICATIONS} for row in await outbox(app))


# --- OpenAPI --------------------------------------------------------------------------------------

ADMIN_OPERATIONS = {
    ("get", "/api/v1/users"),
    ("post", "/api/v1/users"),
    ("get", "/api/v1/users/{user_id}"),
    ("patch", "/api/v1/users/{user_id}"),
    ("delete", "/api/v1/users/{user_id}"),
}
# Errors each operation can answer besides 401/403/422, as the API tests above show them.
SPECIFIC_ERRORS = {
    ("patch", "/api/v1/users/me"): {409, 412},
    ("delete", "/api/v1/users/me"): {409},
    ("post", "/api/v1/users/me/password"): {400},
    ("delete", "/api/v1/users/me/sessions/{session_id}"): {404},
    ("post", "/api/v1/users"): {409},
    ("get", "/api/v1/users/{user_id}"): {404},
    ("patch", "/api/v1/users/{user_id}"): {404, 409, 412},
    ("delete", "/api/v1/users/{user_id}"): {404, 409},
    ("post", "/api/v1/auth/register"): {409},
    ("post", "/api/v1/auth/login"): {400, 429},
    ("post", "/api/v1/auth/password-reset/confirm"): {400},
    ("post", "/api/v1/auth/verify-email/confirm"): {400},
}


async def test_openapi_documents_error_responses(app_client: httpx.AsyncClient) -> None:
    spec = (await app_client.get(f"{API}/openapi.json")).json()
    seen: set[tuple[str, str]] = set()
    authenticated = 0
    for path, item in spec["paths"].items():
        if not path.startswith((f"{API}/users", f"{API}/auth")):
            continue
        for method, operation in item.items():
            key = (method, path)
            seen.add(key)
            responses = operation["responses"]
            codes = {int(code) for code in responses if code != "default"}
            expected = set(SPECIFIC_ERRORS.get(key, set()))
            if operation.get("security"):
                expected.add(401)
                authenticated += 1
            if key in ADMIN_OPERATIONS:
                expected.add(403)
            if (operation.get("parameters") or operation.get("requestBody")) and key != (
                "post",
                "/api/v1/auth/login",
            ):
                expected.add(422)
            assert expected <= codes, f"{method.upper()} {path}: missing {expected - codes}"
            for code in codes:
                # The token endpoint answers RFC 6749 section 5.2 JSON (400, and 401 for clients).
                if code < 400 or (key == ("post", "/api/v1/auth/login") and code in (400, 401)):
                    continue
                content = responses[str(code)].get("content", {})
                assert set(content) == {"application/problem+json"}, (method, path, code)
    assert seen >= set(SPECIFIC_ERRORS) | ADMIN_OPERATIONS
    # Every /users operation, the two logouts and the step-up need a token (and so must
    # document 401).
    assert authenticated == sum(path.startswith(f"{API}/users") for _, path in seen) + 3
    assert ("post", "/api/v1/auth/logout") in seen and ("get", "/api/v1/users/me") in seen


# --- every change is an event ---------------------------------------------------------------------


def _another_value(field: str, current: Any) -> Any:
    if isinstance(current, bool):
        return not current
    if field == "role":
        return "admin" if current == "user" else "user"
    if field == "email":
        return unique_email("changed")
    return f"{current or ''} changed"


@pytest.mark.parametrize("field", sorted(UserUpdate.model_fields))
async def test_every_writable_field_records_an_event(admin_app: AdminApp, field: str) -> None:
    """Each field an admin may change, changed on its own (to another value and back), leaves an
    event naming it: events come from a field -> event table, not from a list someone must
    remember to extend (``email_verified`` set back to false used to record nothing)."""
    app, client, admin = admin_app
    user, _ = await with_tokens(client, full_name="Someone")
    original = user[field]
    for value in (_another_value(field, original), original):
        before = await event_types(app, user["id"])
        url = f"{API}/users/{user['id']}"
        response = await client.patch(url, json={field: value}, headers=admin)
        assert response.status_code == 200, response.text
        new = (await outbox(app, user["id"]))[len(before) :]
        changes = [row for row in new if field in row.payload.get("changes", [])]
        assert changes, (field, value, [row.type for row in new])
        assert str(event_for(field, value)) in {row.type for row in changes}
