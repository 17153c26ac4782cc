"""The admin console over HTTP, in-process: the sign-in (code flow, PKCE, sealed cookies), the
refusals (a non-admin, a missing CSRF token, a forged state), and that each action goes through
the admin API and is attributed to the admin. The browser test (test_admin_browser.py) covers
what only a browser shows; this one covers the rules, quickly."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pyotp
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import Response

from src.app.container import app_services
from src.config.settings import Settings
from src.db.models import OAuthClient, UserSession
from src.oauth.clients import CONSOLE_CLIENT_ID
from src.web import csrf
from src.web.admin.session import read_tokens, set_tokens
from tests.support.app import PASSWORD, bearer, login, register, running_app, unique_email
from tests.support.auth import outbox
from tests.web.helpers import attributes, cookie_header, form_at, scan

BASE = "http://console.test"
ADMIN_PASSWORD = "admin password for the console"
TOKENS_COOKIE, PENDING_COOKIE = "ums_admin", "ums_admin_signin"

Console = tuple[FastAPI, httpx.AsyncClient, str]


@pytest_asyncio.fixture
async def console_app(
    make_settings: Callable[..., Settings], clean_db: None
) -> AsyncIterator[Console]:
    admin_email = unique_email("admin")
    settings = make_settings(
        PUBLIC_BASE_URL=BASE, FIRST_ADMIN_EMAIL=admin_email, FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD
    )
    async with running_app(settings) as (app, _):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            yield app, client, admin_email


def _path(location: str) -> str:
    parts = urlsplit(location)
    return parts.path + (f"?{parts.query}" if parts.query else "")


async def sign_in(
    client: httpx.AsyncClient,
    email: str,
    password: str,
    *,
    base: str = BASE,
    pending_cookie: str = PENDING_COOKIE,
) -> httpx.Response:
    """From /admin to the console's answer at the callback, as a browser would go."""
    first = await client.get("/admin/users?q=x")
    assert first.status_code == 303, first.text
    assert first.headers["location"].startswith("/admin/signin?")
    start = await client.get(first.headers["location"])
    assert start.status_code == 302
    authorize = start.headers["location"]
    query = parse_qs(urlsplit(authorize).query)
    assert query["client_id"] == [CONSOLE_CLIENT_ID]
    assert query["code_challenge_method"] == ["S256"]
    assert query["redirect_uri"] == [f"{base}/admin/callback"]
    pending = attributes(cookie_header(start, pending_cookie))
    assert pending["httponly"] is True and pending["samesite"] == "lax"
    page = await client.get(_path(authorize))
    assert page.status_code == 200, page.text
    fields = form_at(page, "/account/signin").fields
    answer = await client.post(
        "/account/signin", data={**fields, "email": email, "password": password}
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"].startswith(f"{base}/admin/callback?")
    return await client.get(_path(answer.headers["location"]))


async def test_an_admin_signs_in_and_the_tokens_stay_on_the_server(console_app: Console) -> None:
    _, client, admin_email = console_app
    done = await sign_in(client, admin_email, ADMIN_PASSWORD)
    assert done.status_code == 200, done.text
    # The page moves on by itself to where the admin was going.
    assert 'http-equiv="refresh" content="0;url=/admin/users?q=x"' in done.text
    tokens = attributes(cookie_header(done, TOKENS_COOKIE))
    assert tokens["httponly"] is True and tokens["samesite"] == "strict", tokens
    value = client.cookies[TOKENS_COOKIE]
    # Sealed: no token readable in it, and none in the page.
    assert not re.search(r"eyJ[A-Za-z0-9_-]{10,}", value)
    assert "access_token" not in done.text and "eyJ" not in done.text
    found = await client.get("/admin/users", params={"q": admin_email})
    assert found.status_code == 200, found.text
    assert admin_email in found.text
    assert found.headers["content-security-policy"].startswith("default-src 'none'")
    assert "script-src 'self'" in found.headers["content-security-policy"]
    # Not part of the API's schema.
    schema = (await client.get("/api/v1/openapi.json")).json()
    assert not [path for path in schema["paths"] if path.startswith("/admin")]


async def test_a_non_admin_is_refused_and_its_tokens_revoked(console_app: Console) -> None:
    app, client, _ = console_app
    user = await register(client, unique_email("plain"))
    refused = await sign_in(client, user["email"], PASSWORD)
    assert refused.status_code == 403, refused.text
    assert "Administrators only" in refused.text
    assert TOKENS_COOKIE not in client.cookies
    async with app_services(app).sessionmaker() as db:
        rows = (
            await db.execute(
                select(UserSession).where(
                    UserSession.user_id == uuid.UUID(user["id"]),
                    UserSession.client_id == CONSOLE_CLIENT_ID,
                )
            )
        ).scalars()
        assert [row.revoked_at is not None for row in rows] == [True]
    again = await client.get("/admin/users")
    assert again.status_code == 303 and again.headers["location"].startswith("/admin/signin")


async def test_a_callback_without_the_pending_sign_in_is_refused(console_app: Console) -> None:
    _, client, _ = console_app
    answer = await client.get("/admin/callback", params={"code": "x", "state": "forged"})
    assert answer.status_code == 400
    assert "Sign-in expired" in answer.text


async def test_revoke_and_deactivate_go_through_the_api_and_name_the_admin(
    console_app: Console,
) -> None:
    app, client, admin_email = console_app
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    user = await register(client, unique_email("target"))
    uid = user["id"]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=BASE
    ) as elsewhere:
        await login(elsewhere, user["email"])
    page = await client.get(f"/admin/users/{uid}")
    assert page.status_code == 200, page.text
    revoke_actions = [f.action for f in scan(page).forms if f.action.endswith("/revoke")]
    assert len(revoke_actions) == 1, revoke_actions
    # Without the CSRF token: refused, nothing changes.
    refused = await client.post(revoke_actions[0], data={})
    assert refused.status_code == 403
    revoked = await client.post(revoke_actions[0], data=form_at(page, revoke_actions[0]).fields)
    assert revoked.status_code == 303, revoked.text
    assert revoked.headers["location"] == f"/admin/users/{uid}?done=revoked"
    after = await client.get(revoked.headers["location"])
    assert "The session was revoked." in after.text
    assert not [f for f in scan(after).forms if f.action.endswith("/revoke")]

    action = f"/admin/users/{uid}/deactivate"
    deactivated = await client.post(action, data=form_at(after, action).fields)
    assert deactivated.status_code == 303, deactivated.text
    shown = await client.get(deactivated.headers["location"])
    assert "Deactivated" in shown.text
    action = f"/admin/users/{uid}/activate"
    activated = await client.post(action, data=form_at(shown, action).fields)
    assert activated.status_code == 303, activated.text

    admin_id = await _user_id(client, admin_email, app)
    events: dict[str, Any] = {row.type: row.payload for row in await outbox(app, uid)}
    for kind in ("user.session_revoked", "user.deactivated", "user.activated"):
        assert events[kind]["actor_id"] == admin_id, (kind, events[kind])


