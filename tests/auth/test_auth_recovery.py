"""Password reset and email verification: single-use, expiring tokens handed over through events.

The tests take each token from the outbox row the mail sender would receive, as a real user would
take it from the mail.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest

from src.config.settings import Settings
from tests.auth.conftest import App
from tests.support.app import bearer, login, register, running_app, unique_email
from tests.support.auth import (
    API,
    ME_URL,
    NOTIFICATIONS_TOPIC,
    QUICK_SETTINGS,
    assert_oauth_error,
    assert_problem,
    assert_unauthenticated,
    expire_one_time_token,
    one_time_secret,
    one_time_token,
    one_time_token_row,
    outbox,
    password_grant,
    refresh_grant,
)

PUBLIC_BASE_URL = "https://accounts.ums-public.example"
RESET_REQUESTED = "user.password_reset_requested"
VERIFICATION_REQUESTED = "user.verification_requested"
RESET_REQUEST_URL = f"{API}/auth/password-reset/request"
RESET_CONFIRM_URL = f"{API}/auth/password-reset/confirm"
VERIFY_REQUEST_URL = f"{API}/auth/verify-email/request"
VERIFY_CONFIRM_URL = f"{API}/auth/verify-email/confirm"
NEW_PASSWORD = "a freshly reset passphrase"


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(
            **{**QUICK_SETTINGS, "PUBLIC_BASE_URL": PUBLIC_BASE_URL + "/", **overrides}
        )

    return factory


async def _request_reset(client: httpx.AsyncClient, email: str) -> httpx.Response:
    response = await client.post(
        RESET_REQUEST_URL, json={"email": email}, headers={"Host": "attacker.example"}
    )
    assert response.status_code == 202, response.text
    return response


async def _confirm_reset(
    client: httpx.AsyncClient, token: str, password: str = NEW_PASSWORD
) -> httpx.Response:
    return await client.post(RESET_CONFIRM_URL, json={"token": token, "new_password": password})


# --- password reset -------------------------------------------------------------------------------


async def test_reset_request_does_not_reveal_whether_the_account_exists(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    before = len(await outbox(fastapi_app, type_=RESET_REQUESTED))

    known = await _request_reset(client, user["email"].upper())
    unknown = await _request_reset(client, unique_email("nobody"))
    assert known.content == unknown.content
    assert known.headers["content-type"] == unknown.headers["content-type"]
    # Only the real account got a reset event.
    rows = await outbox(fastapi_app, type_=RESET_REQUESTED)
    assert len(rows) == before + 1 and str(rows[-1].aggregate_id) == user["id"]


def json_text(payload: dict[str, Any]) -> str:
    return json.dumps(payload)


async def test_reset_event_carries_a_link_built_from_the_configured_url(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    await _request_reset(client, user["email"])

    [event] = await outbox(fastapi_app, user["id"], RESET_REQUESTED)
    assert event.topic == NOTIFICATIONS_TOPIC
    secret = await one_time_secret(fastapi_app, user["id"], RESET_REQUESTED)
    token = secret["token"]
    assert len(token) >= 22  # at least 128 bits, base64url
    assert secret["url"] == f"{PUBLIC_BASE_URL}/account/reset-password?token={token}"
    # Stored sealed: nothing in the row is the token or the link.
    assert token not in json_text(event.payload) and token not in str(event.sealed)
    assert "attacker" not in json_text(event.payload)
    assert event.payload["email"] == user["email"]
    assert "argon2" not in json_text(event.payload)


async def test_reset_sets_the_password_and_ends_every_session(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    sessions = [await login(client, user["email"]) for _ in range(2)]
    for tokens in sessions:
        assert (await client.get(ME_URL, headers=bearer(tokens))).status_code == 200
    await _request_reset(client, user["email"])
    token = await one_time_token(fastapi_app, user["id"], RESET_REQUESTED)

    response = await _confirm_reset(client, token)
    assert response.status_code == 204, response.text
    assert response.content == b""  # a reset does not sign anyone in

    for tokens in sessions:
        assert_unauthenticated(await client.get(ME_URL, headers=bearer(tokens)))
        assert_oauth_error(await refresh_grant(client, tokens["refresh_token"]), "invalid_grant")
    assert_oauth_error(await password_grant(client, user["email"]), "invalid_grant")
    assert (await password_grant(client, user["email"], NEW_PASSWORD)).status_code == 200
    [changed] = await outbox(fastapi_app, user["id"], "user.password_changed")
    assert changed.payload["reason"] == "reset" and changed.payload["sessions_revoked"] == 2

    # Single use.
    again = await _confirm_reset(client, token, "yet another passphrase")
    assert_problem(again, 400)
    assert (await password_grant(client, user["email"], NEW_PASSWORD)).status_code == 200


async def test_a_new_request_makes_the_earlier_token_useless(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    await _request_reset(client, user["email"])
    first = await one_time_token(fastapi_app, user["id"], RESET_REQUESTED)
    await _request_reset(client, user["email"])
    second = await one_time_token(fastapi_app, user["id"], RESET_REQUESTED)
    assert first != second

    assert_problem(await _confirm_reset(client, first), 400)
    assert (await _confirm_reset(client, second)).status_code == 204


async def test_a_weak_new_password_does_not_spend_the_token(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    await _request_reset(client, user["email"])
    token = await one_time_token(fastapi_app, user["id"], RESET_REQUESTED)

    for weak in ("short", "iloveyou", user["email"]):
        assert_problem(await _confirm_reset(client, token, weak), 422)
    assert (await _confirm_reset(client, token)).status_code == 204


@pytest.mark.parametrize("token", ["not-a-token", "x" * 512])
async def test_unknown_reset_tokens_are_refused(app_client: httpx.AsyncClient, token: str) -> None:
    assert_problem(await _confirm_reset(app_client, token), 400)


async def test_an_expired_reset_token_is_refused(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(PASSWORD_RESET_TOKEN_EXPIRE_MINUTES=1)
    async with running_app(settings) as (fastapi_app, client):
        user = await register(client)
        await _request_reset(client, user["email"])
        token = await one_time_token(fastapi_app, user["id"], RESET_REQUESTED)
        row = await one_time_token_row(fastapi_app, token)
        assert abs(row.expires_at - row.created_at - timedelta(minutes=1)) < timedelta(seconds=1)

        await expire_one_time_token(fastapi_app, token)
        assert_problem(await _confirm_reset(client, token), 400)
        assert (await password_grant(client, user["email"])).status_code == 200


# --- email verification ---------------------------------------------------------------------------


async def test_registration_asks_for_verification_and_confirm_verifies(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    tokens = await login(client, user["email"])
    assert (await client.get(ME_URL, headers=bearer(tokens))).json()["email_verified"] is False

    [event] = await outbox(fastapi_app, user["id"], VERIFICATION_REQUESTED)
    assert event.topic == NOTIFICATIONS_TOPIC
    secret = await one_time_secret(fastapi_app, user["id"], VERIFICATION_REQUESTED)
    token = secret["token"]
    assert secret["url"] == f"{PUBLIC_BASE_URL}/account/verify-email?token={token}"

    response = await client.post(VERIFY_CONFIRM_URL, json={"token": token})
    assert response.status_code == 200, response.text
    assert response.json()["email_verified"] is True
    # Visible on the very next request, although the user was cached before.
    assert (await client.get(ME_URL, headers=bearer(tokens))).json()["email_verified"] is True
    assert len(await outbox(fastapi_app, user["id"], "user.email_verified")) == 1

    assert_problem(await client.post(VERIFY_CONFIRM_URL, json={"token": token}), 400)
    assert_problem(await client.post(VERIFY_CONFIRM_URL, json={"token": "not-a-token"}), 400)


async def test_verification_request(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    first = await one_time_token(fastapi_app, user["id"], VERIFICATION_REQUESTED)

    known = await client.post(VERIFY_REQUEST_URL, json={"email": user["email"]})
    unknown = await client.post(VERIFY_REQUEST_URL, json={"email": unique_email("nobody")})
    assert known.status_code == unknown.status_code == 202
    assert known.content == unknown.content
    second = await one_time_token(fastapi_app, user["id"], VERIFICATION_REQUESTED)
    assert second != first

    assert_problem(await client.post(VERIFY_CONFIRM_URL, json={"token": first}), 400)
    assert (await client.post(VERIFY_CONFIRM_URL, json={"token": second})).status_code == 200
    # Verified already: a request answers the same and sends nothing.
    again = await client.post(VERIFY_REQUEST_URL, json={"email": user["email"]})
    assert again.status_code == 202 and again.content == known.content
    assert len(await outbox(fastapi_app, user["id"], VERIFICATION_REQUESTED)) == 2


async def test_recovery_endpoints_refuse_malformed_bodies(app_client: httpx.AsyncClient) -> None:
    for url, body in [
        (RESET_REQUEST_URL, {"email": "not-an-email"}),
        (RESET_REQUEST_URL, {"email": "a@example.com", "extra": 1}),
        (RESET_CONFIRM_URL, {"token": "x"}),
        (RESET_CONFIRM_URL, {"token": "", "new_password": NEW_PASSWORD}),
        (VERIFY_REQUEST_URL, {}),
        (VERIFY_CONFIRM_URL, {"token": "x", "email_verified": True}),
    ]:
        assert_problem(await app_client.post(url, json=body), 422)
