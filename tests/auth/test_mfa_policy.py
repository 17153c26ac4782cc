"""MFA_REQUIRED: who must have a second factor, and how a sign-in without one is turned into
setting one up."""

from __future__ import annotations

import time

import pyotp

from tests.conftest import SettingsFactory
from tests.support.app import PASSWORD, bearer, register, running_app, unique_email
from tests.support.auth import password_grant
from tests.support.oidc import authorize_query, create_client, form_posting_to, pkce_pair

ADMIN_PASSWORD = "admin password for tests"
ENROL_FIRST = "/account/security?required=1"


async def test_admins_must_set_up_a_second_factor_before_the_password_grant_works(
    make_settings: SettingsFactory, clean_db: None
) -> None:
    admin_email = unique_email("admin")
    settings = make_settings(
        MFA_REQUIRED="admins", FIRST_ADMIN_EMAIL=admin_email, FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD
    )
    async with running_app(settings) as (_, client):
        refused = await password_grant(client, admin_email, ADMIN_PASSWORD)
        assert refused.status_code == 400
        assert refused.json()["error"] == "mfa_enrollment_required"
        # Users are not concerned.
        user = await register(client)
        assert (await password_grant(client, user["email"], PASSWORD)).status_code == 200

        # The hosted pages sign the admin in and send them to set one up.
        page = await client.get("/account/signin")
        fields = form_posting_to(page.text, "/account/signin")
        signed_in = await client.post(
            "/account/signin",
            data={**fields, "email": admin_email, "password": ADMIN_PASSWORD},
        )
        assert signed_in.status_code == 303 and signed_in.headers["location"] == ENROL_FIRST
        security = await client.get(ENROL_FIRST)
        assert "must have a second factor" in security.text
        started = await client.post(
            "/account/security/totp",
            data={**form_posting_to(security.text, "/account/security/totp"), "name": "Phone"},
        )
        secret = started.text.split('<code class="secret">', 1)[1].split("<", 1)[0]
        action = started.text.split('action="/account/security/totp/', 1)[1].split('"', 1)[0]
        confirm_url = f"/account/security/totp/{action}"
        fields = form_posting_to(started.text, confirm_url)
        codes = await client.post(
            confirm_url, data={**fields, "code": pyotp.TOTP(secret).at(time.time() - 30)}
        )
        assert codes.status_code == 200, codes.text

        # From now on the password grant asks for the second factor, as for anyone who has one.
        answer = await password_grant(client, admin_email, ADMIN_PASSWORD)
        assert answer.json()["error"] == "mfa_required"


async def test_when_everyone_must_an_authorization_waits_for_the_enrolment(
    make_settings: SettingsFactory, clean_db: None
) -> None:
    admin_email = unique_email("admin")
    base = make_settings(FIRST_ADMIN_EMAIL=admin_email, FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD)
    async with running_app(base) as (_, setup):
        admin = bearer((await password_grant(setup, admin_email, ADMIN_PASSWORD)).json())
        registered = await create_client(setup, admin, redirect_uris=["https://app.example.com/cb"])
        user = await register(setup)
    async with running_app(make_settings(MFA_REQUIRED="everyone")) as (_, client):
        _, challenge = pkce_pair()
        query = authorize_query(
            registered["client_id"], challenge, redirect_uri="https://app.example.com/cb"
        )
        page = await client.get(f"/oauth2/authorize?{query}")
        fields = form_posting_to(page.text, "/account/signin")
        answer = await client.post(
            "/account/signin", data={**fields, "email": user["email"], "password": PASSWORD}
        )
        assert answer.status_code == 303 and answer.headers["location"] == ENROL_FIRST
        silent = await client.get(f"/oauth2/authorize?{query}&prompt=none")
        assert silent.status_code == 302
        assert "error=interaction_required" in silent.headers["location"]