async def _user_id(client: httpx.AsyncClient, email: str, app: FastAPI) -> str:
    tokens = await login(client, email, ADMIN_PASSWORD)
    me = await client.get("/api/v1/users/me", headers=bearer(tokens))
    return str(me.json()["id"])


async def test_the_console_client_is_ensured_at_start_up(console_app: Console) -> None:
    app, _, _ = console_app
    async with app_services(app).sessionmaker() as db:
        client = (
            await db.execute(select(OAuthClient).where(OAuthClient.client_id == CONSOLE_CLIENT_ID))
        ).scalar_one()
    assert client.first_party and client.client_type == "public"
    assert client.redirect_uris == [f"{BASE}/admin/callback"]


async def test_create_reset_and_delete_with_typed_confirmation(console_app: Console) -> None:
    app, client, admin_email = console_app
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    admin_id = await _user_id(client, admin_email, app)

    form = await client.get("/admin/users/new")
    assert form.status_code == 200, form.text
    fields = form_at(form, "/admin/users/new").fields
    weak = await client.post(
        "/admin/users/new", data={**fields, "email": "not an address", "password": "x"}
    )
    assert weak.status_code == 422
    assert 'role="alert"' in weak.text and "not an address" in weak.text
    email = unique_email("made")
    created = await client.post(
        "/admin/users/new",
        data={**fields, "email": email, "password": PASSWORD, "full_name": "Made Here"},
    )
    assert created.status_code == 303, created.text
    location = created.headers["location"]
    uid = location.split("/")[3].split("?")[0]
    page = await client.get(location)
    assert "The account was created." in page.text and email in page.text

    action = f"/admin/users/{uid}/password-reset"
    sent = await client.post(action, data=form_at(page, action).fields)
    assert sent.status_code == 303 and sent.headers["location"].endswith("done=reset-sent")
    [reset] = await outbox(app, uid, "user.password_reset_requested")
    assert reset.payload["actor_id"] == admin_id
    [registered] = await outbox(app, uid, "user.registered")
    assert registered.payload["actor_id"] == admin_id

    confirm = await client.get(f"/admin/users/{uid}/delete")
    assert confirm.status_code == 200
    delete_fields = form_at(confirm, f"/admin/users/{uid}/delete").fields
    wrong = await client.post(
        f"/admin/users/{uid}/delete", data={**delete_fields, "confirm": "someone else"}
    )
    assert wrong.status_code == 400 and "type its email address" in wrong.text
    assert (await client.get(f"/admin/users/{uid}")).status_code == 200
    deleted = await client.post(
        f"/admin/users/{uid}/delete", data={**delete_fields, "confirm": email.upper()}
    )
    assert deleted.status_code == 303, deleted.text
    [event] = await outbox(app, uid, "user.deleted")
    assert event.payload["actor_id"] == admin_id
    gone = await client.get(f"/admin/users/{uid}")
    assert gone.status_code == 404 and "No such user" in gone.text


