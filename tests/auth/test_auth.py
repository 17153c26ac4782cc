"""Registration, the OAuth2 token endpoint, refresh rotation, sessions and password changes.

Against real PostgreSQL and Redis (the conftest fixtures). Bad tokens, JWKS and a stock OAuth2
client are in tests/test_auth_tokens.py; reset and verification in tests/test_auth_recovery.py;
brute force, outages, logs and body size in tests/test_auth_protection.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from redis.asyncio import Redis

from src.app.container import app_services
from src.config.settings import Settings
from src.services.connections import connections_of
from src.users.cache import session_key
from tests.auth.conftest import App
from tests.support.app import PASSWORD, bearer, login, register, running_app, unique_email
from tests.support.auth import (
    API,
    ME_URL,
    PUBLIC_FIELDS,
    REGISTER_URL,
    SESSIONS_URL,
    TOKEN_URL,
    assert_oauth_error,
    assert_problem,
    assert_unauthenticated,
    expire_session,
    password_grant,
    refresh_grant,
    session_of,
    set_active,
    unverified_claims,
    user_row,
)

# --- registration ---------------------------------------------------------------------------------


async def test_register_returns_the_public_user_and_its_location(app: App) -> None:
    _, client = app
    email = unique_email()
    response = await client.post(
        REGISTER_URL, json={"email": email, "password": PASSWORD, "full_name": "Ada Lovelace"}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == PUBLIC_FIELDS
    assert body["email"] == email and body["full_name"] == "Ada Lovelace"
    assert (body["role"], body["is_active"], body["email_verified"]) == ("user", True, False)
    assert body["version"] == 1
    assert response.headers["location"] == f"{API}/users/{body['id']}"
    assert "argon2" not in response.text and PASSWORD not in response.text


async def test_email_is_normalised_and_unique_whatever_its_case(app: App) -> None:
    _, client = app
    local = f"Mixed.Case-{uuid.uuid4().hex[:8]}"
    user = await register(client, f"{local}@Example.COM")
    assert user["email"] == f"{local.lower()}@example.com"

    duplicate = await client.post(
        REGISTER_URL, json={"email": f"{local.upper()}@EXAMPLE.com", "password": PASSWORD}
    )
    body = assert_problem(duplicate, 409)
    assert "already exists" in body["detail"]
    # Signing in is case-insensitive too.
    assert (await password_grant(client, f"{local.upper()}@example.com")).status_code == 200


@pytest.mark.parametrize(
    ("password", "detail"),
    [
        ("x7Kq!zP", "at least 8"),
        ("Kq7!" * 32 + "z", "at most 128"),
        ("iloveyou", "too common"),
        ("Password123", "too common"),
        (None, "email"),  # the email itself, in other case
    ],
    ids=["7-chars", "129-chars", "common", "common-any-case", "own-email"],
)
async def test_weak_passwords_are_refused_and_nothing_is_created(
    app: App, password: str | None, detail: str
) -> None:
    fastapi_app, client = app
    email = unique_email()
    response = await client.post(
        REGISTER_URL, json={"email": email, "password": password or email.upper()}
    )
    body = assert_problem(response, 422)
    assert detail in body["detail"], body
    assert await user_row(fastapi_app, email) is None


@pytest.mark.parametrize(
    "extra",
    [{"role": "admin"}, {"is_active": False}, {"email_verified": True}, {"id": str(uuid.uuid4())}],
    ids=["role", "is_active", "email_verified", "id"],
)
async def test_unknown_fields_are_refused_and_nothing_is_created(
    app: App, extra: dict[str, Any]
) -> None:
    fastapi_app, client = app
    email = unique_email()
    response = await client.post(REGISTER_URL, json={"email": email, "password": PASSWORD, **extra})
    body = assert_problem(response, 422)
    assert [e["loc"] for e in body["errors"]] == [["body", next(iter(extra))]]
    assert await user_row(fastapi_app, email) is None


@pytest.mark.parametrize("email", ["not-an-email", "a@", "@example.com", "a b@example.com", ""])
async def test_invalid_email_is_refused(app_client: httpx.AsyncClient, email: str) -> None:
    response = await app_client.post(REGISTER_URL, json={"email": email, "password": PASSWORD})
    body = assert_problem(response, 422)
    assert ["body", "email"] in [e["loc"] for e in body["errors"]]


# --- token endpoint: password grant ---------------------------------------------------------------


async def test_password_grant_answers_per_rfc_6749(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    before = int(time.time())
    response = await password_grant(client, user["email"])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert body["token_type"] == "bearer" and body["expires_in"] == 900

    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "RS256"
    assert header["kid"] == app_services(fastapi_app).security.tokens.signing_key.kid
    claims = unverified_claims(body["access_token"])
    settings: Settings = fastapi_app.state.settings
    assert claims["sub"] == user["id"]
    uuid.UUID(claims["sid"])
    assert claims["iss"] == settings.issuer and claims["aud"] == settings.JWT_AUDIENCE
    assert before - 5 <= claims["iat"] <= int(time.time()) + 5
    assert claims["exp"] - claims["iat"] == 900

    # The refresh token is opaque (not a JWT) and carries at least 128 bits.
    assert body["refresh_token"].count(".") == 0 and len(body["refresh_token"]) >= 22
    me = await client.get(ME_URL, headers=bearer(body))
    assert me.status_code == 200 and me.json()["id"] == user["id"]


async def test_wrong_password_and_unknown_email_answer_the_same(app: App) -> None:
    _, client = app
    user = await register(client)
    wrong = await password_grant(client, user["email"], "not the right password")
    unknown = await password_grant(client, unique_email("nobody"), "not the right password")
    body = assert_oauth_error(wrong, "invalid_grant")
    assert_oauth_error(unknown, "invalid_grant")
    assert wrong.content == unknown.content
    assert "nobody" not in body["error_description"]
    drop = {"date", "content-length", "x-request-id"}  # each request has its own id
    assert {k: v for k, v in wrong.headers.items() if k not in drop} == {
        k: v for k, v in unknown.headers.items() if k not in drop
    }


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"username": "a@example.com", "password": PASSWORD}, "invalid_request"),
        ({"grant_type": "", "username": "a@example.com"}, "invalid_request"),
        ({"grant_type": "device_code"}, "unsupported_grant_type"),
        ({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"}, "unsupported_grant_type"),
        ({"grant_type": "password", "username": "a@example.com"}, "invalid_request"),
        ({"grant_type": "password", "password": PASSWORD}, "invalid_request"),
        ({"grant_type": "refresh_token"}, "invalid_request"),
        ({"grant_type": "refresh_token", "refresh_token": "garbage"}, "invalid_grant"),
    ],
    ids=[
        "no-grant",
        "empty-grant",
        "device-code",
        "jwt-bearer",
        "no-password",
        "no-username",
        "no-refresh-token",
        "unknown-refresh-token",
    ],
)
async def test_token_endpoint_errors(
    app_client: httpx.AsyncClient, data: dict[str, str], error: str
) -> None:
    assert_oauth_error(await app_client.post(TOKEN_URL, data=data), error)


async def test_json_body_is_an_invalid_request(app: App) -> None:
    _, client = app
    user = await register(client)
    response = await client.post(
        TOKEN_URL,
        json={"grant_type": "password", "username": user["email"], "password": PASSWORD},
    )
    assert_oauth_error(response, "invalid_request")


async def test_inactive_user_is_refused(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    await set_active(fastapi_app, user["id"], False)
    assert_oauth_error(await password_grant(client, user["email"]), "invalid_grant")
    await set_active(fastapi_app, user["id"], True)
    assert (await password_grant(client, user["email"])).status_code == 200


# --- token endpoint: refresh grant ----------------------------------------------------------------


async def test_refresh_rotates_the_token_within_the_session(app: App) -> None:
    _, client = app
    user = await register(client)
    first = await login(client, user["email"])

    response = await refresh_grant(client, first["refresh_token"])
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    second = response.json()
    assert set(second) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert second["refresh_token"] != first["refresh_token"]
    assert session_of(second) == session_of(first)
    assert (await client.get(ME_URL, headers=bearer(second))).status_code == 200

    third = await refresh_grant(client, second["refresh_token"])
    assert third.status_code == 200, third.text
    assert session_of(third.json()) == session_of(first)


async def test_reusing_a_refresh_token_revokes_the_session(app: App) -> None:
    _, client = app
    user = await register(client)
    other = await login(client, user["email"])  # another session: must survive
    first = await login(client, user["email"])
    second = (await refresh_grant(client, first["refresh_token"])).json()
    third = (await refresh_grant(client, second["refresh_token"])).json()
    assert (await client.get(ME_URL, headers=bearer(third))).status_code == 200  # cache warm

    # An attacker replays the token the user already rotated away.
    assert_oauth_error(await refresh_grant(client, first["refresh_token"]), "invalid_grant")

    assert_unauthenticated(await client.get(ME_URL, headers=bearer(third)))
    assert_unauthenticated(await client.get(ME_URL, headers=bearer(first)))
    assert_oauth_error(await refresh_grant(client, third["refresh_token"]), "invalid_grant")
    assert (await client.get(ME_URL, headers=bearer(other))).status_code == 200
    assert (await refresh_grant(client, other["refresh_token"])).status_code == 200


async def test_an_expired_session_cannot_be_refreshed(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    current = await login(client, user["email"])
    old = await login(client, user["email"])
    await expire_session(fastapi_app, session_of(old))

    assert_oauth_error(await refresh_grant(client, old["refresh_token"]), "invalid_grant")
    listed = (await client.get(SESSIONS_URL, headers=bearer(current))).json()
    assert [s["id"] for s in listed] == [session_of(current)]


async def test_concurrent_refreshes_with_one_token_never_both_succeed(app: App) -> None:
    _, client = app
    user = await register(client)
    tokens = await login(client, user["email"])

    racing = await asyncio.gather(
        refresh_grant(client, tokens["refresh_token"]),
        refresh_grant(client, tokens["refresh_token"]),
    )
    assert sorted(r.status_code for r in racing) == [200, 400]
    # The loser looks like a replay, so the whole session ends, the winner's tokens included.
    winner = next(r.json() for r in racing if r.status_code == 200)
    assert_unauthenticated(await client.get(ME_URL, headers=bearer(winner)))
    assert_oauth_error(await refresh_grant(client, winner["refresh_token"]), "invalid_grant")


# --- logout and sessions --------------------------------------------------------------------------


async def test_logout_takes_effect_at_once_with_the_cache_warm(
    app: App, redis_client: Redis
) -> None:
    fastapi_app, client = app
    assert connections_of(fastapi_app).redis_available
    user = await register(client)
    other = await login(client, user["email"])
    tokens = await login(client, user["email"])
    sid = session_of(tokens)
    assert (await client.get(ME_URL, headers=bearer(tokens))).status_code == 200
    # The session's "active" state is now cached: logout must not be undone by it.
    assert await redis_client.exists(session_key(uuid.UUID(sid)))

    assert (await client.post(f"{API}/auth/logout", headers=bearer(tokens))).status_code == 204
    assert_unauthenticated(await client.get(ME_URL, headers=bearer(tokens)))
    assert_unauthenticated(await client.post(f"{API}/auth/logout", headers=bearer(tokens)))
    assert_oauth_error(await refresh_grant(client, tokens["refresh_token"]), "invalid_grant")
    assert (await client.get(ME_URL, headers=bearer(other))).status_code == 200


async def test_logout_all_ends_every_session(app: App) -> None:
    _, client = app
    user = await register(client)
    sessions = [await login(client, user["email"]) for _ in range(3)]
    for tokens in sessions:
        assert (await client.get(ME_URL, headers=bearer(tokens))).status_code == 200

    response = await client.post(f"{API}/auth/logout-all", headers=bearer(sessions[0]))
    assert response.status_code == 204
    for tokens in sessions:
        assert_unauthenticated(await client.get(ME_URL, headers=bearer(tokens)))
        assert_oauth_error(await refresh_grant(client, tokens["refresh_token"]), "invalid_grant")
    assert (await password_grant(client, user["email"])).status_code == 200


async def test_logout_needs_a_token(app_client: httpx.AsyncClient) -> None:
    assert_unauthenticated(await app_client.post(f"{API}/auth/logout"))
    assert_unauthenticated(await app_client.post(f"{API}/auth/logout-all"))


async def test_sessions_are_listed_and_can_be_ended_one_by_one(app: App) -> None:
    _, client = app
    user = await register(client)
    laptop = (
        await client.post(
            TOKEN_URL,
            data={"grant_type": "password", "username": user["email"], "password": PASSWORD},
            headers={"User-Agent": "laptop-browser/1.0"},
        )
    ).json()
    phone = (
        await client.post(
            TOKEN_URL,
            data={"grant_type": "password", "username": user["email"], "password": PASSWORD},
            headers={"User-Agent": "phone-app/2.0"},
        )
    ).json()

    listed = await client.get(SESSIONS_URL, headers=bearer(laptop))
    assert listed.status_code == 200, listed.text
    sessions = {s["id"]: s for s in listed.json()}
    assert set(sessions) == {session_of(laptop), session_of(phone)}
    assert sessions[session_of(laptop)]["current"] is True
    assert sessions[session_of(phone)]["current"] is False
    assert sessions[session_of(phone)]["user_agent"] == "phone-app/2.0"
    assert set(sessions[session_of(phone)]) == {
        "id",
        "created_at",
        "last_used_at",
        "expires_at",
        "ip_address",
        "user_agent",
        "kind",
        "client_id",
        "current",
    }

    assert (await client.get(ME_URL, headers=bearer(phone))).status_code == 200  # cache warm
    ended = await client.delete(f"{SESSIONS_URL}/{session_of(phone)}", headers=bearer(laptop))
    assert ended.status_code == 204
    assert_unauthenticated(await client.get(ME_URL, headers=bearer(phone)))
    assert_oauth_error(await refresh_grant(client, phone["refresh_token"]), "invalid_grant")
    left = (await client.get(SESSIONS_URL, headers=bearer(laptop))).json()
    assert [s["id"] for s in left] == [session_of(laptop)]
    # Ended already: nothing left to end.
    again = await client.delete(f"{SESSIONS_URL}/{session_of(phone)}", headers=bearer(laptop))
    assert_problem(again, 404)


async def test_another_users_session_is_not_found(app: App) -> None:
    _, client = app
    mine = await login(client, (await register(client))["email"])
    theirs = await login(client, (await register(client))["email"])

    for target in (session_of(theirs), str(uuid.uuid4())):
        response = await client.delete(f"{SESSIONS_URL}/{target}", headers=bearer(mine))
        assert_problem(response, 404)
    assert (await client.get(ME_URL, headers=bearer(theirs))).status_code == 200
    assert_problem(await client.delete(f"{SESSIONS_URL}/not-a-uuid", headers=bearer(mine)), 422)
    assert_unauthenticated(await client.get(SESSIONS_URL))


# --- password change ------------------------------------------------------------------------------


async def test_password_change(app: App) -> None:
    _, client = app
    user = await register(client)
    current = await login(client, user["email"])
    other = await login(client, user["email"])
    assert (await client.get(ME_URL, headers=bearer(other))).status_code == 200  # cache warm
    url = f"{API}/users/me/password"
    new_password = "a brand new passphrase"

    wrong = await client.post(
        url,
        json={"current_password": "not my password", "new_password": new_password},
        headers=bearer(current),
    )
    assert "current password" in assert_problem(wrong, 400)["detail"]
    weak = await client.post(
        url,
        json={"current_password": PASSWORD, "new_password": "iloveyou"},
        headers=bearer(current),
    )
    assert_problem(weak, 422)
    # Neither attempt changed anything.
    assert (await password_grant(client, user["email"])).status_code == 200

    done = await client.post(
        url,
        json={"current_password": PASSWORD, "new_password": new_password},
        headers=bearer(current),
    )
    assert done.status_code == 204, done.text

    assert_oauth_error(await password_grant(client, user["email"]), "invalid_grant")
    assert (await password_grant(client, user["email"], new_password)).status_code == 200
    assert_unauthenticated(await client.get(ME_URL, headers=bearer(other)))
    assert_oauth_error(await refresh_grant(client, other["refresh_token"]), "invalid_grant")
    assert (await client.get(ME_URL, headers=bearer(current))).status_code == 200
    assert (await refresh_grant(client, current["refresh_token"])).status_code == 200


async def test_password_change_needs_a_token(app_client: httpx.AsyncClient) -> None:
    response = await app_client.post(
        f"{API}/users/me/password",
        json={"current_password": PASSWORD, "new_password": "a brand new passphrase"},
    )
    assert_unauthenticated(response)


# --- hash upgrade on login ------------------------------------------------------------------------


async def test_login_upgrades_an_outdated_hash_and_the_cached_user_follows(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings()) as (fastapi_app, client):
        user = await register(client)
        tokens = await login(client, user["email"])
        assert (await client.get(ME_URL, headers=bearer(tokens))).headers["etag"] == '"1"'
        row = await user_row(fastapi_app, user["email"])
        assert row is not None and row.password_hash.startswith("$argon2id$v=19$m=8192,t=1,p=1$")

    stronger = make_settings(ARGON2_TIME_COST=2, ARGON2_MEMORY_COST=19456)
    async with running_app(stronger) as (fastapi_app, client):
        assert (await password_grant(client, user["email"])).status_code == 200
        row = await user_row(fastapi_app, user["email"])
        assert row is not None and row.password_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
        assert (await password_grant(client, user["email"])).status_code == 200

        # The upgrade changed the row; what the API shows (from the cache) must follow it.
        me = await client.get(ME_URL, headers=bearer(tokens))
        assert me.json()["version"] == row.version
        assert me.headers["etag"] == f'"{row.version}"'
