"""Sensitive changes need a fresh proof of identity; an email change needs the new address too.

The attack these close: with a stolen access token alone, change the account's email to one the
attacker reads, request a password reset there, and own the account (or simply delete it). Links
are taken from the sealed notifications, as the mail courier would send them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from src.config.settings import Settings
from tests.auth.conftest import App
from tests.support.app import PASSWORD, bearer, login, register, running_app, unique_email
from tests.support.auth import (
    API,
    ME_URL,
    QUICK_SETTINGS,
    TOKEN_URL,
    assert_oauth_error,
    assert_problem,
    assert_unauthenticated,
    client_from,
    one_time_secret,
    one_time_token,
    outbox,
    password_grant,
    refresh_grant,
)

EMAIL_URL = f"{API}/users/me/email"
CONFIRM_URL = f"{API}/auth/email-change/confirm"
UNDO_URL = f"{API}/auth/email-change/undo"
CHANGE_REQUESTED = "user.email_change_requested"
CHANGE_NOTICE = "user.email_change_notice"
NEW_SIGN_IN = "user.new_sign_in"
PUBLIC_BASE_URL = "https://accounts.example.test"
NEW_PASSWORD = "a freshly chosen passphrase"


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**QUICK_SETTINGS, "PUBLIC_BASE_URL": PUBLIC_BASE_URL, **overrides})

    return factory


async def _signed_in(client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, str]]:
    user = await register(client)
    return user, bearer(await login(client, user["email"]))


async def _me(client: httpx.AsyncClient, auth: dict[str, str]) -> dict[str, Any]:
    response = await client.get(ME_URL, headers=auth)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _request_change(
    client: httpx.AsyncClient, auth: dict[str, str], new_email: str, password: str = PASSWORD
) -> httpx.Response:
    return await client.post(
        EMAIL_URL, json={"new_email": new_email, "current_password": password}, headers=auth
    )


# --- the stolen token ---------------------------------------------------------------------------


async def test_a_stolen_token_alone_can_neither_move_nor_delete_the_account(app: App) -> None:
    fastapi_app, client = app
    user, auth = await _signed_in(client)
    attacker_address = unique_email("attacker")

    refused = [
        await client.patch(ME_URL, json={"email": attacker_address}, headers=auth),
        await client.patch(
            f"{API}/users/{user['id']}", json={"email": attacker_address}, headers=auth
        ),
        await client.post(EMAIL_URL, json={"new_email": attacker_address}, headers=auth),
        await _request_change(client, auth, attacker_address, "a guessed password"),
        await client.delete(ME_URL, headers=auth),
        await client.request("DELETE", ME_URL, json={"current_password": "guess"}, headers=auth),
        await client.delete(f"{API}/users/{user['id']}", headers=auth),
    ]
    assert [r.status_code for r in refused] == [422, 422, 422, 400, 422, 400, 422]
    for response in refused:
        assert_problem(response, response.status_code)
    assert "POST /api/v1/users/me/email" in refused[0].json()["detail"]
    assert await _me(client, auth) == user
    assert not await outbox(fastapi_app, user["id"], CHANGE_REQUESTED)


async def test_guessing_the_password_for_a_sensitive_change_locks_out_like_login(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings(LOCKOUT_FAILURE_THRESHOLD=3)) as (_, client):
        user, auth = await _signed_in(client)
        for _ in range(3):
            assert_problem(await _request_change(client, auth, unique_email(), "guess!"), 400)
        locked = await _request_change(client, auth, unique_email())
        assert_problem(locked, 429)
        assert int(locked.headers["retry-after"]) >= 1
        deleting = {"current_password": PASSWORD}
        assert_problem(await client.request("DELETE", ME_URL, json=deleting, headers=auth), 429)
        assert (await _me(client, auth))["email"] == user["email"]


# --- the email change flow ----------------------------------------------------------------------


async def test_an_email_change_takes_effect_only_when_the_new_address_confirms(app: App) -> None:
    fastapi_app, client = app
    user, auth = await _signed_in(client)
    other_device = bearer(await login(client, user["email"]))
    new_email = unique_email("moved")

    response = await _request_change(client, auth, new_email.upper())
    assert response.status_code == 202, response.text
    # Nothing changed yet: the account still signs in with, and shows, the old address.
    assert (await _me(client, auth))["email"] == user["email"]
    assert_oauth_error(await password_grant(client, new_email), "invalid_grant")
    [request] = await outbox(fastapi_app, user["id"], CHANGE_REQUESTED)
    assert request.payload["email"] == new_email  # the mail goes to the new address
    link = await one_time_secret(fastapi_app, user["id"], CHANGE_REQUESTED)
    assert link["url"] == f"{PUBLIC_BASE_URL}/account/confirm-email-change?token={link['token']}"

    confirmed = await client.post(CONFIRM_URL, json={"token": link["token"]})
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.json()["email"] == new_email and confirmed.json()["email_verified"] is True
    # Sessions go on (the change was the user's own), and see the new address at once.
    for device in (auth, other_device):
        assert (await _me(client, device))["email"] == new_email
    assert (await password_grant(client, new_email)).status_code == 200
    assert_oauth_error(await password_grant(client, user["email"]), "invalid_grant")
    # Single use.
    assert_problem(await client.post(CONFIRM_URL, json={"token": link["token"]}), 400)

    # The old address is told, with a way back.
    [notice] = await outbox(fastapi_app, user["id"], CHANGE_NOTICE)
    assert notice.payload["email"] == user["email"] and notice.payload["new_email"] == new_email
    undo = await one_time_secret(fastapi_app, user["id"], CHANGE_NOTICE)
    assert undo["url"] == f"{PUBLIC_BASE_URL}/account/undo-email-change?token={undo['token']}"
    updated = (await outbox(fastapi_app, user["id"], "user.updated"))[-1]
    assert updated.payload["previous_email"] == user["email"]


async def test_undo_takes_the_address_back_and_ends_every_session(app: App) -> None:
    """The owner's old address undoes a change someone else made with the password."""
    fastapi_app, client = app
    user, auth = await _signed_in(client)
    tokens = await login(client, user["email"])
    attacker_address = unique_email("attacker")
    assert (await _request_change(client, auth, attacker_address)).status_code == 202
    link = await one_time_token(fastapi_app, user["id"], CHANGE_REQUESTED)
    assert (await client.post(CONFIRM_URL, json={"token": link})).status_code == 200
    # The attacker asks for a reset at the new address...
    await client.post(f"{API}/auth/password-reset/request", json={"email": attacker_address})
    stolen_reset = await one_time_token(fastapi_app, user["id"], "user.password_reset_requested")

    undo = await one_time_token(fastapi_app, user["id"], CHANGE_NOTICE)
    response = await client.post(UNDO_URL, json={"token": undo})
    assert response.status_code == 204, response.text

    # Every session ended; the attacker's reset link is dead; the password (which whoever made
    # the change knew) no longer signs anyone in.
    assert_unauthenticated(await client.get(ME_URL, headers=auth))
    assert_oauth_error(await refresh_grant(client, tokens["refresh_token"]), "invalid_grant")
    confirm = {"token": stolen_reset, "new_password": "the attacker's password"}
    assert_problem(await client.post(f"{API}/auth/password-reset/confirm", json=confirm), 400)
    assert_oauth_error(await password_grant(client, user["email"]), "invalid_grant")
    assert_problem(await client.post(UNDO_URL, json={"token": undo}), 400)  # single use
    # A reset link went to the restored address: the owner sets a new password and is back.
    reset = (await outbox(fastapi_app, user["id"], "user.password_reset_requested"))[-1]
    assert reset.payload["email"] == user["email"]
    me = await _reset_and_sign_in(fastapi_app, client, user)
    assert me["email"] == user["email"] and me["email_verified"] is True