async def test_clients_keys_and_events_screens(console_app: Console) -> None:
    _, client, admin_email = console_app
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    new = await client.get("/admin/clients/new")
    fields = form_at(new, "/admin/clients/new").fields
    bad = await client.post(
        "/admin/clients/new",
        data={**fields, "name": "Bad", "redirect_uris": "http://evil.example/cb"},
    )
    assert bad.status_code == 422 and "use https" in bad.text
    made = await client.post(
        "/admin/clients/new",
        data={
            **fields,
            "name": "Print shop",
            "client_id": "print-shop",
            "client_type": "public",
            "redirect_uris": "https://print.example/cb\n\nhttps://print.example/cb2",
        },
    )
    assert made.status_code == 200, made.text
    assert "A public client has no secret" in made.text
    edit = await client.get("/admin/clients/print-shop")
    edit_fields = form_at(edit, "/admin/clients/print-shop").fields
    saved = await client.post(
        "/admin/clients/print-shop",
        data={**edit_fields, "redirect_uris": "https://print.example/only"},
    )
    assert saved.status_code == 303, saved.text
    admin = bearer(await login(client, admin_email, ADMIN_PASSWORD))
    listed = await client.get("/api/v1/clients/print-shop", headers=admin)
    assert listed.json()["redirect_uris"] == ["https://print.example/only"]
    delete_action = "/admin/clients/print-shop/delete"
    edit = await client.get("/admin/clients/print-shop")
    delete_fields = form_at(edit, delete_action).fields
    kept = await client.post(delete_action, data={**delete_fields, "confirm": "print"})
    assert kept.status_code == 400
    gone = await client.post(delete_action, data={**delete_fields, "confirm": "print-shop"})
    assert gone.status_code == 303 and gone.headers["location"].endswith("client-deleted")
    assert (await client.get("/admin/clients/print-shop")).status_code == 404
    assert (await client.get("/admin/clients/no%20such")).status_code == 404

    keys = await client.get("/admin/keys")
    rotate = form_at(keys, "/admin/keys/rotate").fields
    refused = await client.post("/admin/keys/rotate", data=rotate)
    assert refused.status_code == 409 and "Rotation refused" in refused.text
    forced = await client.post("/admin/keys/rotate", data={**rotate, "force": "on"})
    assert forced.status_code == 303 and forced.headers["location"].endswith("key-rotated")

    events = await client.get("/admin/events", params={"type": "user.registered"})
    assert events.status_code == 200, events.text
    unknown = await client.get("/admin/events", params={"user": "nobody@example.com"})
    assert unknown.status_code == 400 and "No account has the address" in unknown.text
    bad_time = await client.get("/admin/events", params={"since": "yesterday"})
    assert bad_time.status_code == 400

    health = await client.get("/admin/health/panel")
    assert health.status_code == 200 and 'data-check="database"' in health.text


