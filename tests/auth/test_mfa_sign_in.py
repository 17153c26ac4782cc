"""Signing in to an account with a second factor: the password grant's mfa_required answer and
its follow-up grant (with a stock OAuth2 client), the hosted pages' second step, and ``amr``."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pyotp
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError
from fastapi import FastAPI

from src.auth.challenge import BROWSER, issue_ticket, open_ticket
from src.auth.signin import MFA_GRANT
from src.db.types import utcnow
from tests.support.app import PASSWORD, bearer, register, unique_email
from tests.support.auth import client_from, outbox, password_grant, unverified_claims
from tests.support.oidc import (
    ISSUER,
    authorize_query,
    create_client,
    exchange,
    form_posting_to,
    pkce_pair,
    query_of,
    register_client,
)

TOKEN_URL = f"{ISSUER}/oauth2/token"


class Enrolled:
    """A user whose authenticator was confirmed with the code of the previous time step, so the
    codes of this step and the next are still unused (each step works once; ±1 step of drift):
    ``next_code`` gives them in turn — two sign-ins; recovery codes for more."""

    def __init__(self, email: str, secret: str, recovery_codes: list[str]) -> None:
        self.email = email
        self.totp = pyotp.TOTP(secret)
        self.recovery_codes = recovery_codes
        self._step = -1

    def next_code(self) -> str:
        self._step += 1
        assert self._step <= 1, "only two unused steps are within the drift: use recovery codes"
        return self.totp.at(time.time() + 30 * self._step)


async def enrolled_user(client: httpx.AsyncClient) -> Enrolled:
    email = unique_email("mfa")
    await register(client, email)
    api = bearer((await password_grant(client, email, PASSWORD)).json())
    started = await client.post("/api/v1/users/me/mfa/totp", json={"name": "Phone"}, headers=api)
    assert started.status_code == 201, started.text
    body = started.json()
    confirm = await client.post(
        f"/api/v1/users/me/mfa/totp/{body['factor_id']}/confirm",
        json={"code": pyotp.TOTP(body["secret"]).at(time.time() - 30)},
        headers=api,
    )
    assert confirm.status_code == 200, confirm.text
    return Enrolled(email, body["secret"], confirm.json()["recovery_codes"])


async def test_the_password_grant_asks_for_the_second_factor_with_a_stock_client(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    app, client, _ = provider
    user = await enrolled_user(client)
    await register_client(app, "cli")  # first-party, public, with the password grant
    async with AsyncOAuth2Client(
        client_id="cli",
        token_endpoint_auth_method="none",
        transport=httpx.ASGITransport(app=app),
        base_url=ISSUER,
    ) as oauth:
        with pytest.raises(OAuthError) as refused:
            await oauth.fetch_token(TOKEN_URL, username=user.email, password=PASSWORD)
        assert refused.value.error == "mfa_required"
        # The stock client keeps error and description only; the token is in the same answer.
        answer = await oauth.request(
            "POST",
            TOKEN_URL,
            data={
                "grant_type": "password",
                "username": user.email,
                "password": PASSWORD,
                "client_id": "cli",
            },
            withhold_token=True,
        )
        assert answer.status_code == 400 and answer.headers["cache-control"] == "no-store"
        mfa_token = answer.json()["mfa_token"]
        token = await oauth.fetch_token(
            TOKEN_URL, grant_type=MFA_GRANT, mfa_token=mfa_token, otp=user.next_code()
        )
        assert unverified_claims(token["access_token"])["amr"] == ["pwd", "otp", "mfa"]
        me = await oauth.get(f"{ISSUER}/api/v1/users/me")
        assert me.status_code == 200 and me.json()["email"] == user.email

        # A recovery code completes it too, once; its amr says no "otp".
        mfa_token = (
            await oauth.request(
                "POST",
                TOKEN_URL,
                data={
                    "grant_type": "password",
                    "username": user.email,
                    "password": PASSWORD,
                    "client_id": "cli",
                },
                withhold_token=True,
            )
        ).json()["mfa_token"]
        data = {"grant_type": MFA_GRANT, "mfa_token": mfa_token}
        data["client_id"] = "cli"
        first = await client.post(
            "/oauth2/token", data={**data, "recovery_code": user.recovery_codes[0]}
        )
        assert first.status_code == 200, first.text
        assert unverified_claims(first.json()["access_token"])["amr"] == ["pwd", "mfa"]
        again = await client.post(
            "/oauth2/token", data={**data, "recovery_code": user.recovery_codes[0]}
        )
        assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


async def test_the_follow_up_grant_refuses_bad_codes_and_foreign_tokens(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    app, client, admin = provider
    user = await enrolled_user(client)
    answer = await password_grant(client, user.email, PASSWORD)
    assert answer.json()["error"] == "mfa_required"
    mfa_token = answer.json()["mfa_token"]
    for bad in ("000000", "", "x" * 65):
        refused = await client.post(
            "/oauth2/token", data={"grant_type": MFA_GRANT, "mfa_token": mfa_token, "otp": bad}
        )
        assert refused.status_code == 400, refused.text
    # The token is bound to where the password was given: not to a client, not to the pages.
    cli = await create_client(client, admin, grant_types=["password"], name="CLI")
    foreign = await client.post(
        "/oauth2/token",
        data={"grant_type": MFA_GRANT, "mfa_token": mfa_token, "otp": "123456"},
        auth=(cli["client_id"], cli["client_secret"]),
    )
    assert foreign.json()["error"] == "invalid_grant"
    sec = app.state.services.security
    me = unverified_claims(
        (
            await client.post(
                "/oauth2/token",
                data={"grant_type": MFA_GRANT, "mfa_token": mfa_token, "otp": user.next_code()},
            )
        ).json()["access_token"]
    )
    assert open_ticket(sec, mfa_token, BROWSER) is None
    stale = issue_ticket(sec, uuid.UUID(me["sub"]), "own-api", now=utcnow() - timedelta(minutes=6))
    expired = await client.post(
        "/oauth2/token",
        data={"grant_type": MFA_GRANT, "mfa_token": stale, "otp": user.recovery_codes[0]},
    )
    assert expired.json()["error"] == "invalid_grant"
    forged = await client.post(
        "/oauth2/token",
        data={"grant_type": MFA_GRANT, "mfa_token": mfa_token[:-4] + "AAAA", "otp": "123456"},
    )
    assert forged.json()["error"] == "invalid_grant"


async def test_the_hosted_pages_ask_for_the_code_after_the_password(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    app, client, admin = provider
    user = await enrolled_user(client)
    registered = await create_client(client, admin)
    verifier, challenge = pkce_pair()
    page = await client.get(
        f"/oauth2/authorize?{authorize_query(registered['client_id'], challenge)}"
    )
    fields = form_posting_to(page.text, "/account/signin")
    second = await client.post(
        "/account/signin", data={**fields, "email": user.email, "password": PASSWORD}
    )
    assert second.status_code == 200, second.text
    assert "set-cookie" not in second.headers or "ums_session" not in second.headers["set-cookie"]
    step: dict[str, Any] = form_posting_to(second.text, "/account/signin/second-factor")
    wrong = await client.post("/account/signin/second-factor", data={**step, "code": "000000"})
    assert wrong.status_code == 400 and "not valid" in wrong.text
    done = await client.post(
        "/account/signin/second-factor", data={**step, "code": user.next_code()}
    )
    assert done.status_code == 303, done.text
    code = query_of(done.headers["location"])["code"]
    tokens = (
        await exchange(client, code, verifier, registered["client_id"], registered["client_secret"])
    ).json()
    id_claims = app.state.services.security.tokens.decode_id_token_hint(tokens["id_token"])
    assert id_claims["amr"] == ["pwd", "otp", "mfa"]
    assert unverified_claims(tokens["access_token"])["amr"] == ["pwd", "otp", "mfa"]

    # A ticket is no way around the form's CSRF token, and a tampered one starts over.
    no_csrf = await client.post(
        "/account/signin/second-factor", data={**step, "csrf_token": "", "code": "123456"}
    )
    assert no_csrf.status_code == 403
    tampered = await client.post(
        "/account/signin/second-factor",
        data={**step, "ticket": step["ticket"][:-4] + "AAAA", "code": "123456"},
    )
    assert tampered.status_code == 400 and 'action="/account/signin"' in tampered.text


async def test_a_sign_in_with_a_second_factor_from_a_new_address_is_noticed_once(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    """The new-address notice belongs to the completed sign-in: not to the password step alone
    (that may never be followed by a code), and not lost when a code follows."""
    app, client, _ = provider
    user = await enrolled_user(client)  # signed in once from the in-process address
    async with client_from(app) as elsewhere:
        answer = await password_grant(elsewhere, user.email, PASSWORD)
        assert answer.json()["error"] == "mfa_required"
        assert not await outbox(app, None, "user.new_sign_in")
        done = await elsewhere.post(
            "/oauth2/token",
            data={
                "grant_type": MFA_GRANT,
                "mfa_token": answer.json()["mfa_token"],
                "otp": user.next_code(),
            },
        )
        assert done.status_code == 200, done.text
    notices = [
        row
        for row in await outbox(app, None, "user.new_sign_in")
        if row.payload["email"] == user.email
    ]
    assert len(notices) == 1