async def _reset_and_sign_in(
    fastapi_app: Any, client: httpx.AsyncClient, user: dict[str, Any]
) -> dict[str, Any]:
    link = await one_time_token(fastapi_app, user["id"], "user.password_reset_requested")
    confirm = {"token": link, "new_password": NEW_PASSWORD}
    assert (
        await client.post(f"{API}/auth/password-reset/confirm", json=confirm)
    ).status_code == 204
    return await _me(client, bearer(await login(client, user["email"], NEW_PASSWORD)))


async def test_an_address_left_behind_is_kept_for_its_owner(app: App) -> None:
    """While the undo link lives, nobody may register the old address (the undo would then have
    nowhere to go), nor move another account to it."""
    fastapi_app, client = app
    user, auth = await _signed_in(client)
    assert (await _request_change(client, auth, unique_email("moved"))).status_code == 202
    link = await one_time_token(fastapi_app, user["id"], CHANGE_REQUESTED)
    assert (await client.post(CONFIRM_URL, json={"token": link})).status_code == 200
    squatter = {"email": user["email"], "password": "the squatter's password"}
    assert_problem(await client.post(f"{API}/auth/register", json=squatter), 409)
    _, other = await _signed_in(client)
    assert_problem(await _request_change(client, other, user["email"]), 409)
    # The owner itself may go back to it.
    assert (await _request_change(client, auth, user["email"])).status_code == 202


async def test_the_first_owners_undo_link_survives_later_changes(app: App) -> None:
    """An attacker with the password moves the account twice (A -> B -> C) and uses the undo
    link that reached B: the owner's link at A still takes it back to A."""
    fastapi_app, client = app
    user, auth = await _signed_in(client)
    first, second = unique_email("attacker-b"), unique_email("attacker-c")
    undo_links: list[str] = []
    for address in (first, second):
        assert (await _request_change(client, auth, address)).status_code == 202
        link = await one_time_token(fastapi_app, user["id"], CHANGE_REQUESTED)
        assert (await client.post(CONFIRM_URL, json={"token": link})).status_code == 200
        undo_links.append(await one_time_token(fastapi_app, user["id"], CHANGE_NOTICE))
    owners_link, attackers_link = undo_links

    assert (await client.post(UNDO_URL, json={"token": attackers_link})).status_code == 204
    assert (await client.post(UNDO_URL, json={"token": owners_link})).status_code == 204
    assert (await _reset_and_sign_in(fastapi_app, client, user))["email"] == user["email"]
    # Both links are spent now.
    for used in undo_links:
        assert_problem(await client.post(UNDO_URL, json={"token": used}), 400)