def _stale_tokens(app: FastAPI, client: httpx.AsyncClient) -> str:
    """The console cookie as it would be once its access token has expired."""
    sealer = app_services(app).security.sealer
    settings = app_services(app).settings
    request = Request(
        {
            "type": "http",
            "headers": [(b"cookie", f"{TOKENS_COOKIE}={client.cookies[TOKENS_COOKIE]}".encode())],
        }
    )
    tokens = read_tokens(request, sealer, settings)
    assert tokens is not None
    tokens.expires_at = 0
    response = Response()
    set_tokens(response, sealer, settings, tokens)
    header = response.headers["set-cookie"]
    return header.split(";", 1)[0].split("=", 1)[1]


async def test_an_expired_access_token_is_refreshed_once_for_concurrent_requests(
    console_app: Console,
) -> None:
    app, client, admin_email = console_app
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    stale = _stale_tokens(app, client)
    client.cookies.set(TOKENS_COOKIE, stale)
    # Two requests with the same expired token at once (a page and the health panel): both are
    # served, and the refresh token is not presented twice (which would end the session).
    first, second = await asyncio.gather(
        client.get("/admin/users"), client.get("/admin/health/panel")
    )
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    fresh = {cookie_header(r, TOKENS_COOKIE).split(";")[0] for r in (first, second)}
    assert len(fresh) == 2  # sealed twice (random nonce), the same tokens inside
    client.cookies.set(TOKENS_COOKIE, fresh.pop().split("=", 1)[1])
    assert (await client.get("/admin/users")).status_code == 200
    async with app_services(app).sessionmaker() as db:
        console_sessions = (
            (
                await db.execute(
                    select(UserSession).where(UserSession.client_id == CONSOLE_CLIENT_ID)
                )
            )
            .scalars()
            .all()
        )
    assert [s.revoked_at for s in console_sessions] == [None]


async def test_a_change_the_api_wants_a_fresh_sign_in_for_asks_for_the_password_again(
    console_app: Console,
) -> None:
    _, client, admin_email = console_app
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    user = await register(client, unique_email("target"))
    page = await client.get(f"/admin/users/{user['id']}")
    # The admin enrols a second factor: the console's sign-in (password only) is no longer
    # strong enough for an admin write (step-up).
    api = bearer(await login(client, admin_email, ADMIN_PASSWORD))
    started = await client.post("/api/v1/users/me/mfa/totp", json={"name": "Phone"}, headers=api)
    secret = started.json()["secret"]
    confirm = f"/api/v1/users/me/mfa/totp/{started.json()['factor_id']}/confirm"
    code = {"code": pyotp.TOTP(secret).now()}
    assert (await client.post(confirm, json=code, headers=api)).status_code == 200
    action = f"/admin/users/{user['id']}/deactivate"
    answer = await client.post(action, data=form_at(page, action).fields)
    assert answer.status_code == 303, answer.text
    location = answer.headers["location"]
    assert location.startswith("/admin/signin?")
    query = parse_qs(urlsplit(location).query)
    assert query == {"next": [f"/admin/users/{user['id']}"], "again": ["1"]}
    start = await client.get(location)
    assert parse_qs(urlsplit(start.headers["location"]).query)["prompt"] == ["login"]
    # Nothing changed.
    assert (await client.get(f"/api/v1/users/{user['id']}", headers=api)).json()["is_active"]


ADMIN_TEMPLATES = sorted((Path(csrf.__file__).parent / "templates" / "admin").glob("*.html"))


