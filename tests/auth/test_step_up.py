"""Step-up (RFC 9470): sensitive changes need a recent sign-in, with the second factor when the
user has one; ``POST /auth/reauthenticate`` brings a session up to date."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pyotp
from fastapi import FastAPI

from src.app.container import app_services
from tests.auth.conftest import App
from tests.conftest import ADMIN_PASSWORD
from tests.support.app import PASSWORD, bearer, login, register
from tests.support.auth import outbox, password_grant, session_of, unverified_claims

AdminApp = tuple[FastAPI, httpx.AsyncClient, dict[str, str]]
EMAIL_URL = "/api/v1/users/me/email"
REAUTH_URL = "/api/v1/auth/reauthenticate"


def aged(app: FastAPI, tokens: dict[str, Any], seconds: int) -> dict[str, str]:
    """The same session's access token, as if its sign-in happened ``seconds`` ago."""
    claims = unverified_claims(tokens["access_token"])
    token, _ = app_services(app).security.tokens.issue(
        uuid.UUID(claims["sub"]),
        uuid.UUID(session_of(tokens)),
        claims["role"],
        amr=claims.get("amr"),
        auth_time=int(time.time()) - seconds,
    )
    return bearer(token)


def assert_step_up(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="insufficient_user_authentication"' in challenge
    assert 'max_age="600"' in challenge


async def test_an_old_session_changing_its_email_is_challenged_until_it_re_authenticates(
    app: App,
) -> None:
    fastapi_app, client = app
    user = await register(client)
    tokens = await login(client, user["email"])
    assert unverified_claims(tokens["access_token"])["auth_time"] <= int(time.time())
    old = aged(fastapi_app, tokens, 601)
    body = {"new_email": f"moved-{uuid.uuid4().hex[:8]}@example.com", "current_password": PASSWORD}
    assert_step_up(await client.post(EMAIL_URL, json=body, headers=old))
    # Reading is not sensitive: the same token still works there.
    assert (await client.get("/api/v1/users/me", headers=old)).status_code == 200

    wrong = await client.post(REAUTH_URL, json={"current_password": "not it"}, headers=old)
    assert wrong.status_code == 400
    # Each refusal is in the user's trail: the challenged change and the wrong password.
    reasons = [
        e.payload["reason"] for e in await outbox(fastapi_app, user["id"], "user.step_up_failed")
    ]
    assert reasons == ["too_old", "wrong_password"]
    fresh = await client.post(REAUTH_URL, json={"current_password": PASSWORD}, headers=old)
    assert fresh.status_code == 200, fresh.text
    assert fresh.headers["cache-control"] == "no-store"
    renewed = fresh.json()
    assert "refresh_token" not in renewed
    assert session_of(renewed) == session_of(tokens)
    assert (await client.post(EMAIL_URL, json=body, headers=bearer(renewed))).status_code == 202
    # A token of an earlier time of the session stays old: step-up is per token, not a flag.
    assert_step_up(await client.post(EMAIL_URL, json=body, headers=old))


async def test_the_password_and_deletion_need_a_recent_sign_in(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    tokens = await login(client, user["email"])
    old = aged(fastapi_app, tokens, 3600)
    change = {"current_password": PASSWORD, "new_password": "another long passphrase 42"}
    assert_step_up(await client.post("/api/v1/users/me/password", json=change, headers=old))
    delete = {"current_password": PASSWORD}
    assert_step_up(await client.request("DELETE", "/api/v1/users/me", json=delete, headers=old))
    # Within the window, as before.
    recent = aged(fastapi_app, tokens, 60)
    answer = await client.post("/api/v1/users/me/password", json=change, headers=recent)
    assert answer.status_code == 204, answer.text


async def test_every_admin_write_needs_a_recent_sign_in(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    me = (await client.get("/api/v1/users/me", headers=admin)).json()
    tokens = await login(client, me["email"], ADMIN_PASSWORD)
    old = aged(app, tokens, 601)
    assert (await client.get("/api/v1/users", headers=old)).status_code == 200
    target = await register(client)
    new_user = {"email": f"made-{uuid.uuid4().hex[:8]}@example.com", "password": PASSWORD}
    assert_step_up(await client.post("/api/v1/users", json=new_user, headers=old))
    patch = {"full_name": "Renamed"}
    assert_step_up(await client.patch(f"/api/v1/users/{target['id']}", json=patch, headers=old))
    assert_step_up(await client.delete(f"/api/v1/users/{target['id']}", headers=old))
    app_client = {"name": "App", "redirect_uris": ["https://app.example.com/cb"]}
    assert_step_up(await client.post("/api/v1/clients", json=app_client, headers=old))
    # Nothing happened; with a recent sign-in it does.
    assert (await client.get(f"/api/v1/users/{target['id']}", headers=admin)).json()[
        "full_name"
    ] is None
    done = await client.patch(f"/api/v1/users/{target['id']}", json=patch, headers=admin)
    assert done.status_code == 200, done.text


async def test_once_a_second_factor_is_enrolled_only_a_sign_in_with_it_is_strong_enough(
    app: App,
) -> None:
    _, client = app
    user = await register(client)
    tokens = await login(client, user["email"])
    api = bearer(tokens)
    started = (
        await client.post("/api/v1/users/me/mfa/totp", json={"name": "Phone"}, headers=api)
    ).json()
    totp = pyotp.TOTP(started["secret"])
    confirmed = await client.post(
        f"/api/v1/users/me/mfa/totp/{started['factor_id']}/confirm",
        json={"code": totp.at(time.time() - 30)},
        headers=api,
    )
    assert confirmed.status_code == 200, confirmed.text
    # This session signed in with the password alone: recent, but no longer strong enough.
    change = {"current_password": PASSWORD, "new_password": "another long passphrase 42"}
    assert_step_up(await client.post("/api/v1/users/me/password", json=change, headers=api))
    no_code = await client.post(REAUTH_URL, json={"current_password": PASSWORD}, headers=api)
    assert no_code.status_code == 400
    stepped = await client.post(
        REAUTH_URL,
        json={"current_password": PASSWORD, "code": totp.now()},
        headers=api,
    )
    assert stepped.status_code == 200, stepped.text
    assert unverified_claims(stepped.json()["access_token"])["amr"] == ["pwd", "otp", "mfa"]
    answer = await client.post(
        "/api/v1/users/me/password", json=change, headers=bearer(stepped.json())
    )
    assert answer.status_code == 204, answer.text


async def test_an_admin_resets_the_factors_of_a_user_who_lost_them(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    user = await register(client)
    tokens = await login(client, user["email"])
    api = bearer(tokens)
    started = (
        await client.post("/api/v1/users/me/mfa/totp", json={"name": "Lost"}, headers=api)
    ).json()
    confirm = {"code": pyotp.TOTP(started["secret"]).now()}
    url = f"/api/v1/users/me/mfa/totp/{started['factor_id']}/confirm"
    assert (await client.post(url, json=confirm, headers=api)).status_code == 200
    assert (await login_answer(client, user["email"])).json()["error"] == "mfa_required"

    # Not the user's own business, and not with an old admin sign-in.
    me = (await client.get("/api/v1/users/me", headers=admin)).json()
    old = aged(app, await login(client, me["email"], ADMIN_PASSWORD), 601)
    assert_step_up(await client.delete(f"/api/v1/users/{user['id']}/mfa", headers=old))
    refused = await client.delete(f"/api/v1/users/{user['id']}/mfa", headers=api)
    assert refused.status_code == 403
    missing = await client.delete(f"/api/v1/users/{uuid.uuid4()}/mfa", headers=admin)
    assert missing.status_code == 404

    done = await client.delete(f"/api/v1/users/{user['id']}/mfa", headers=admin)
    assert done.status_code == 204, done.text
    # Every session of the user ended; the password alone signs in again.
    assert (await client.get("/api/v1/users/me", headers=api)).status_code == 401
    assert (await login_answer(client, user["email"])).status_code == 200
    overview = await client.get(
        "/api/v1/users/me/mfa", headers=bearer((await login_answer(client, user["email"])).json())
    )
    assert overview.json() == {"factors": [], "recovery_codes_left": 0}
    [event] = await outbox(app, user["id"], "user.mfa_reset")
    assert event.payload["actor_id"] == me["id"] and event.payload["factors_removed"] == 1
    assert event.payload["sessions_revoked"] >= 1


async def login_answer(client: httpx.AsyncClient, email: str) -> httpx.Response:
    return await password_grant(client, email, PASSWORD)