async def test_an_address_taken_meanwhile_is_a_conflict_and_nothing_changes(app: App) -> None:
    fastapi_app, client = app
    user, auth = await _signed_in(client)
    wanted = unique_email("wanted")
    assert (await _request_change(client, auth, wanted)).status_code == 202
    link = await one_time_token(fastapi_app, user["id"], CHANGE_REQUESTED)
    await register(client, email=wanted)
    assert_problem(await client.post(CONFIRM_URL, json={"token": link}), 409)
    assert (await _me(client, auth))["email"] == user["email"]
    assert_problem(await _request_change(client, auth, wanted), 409)


async def test_look_alike_and_unchanged_addresses_are_refused(app: App) -> None:
    _, client = app
    user, auth = await _signed_in(client)
    cyrillic_a = "\u0430"
    for address in (f"p{cyrillic_a}ypal@example.com", "\uff55ser@example.com"):
        assert_problem(await _request_change(client, auth, address), 422)
    assert_problem(await _request_change(client, auth, user["email"].upper()), 422)


async def test_a_newer_request_replaces_the_older_link(app: App) -> None:
    fastapi_app, client = app
    user, auth = await _signed_in(client)
    assert (await _request_change(client, auth, unique_email("first"))).status_code == 202
    first = await one_time_token(fastapi_app, user["id"], CHANGE_REQUESTED)
    second_address = unique_email("second")
    assert (await _request_change(client, auth, second_address)).status_code == 202
    second = await one_time_token(fastapi_app, user["id"], CHANGE_REQUESTED)
    assert_problem(await client.post(CONFIRM_URL, json={"token": first}), 400)
    confirmed = await client.post(CONFIRM_URL, json={"token": second})
    assert confirmed.status_code == 200 and confirmed.json()["email"] == second_address


# --- deleting the account -----------------------------------------------------------------------


async def test_deleting_your_account_needs_your_password(app: App) -> None:
    fastapi_app, client = app
    user, auth = await _signed_in(client)
    wrong = {"current_password": "not it"}
    assert_problem(await client.request("DELETE", ME_URL, json=wrong, headers=auth), 400)
    assert (await _me(client, auth))["id"] == user["id"]
    right = {"current_password": PASSWORD}
    assert (await client.request("DELETE", ME_URL, json=right, headers=auth)).status_code == 204
    assert_unauthenticated(await client.get(ME_URL, headers=auth))
    [deleted] = await outbox(fastapi_app, user["id"], "user.deleted")
    assert deleted.payload["actor_id"] == user["id"]


# --- a sign-in from somewhere new -----------------------------------------------------------------


async def test_a_sign_in_from_a_new_address_is_mailed_to_the_owner(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings()) as (fastapi_app, client):
        user = await register(client)
        async with client_from(fastapi_app, "198.51.100.1") as home:
            await login(home, user["email"])  # the first sign-in: expected, nothing to say
            await login(home, user["email"])  # the same address again: nothing either
        assert not await outbox(fastapi_app, user["id"], NEW_SIGN_IN)
        async with client_from(fastapi_app, "203.0.113.9") as elsewhere:
            response = await elsewhere.post(
                TOKEN_URL,
                data={"grant_type": "password", "username": user["email"], "password": PASSWORD},
                headers={"User-Agent": "Strange Browser/1.0"},
            )
            assert response.status_code == 200
        [notice] = await outbox(fastapi_app, user["id"], NEW_SIGN_IN)
        assert notice.payload["email"] == user["email"]
        assert notice.payload["ip"] == "203.0.113.9"
        assert notice.payload["user_agent"] == "Strange Browser/1.0"
        assert notice.sealed is None  # a notice, no link

    async with running_app(make_settings(NOTIFY_NEW_SIGN_IN=False)) as (fastapi_app, client):
        user = await register(client)
        await login(client, user["email"])
        async with client_from(fastapi_app) as elsewhere:
            await login(elsewhere, user["email"])
        assert not await outbox(fastapi_app, user["id"], NEW_SIGN_IN)


async def test_asking_which_addresses_are_taken_is_throttled(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings(MAIL_RATE_LIMIT_PER_IP=3)) as (fastapi_app, client):
        taken = [(await register(client))["email"] for _ in range(2)]
        async with client_from(fastapi_app) as elsewhere:
            _, auth = await _signed_in(elsewhere)
            answers = [
                (await _request_change(elsewhere, auth, email)).status_code for email in taken
            ]
            answers += [(await _request_change(elsewhere, auth, taken[0])).status_code]
            answers += [(await _request_change(elsewhere, auth, unique_email())).status_code]
        assert answers == [409, 409, 409, 429]