@pytest.mark.parametrize("path", ADMIN_TEMPLATES, ids=lambda p: p.name)
def test_console_templates_hold_nothing_the_policy_refuses(path: Path) -> None:
    """As tests/web/test_templates.py checks the hosted pages: no inline script, style or
    handler; every URL a path on this service; every POST form with its CSRF token."""
    text = path.read_text()
    external = '<script src="{{ src }}" defer></script>'
    assert "<script" not in text.lower().replace(external.lower(), "")
    assert "<style" not in text.lower()
    assert re.search(r"\sstyle\s*=", text, re.IGNORECASE) is None
    assert re.search(r"\son[a-z]+\s*=", text, re.IGNORECASE) is None
    assert "javascript:" not in text.lower()
    for url in re.findall(r'(?:href|src|action)="([^"{]+)"', text):
        assert url.startswith("/") or url.startswith("#"), url
    assert text.count('method="post"') == text.count("ui.csrf(csrf_token)")
    assert text.count("<form") == text.count('method="post"') + text.count('method="get"')


async def test_the_health_panel_script_is_told_to_sign_in_rather_than_redirected(
    console_app: Console,
) -> None:
    _, client, _ = console_app
    fragment = await client.get("/admin/health/panel", headers={"X-Admin-Fragment": "1"})
    assert fragment.status_code == 401 and fragment.text == ""
    page = await client.get("/admin/health/panel")
    assert page.status_code == 303 and page.headers["location"].startswith("/admin/signin?")


async def test_second_factors_are_listed_and_reset_in_the_admins_name(
    console_app: Console,
) -> None:
    app, client, admin_email = console_app
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    user = await register(client, unique_email("lost-phone"))
    auth = bearer(await login(client, user["email"]))
    started = await client.post(
        "/api/v1/users/me/mfa/totp", json={"name": "Old phone"}, headers=auth
    )
    confirm = f"/api/v1/users/me/mfa/totp/{started.json()['factor_id']}/confirm"
    code = {"code": pyotp.TOTP(started.json()["secret"]).now()}
    assert (await client.post(confirm, json=code, headers=auth)).status_code == 200
    page = await client.get(f"/admin/users/{user['id']}")
    assert "Old phone" in page.text and "10 unused recovery codes" in page.text
    action = f"/admin/users/{user['id']}/factors/reset"
    reset = await client.post(action, data=form_at(page, action).fields)
    assert reset.status_code == 303 and reset.headers["location"].endswith("done=factors-reset")
    after = await client.get(reset.headers["location"])
    assert "Old phone" not in after.text and "signs in with its password only" in after.text
    [event] = await outbox(app, user["id"], "user.mfa_reset")
    assert event.payload["actor_id"] == await _user_id(client, admin_email, app)


async def test_sign_out_revokes_the_tokens_so_a_copy_of_the_cookie_is_useless(
    console_app: Console,
) -> None:
    app, client, admin_email = console_app
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    copy = client.cookies[TOKENS_COOKIE]
    page = await client.get("/admin/users")
    out = await client.post("/admin/signout", data=form_at(page, "/admin/signout").fields)
    assert out.status_code == 200 and "Signed out of the console" in out.text
    assert TOKENS_COOKIE not in client.cookies
    client.cookies.set(TOKENS_COOKIE, copy)
    again = await client.get("/admin/users")
    assert again.status_code == 303 and again.headers["location"].startswith("/admin/signin")
    # Even once expired and refreshed: the refresh token died with the session.
    client.cookies.set(TOKENS_COOKIE, _stale_tokens(app, client))
    stale = await client.get("/admin/users")
    assert stale.status_code == 303 and stale.headers["location"].startswith("/admin/signin")


async def test_over_https_the_cookies_are_host_only_and_secure(
    make_settings: Callable[..., Settings], clean_db: None
) -> None:
    base = "https://console.example"
    admin_email = unique_email("admin")
    settings = make_settings(
        PUBLIC_BASE_URL=base, FIRST_ADMIN_EMAIL=admin_email, FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD
    )
    async with running_app(settings) as (app, _):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base) as client:
            done = await sign_in(
                client,
                admin_email,
                ADMIN_PASSWORD,
                base=base,
                pending_cookie="__Host-ums_admin_signin",
            )
            assert done.status_code == 200, done.text
            tokens = attributes(cookie_header(done, "__Host-ums_admin"))
            assert tokens["secure"] is True and tokens["path"] == "/" and "domain" not in tokens
            assert tokens["samesite"] == "strict" and tokens["httponly"] is True
            assert (await client.get("/admin/users")).status_code == 200
