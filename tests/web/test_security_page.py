"""The account's security page: adding an authenticator app from the browser (QR code drawn by
the server), recovery codes shown once, and the step-up re-prompt before further changes."""

from __future__ import annotations

import re
import time

import pyotp

from tests.support.app import PASSWORD, register
from tests.web.helpers import (
    PAGE_CSP,
    SESSION_COOKIE,
    App,
    browser_session,
    scan,
    submit,
)

SECURITY = "/account/security"


async def test_an_authenticator_is_added_and_later_changes_ask_for_it_again(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    client.cookies.set(SESSION_COOKIE, await browser_session(fastapi_app, user["email"]))

    page = await client.get(SECURITY)
    assert page.status_code == 200 and "Only your password protects" in page.text
    assert page.headers["content-security-policy"] == PAGE_CSP
    started = await submit(client, page, f"{SECURITY}/totp", {"name": "Phone"})
    assert started.status_code == 200, started.text
    # The QR code is drawn here, inline: no image from anywhere, no script, no style attribute.
    svg = started.text.split("<svg", 1)[1].split("</svg>", 1)[0]
    assert "href" not in svg and "url(" not in svg and "<script" not in svg
    assert not scan(started).scripts and not scan(started).inline_styles
    secret = re.search(r'<code class="secret">([A-Z2-7]+)</code>', started.text)
    assert secret is not None
    totp = pyotp.TOTP(secret.group(1))
    action = re.search(r'action="(/account/security/totp/[0-9a-f-]+/confirm)"', started.text)
    assert action is not None

    wrong = await submit(client, started, action.group(1), {"code": "000000"})
    assert wrong.status_code == 400 and "not valid" in wrong.text
    codes = await submit(client, wrong, action.group(1), {"code": totp.at(time.time() - 30)})
    assert codes.status_code == 200, codes.text
    shown = re.findall(r"<code>([A-Z2-7]{4}(?:-[A-Z2-7]{4}){3})</code>", codes.text)
    assert len(shown) == 10

    # The browser session signed in with the password alone: now that is not enough.
    overview = await client.get(SECURITY)
    assert "Recovery codes left: <strong>10</strong>" in overview.text
    reprompt = await submit(client, overview, f"{SECURITY}/recovery-codes", {"password": PASSWORD})
    assert reprompt.status_code == 200 and "Confirm it is you" in reprompt.text
    refused = await submit(
        client, reprompt, "/account/reauthenticate", {"password": PASSWORD, "code": "000000"}
    )
    assert refused.status_code == 400
    stepped = await submit(
        client, reprompt, "/account/reauthenticate", {"password": PASSWORD, "code": totp.now()}
    )
    assert stepped.status_code == 303 and stepped.headers["location"] == SECURITY

    overview = await client.get(SECURITY)
    renewed = await submit(client, overview, f"{SECURITY}/recovery-codes", {"password": PASSWORD})
    fresh = re.findall(r"<code>([A-Z2-7]{4}(?:-[A-Z2-7]{4}){3})</code>", renewed.text)
    assert len(fresh) == 10 and not set(fresh) & set(shown)

    overview = await client.get(SECURITY)
    factor = re.search(r'action="(/account/security/factors/([0-9a-f-]+)/remove)"', overview.text)
    assert factor is not None
    no_csrf = await submit(
        client,
        overview,
        factor.group(1),
        {f"password-{factor.group(2)}": PASSWORD},
        drop=("csrf_token",),
    )
    assert no_csrf.status_code == 403
    removed = await submit(
        client, overview, factor.group(1), {f"password-{factor.group(2)}": PASSWORD}
    )
    assert removed.status_code == 200 and "Only your password protects" in removed.text


async def test_the_security_page_needs_a_browser_session(app: App) -> None:
    _, client = app
    answer = await client.get(SECURITY)
    assert answer.status_code == 302 and answer.headers["location"] == "/account/signin"
