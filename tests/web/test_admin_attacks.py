"""The admin console attacked as a skilled outsider would: open redirects through ``next``,
login CSRF through the OAuth ``state``, CSRF and clickjacking, script injection through what users
and events hold, forged, stale and foreign console cookies, an admin demoted or deactivated while
signed in, the new admin API without the right token, forged filters and cursors, and twenty
copies of one action at once. Each attack either fails for the attacker here, or was a finding
whose fix this file holds in place (docs/admin-console.md, "Security properties")."""

from __future__ import annotations

import asyncio
import base64
import html
import secrets
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from src.app.container import app_services
from src.config.settings import Settings
from src.db.models import AuditEvent, UserSession
from src.main import create_app
from src.oauth.clients import CONSOLE_CLIENT_ID
from src.security.sealing import Sealer
from src.web.admin import keys as keys_screen
from src.web.admin.session import read_pending, safe_next
from tests.support.app import PASSWORD, bearer, login, register, unique_email
from tests.support.auth import assert_problem, outbox
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.oidc import live_server
from tests.support.servers import free_port
from tests.web.helpers import cookie_header, form_at
from tests.web.test_admin_browser import sign_in as browser_sign_in
from tests.web.test_admin_console import (
    ADMIN_PASSWORD,
    BASE,
    PENDING_COOKIE,
    TOKENS_COOKIE,
    Console,
    _path,
    sign_in,
)
from tests.web.test_admin_console import console_app as console_app  # the fixture

API = "/api/v1"
PARALLEL = 20
EVIL = "\"><img src=x onerror=alert(1)><script>alert('x')</script>"


def browser(app: FastAPI) -> httpx.AsyncClient:
    """Another browser: its own cookie jar, same service."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


def sent_to_signin(response: httpx.Response) -> bool:
    location = response.headers.get("location", "")
    return response.status_code == 303 and location.startswith("/admin/signin?")


def assert_readable_page(response: httpx.Response, status: int) -> str:
    """A console error: an HTML page with the status, the pages' headers, no trace of code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/html"), response.headers
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"
    text = response.text
    for leak in ("Traceback", 'File "', "Error:", "sqlalchemy", "asyncpg"):
        assert leak not in text, leak
    return text


async def admin_bearer(client: httpx.AsyncClient, email: str) -> dict[str, str]:
    return bearer(await login(client, email, ADMIN_PASSWORD))


async def csrf_fields(client: httpx.AsyncClient) -> dict[str, str]:
    """The CSRF field of this browser (every console page's sign-out form has it)."""
    page = await client.get("/admin/users")
    return form_at(page, "/admin/signout").fields


# --- next and state ------------------------------------------------------------------------------

NEXT_ATTACKS = [
    "//evil.example",
    "https://evil.example/admin",
    "/\\evil.example",
    "/admin\\@evil.example",
    "%2F%2Fevil.example",
    "/%2F%2Fevil.example",
    "///evil.example/admin",
    "/admin\r\nSet-Cookie: x=1",
    "/admin\nLocation: //evil.example",
    "/admin/\u2215\u2215evil.example",
    "/admin/users\t//evil.example",
    "javascript:alert(1)//admin",
    " /admin",
    "/admin/" + "a" * 5000,
    "",
]


def test_next_is_a_console_path_or_the_users_screen() -> None:
    for value in NEXT_ATTACKS:
        kept = safe_next(value)
        assert kept == "/admin/users", (value, kept)
    for value in ("/admin", "/admin/users?q=a%20b&role=admin", "/admin/users/1/delete"):
        assert safe_next(value) == value


async def test_next_is_sealed_as_a_console_path_only(console_app: Console) -> None:
    app, client, _ = console_app
    services = app_services(app)
    for value in NEXT_ATTACKS:
        start = await client.get("/admin/signin", params={"next": value})
        assert start.status_code == 302
        # Only the authorization endpoint of this service, never where ``next`` pointed.
        assert start.headers["location"].startswith("/oauth2/authorize?"), value
        request = Request(
            {
                "type": "http",
                "headers": [
                    (b"cookie", f"{PENDING_COOKIE}={client.cookies[PENDING_COOKIE]}".encode())
                ],
            }
        )
        pending = read_pending(request, services.security.sealer, services.settings)
        assert pending is not None and pending.next == "/admin/users", (value, pending)


async def _callback_url(client: httpx.AsyncClient, email: str, password: str) -> str:
    """Sign in on the hosted pages up to the console's callback URL, without following it."""
    start = await client.get("/admin/signin", params={"next": "/admin/keys"})
    page = await client.get(_path(start.headers["location"]))
    fields = form_at(page, "/account/signin").fields
    answer = await client.post(
        "/account/signin", data={**fields, "email": email, "password": password}
    )
    assert answer.status_code == 303, answer.text
    location: str = answer.headers["location"]
    assert location.startswith(f"{BASE}/admin/callback?")
    return _path(location)


async def test_login_csrf_another_browsers_callback_signs_nobody_in(
    console_app: Console,
) -> None:
    """The attacker (an admin elsewhere) hands the victim's browser the callback URL of the
    attacker's own sign-in: the victim's browser must not end up in the attacker's console, and
    the state and code are worth nothing afterwards."""
    app, attacker, admin_email = console_app
    url = await _callback_url(attacker, admin_email, ADMIN_PASSWORD)
    async with browser(app) as victim:
        # A victim with no sign-in under way, and one with its own.
        refused = await victim.get(url)
        assert_readable_page(refused, 400)
        assert "Sign-in expired" in refused.text and TOKENS_COOKIE not in victim.cookies
        await victim.get("/admin/signin")
        refused = await victim.get(url)
        assert_readable_page(refused, 400)
        assert TOKENS_COOKIE not in victim.cookies
        # The victim's own state with the attacker's code: PKCE binds the code to the attacker.
        attackers = parse_qs(urlsplit(url).query)
        victim_start = await victim.get("/admin/signin")
        own_state = parse_qs(urlsplit(victim_start.headers["location"]).query)["state"][0]
        swapped = "/admin/callback?" + urlencode({"code": attackers["code"][0], "state": own_state})
        answer = await victim.get(swapped)
        assert_readable_page(answer, 400)
        assert "Sign-in failed" in answer.text and TOKENS_COOKIE not in victim.cookies
    # The attacker's own browser completes its sign-in; replaying the callback (its pending
    # cookie put back) does not sign in again: the code is spent.
    pending_copy = attacker.cookies[PENDING_COOKIE]
    done = await attacker.get(url)
    assert done.status_code == 200 and TOKENS_COOKIE in attacker.cookies
    signed_in_cookie = attacker.cookies[TOKENS_COOKIE]
    assert (await attacker.get("/admin/keys")).status_code == 200
    # Forged and over-long states, with the pending sign-in put back.
    for state in ("", "x", "A" * 5000, parse_qs(urlsplit(url).query)["state"][0] + "x"):
        attacker.cookies.set(PENDING_COOKIE, pending_copy)
        forged = await attacker.get("/admin/callback", params={"code": "x", "state": state})
        assert_readable_page(forged, 400)
    attacker.cookies.set(PENDING_COOKIE, pending_copy)
    replayed = await attacker.get(url)
    assert_readable_page(replayed, 400)
    # A replayed code also ends the session it had opened (RFC 6749, 4.1.2).
    attacker.cookies.set(TOKENS_COOKIE, signed_in_cookie)
    assert sent_to_signin(await attacker.get("/admin/keys"))


# --- CSRF, methods and framing -------------------------------------------------------------------


async def test_every_write_refuses_a_missing_wrong_or_foreign_csrf_token(
    console_app: Console,
) -> None:
    app, client, admin_email = console_app
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    user = await register(client, unique_email("target"))
    uid = user["id"]
    async with browser(app) as other:
        await other.get("/account/signin")  # any page of this site gives it its CSRF cookie
        foreign = other.cookies["ums_csrf"]
    assert foreign != client.cookies["ums_csrf"]
    writes = [
        f"/admin/users/{uid}/deactivate",
        f"/admin/users/{uid}/activate",
        f"/admin/users/{uid}/password-reset",
        f"/admin/users/{uid}/factors/reset",
        f"/admin/users/{uid}/sessions/{uuid.uuid4()}/revoke",
        f"/admin/users/{uid}/delete",
        "/admin/users/new",
        "/admin/clients/new",
        "/admin/clients/some-client",
        "/admin/clients/some-client/delete",
        "/admin/keys/rotate",
        "/admin/signout",
    ]
    for action in writes:
        for token in (None, "", "x" * 43, foreign, secrets.token_urlsafe(32)):
            data = {"confirm": user["email"], "force": "on", "email": unique_email("m")}
            if token is not None:
                data["csrf_token"] = token
            refused = await client.post(action, data=data)
            assert refused.status_code == 403, (action, token, refused.status_code)
            assert "This form has expired" in assert_readable_page(refused, 403), action
        # A link or an image (GET) never changes anything either: a readable 405 page.
        if not action.endswith(("/new", "/delete")) and "/some-client" not in action:
            got = await client.get(action)
            assert got.status_code == 405, (action, got.status_code)
            assert_readable_page(got, 405)
            assert "POST" in got.headers["allow"], action
    api = await admin_bearer(client, admin_email)
    after = (await client.get(f"{API}/users/{uid}", headers=api)).json()
    assert after["is_active"] is True
    assert await outbox(app, uid, "user.password_reset_requested") == []
    # Still signed in: the refused sign-outs did nothing.
    assert (await client.get("/admin/users")).status_code == 200


async def test_console_pages_cannot_be_framed_cached_or_sniffed(console_app: Console) -> None:
    app, client, admin_email = console_app
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    user = await register(client, unique_email("target"))
    pages = [
        "/admin/users",
        f"/admin/users/{user['id']}",
        f"/admin/users/{user['id']}/delete",
        "/admin/users/new",
        "/admin/clients",
        "/admin/clients/new",
        f"/admin/clients/{CONSOLE_CLIENT_ID}",
        "/admin/keys",
        "/admin/events",
        "/admin/health",
        "/admin/health/panel",
        f"/admin/users/{uuid.uuid4()}",
        "/admin/no-such-page",
    ]
    for path in pages:
        answer = await client.get(path)
        assert answer.status_code in (200, 404), (path, answer.status_code)
        policy = answer.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy, path
        assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy, path
        assert answer.headers["x-frame-options"] == "DENY", path
        assert answer.headers["cache-control"] == "no-store", path
        assert answer.headers["x-content-type-options"] == "nosniff", path
        assert answer.headers["referrer-policy"] == "no-referrer", path
    async with browser(app) as anonymous:
        for path in [*pages, "/admin/signin", "/admin/callback"]:
            answer = await anonymous.get(path)
            assert answer.headers["x-frame-options"] == "DENY", path
            assert "frame-ancestors 'none'" in answer.headers["content-security-policy"], path


# --- injection through what the console shows ---------------------------------------------------


async def _add_event(app: FastAPI, user_id: uuid.UUID | None, type_: str, data: Any) -> None:
    async with app_services(app).sessionmaker() as db:
        offset = int(datetime.now(UTC).timestamp() * 1_000_000)
        db.add(
            AuditEvent(
                event_id=uuid.uuid4(),
                type=type_,
                user_id=user_id,
                source="/tests",
                time=datetime.now(UTC),
                data=data,
                topic="user-events",
                partition=0,
                offset=offset,
            )
        )
        await db.commit()


async def test_names_addresses_and_event_data_are_shown_as_text(console_app: Console) -> None:
    app, client, admin_email = console_app
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    api = await admin_bearer(client, admin_email)
    made = await client.post(
        f"{API}/users",
        json={"email": unique_email("xss"), "password": PASSWORD, "full_name": EVIL},
        headers=api,
    )
    assert made.status_code == 201, made.text
    uid = made.json()["id"]
    # A redirect URI that is a javascript: URL, or a name with a bidi override: refused.
    for name, uri in (("App", "javascript:alert(1)"), ("App \u202e", "https://app.example/cb")):
        refused = await client.post(
            f"{API}/clients",
            json={"name": name, "client_type": "public", "redirect_uris": [uri]},
            headers=api,
        )
        assert_problem(refused, 422)
    # Markup in a client's name and redirect URI is kept, and shown as text.
    quoted = await client.post(
        f"{API}/clients",
        json={
            "name": EVIL,
            "client_type": "public",
            "redirect_uris": ['https://app.example/cb?a="><script>alert(1)</script>'],
        },
        headers=api,
    )
    assert quoted.status_code == 201, quoted.text
    # Events read back from Kafka: whatever their data holds, including an actor that is no id.
    for actor in (EVIL, "../../keys", 42, None, ["x"], {"a": 1}):
        await _add_event(
            app, uuid.UUID(uid), "user.updated", {"email": EVIL, "actor_id": actor, "x": EVIL}
        )
    await _add_event(app, None, EVIL[:64], {"client_id": EVIL, "actor_id": str(uuid.uuid4())})
    pages = [
        f"/admin/users/{uid}",
        "/admin/users?" + urlencode({"q": made.json()["email"]}),
        f"/admin/users/{uid}/delete",
        "/admin/events",
        "/admin/events?" + urlencode({"user": uid}),
        "/admin/events?" + urlencode({"user": EVIL, "since": EVIL, "until": EVIL, "type": EVIL}),
        "/admin/users?" + urlencode({"q": EVIL, "role": EVIL, "active": EVIL, "cursor": EVIL}),
        "/admin/users?" + urlencode({"done": EVIL}),
        "/admin/clients",
        f"/admin/clients/{quoted.json()['client_id']}",
    ]
    for path in pages:
        answer = await client.get(path)
        assert answer.status_code in (200, 400, 422), (path, answer.status_code, answer.text)
        for raw in ("<script>alert", "<img src=x", "onerror=alert(1)>"):
            assert raw not in answer.text, (path, raw)
    shown = await client.get(f"/admin/users/{uid}")
    assert "&lt;script&gt;" in shown.text or "&#34;&gt;&lt;img" in shown.text


# --- the console's cookies -----------------------------------------------------------------------


async def test_forged_stale_and_foreign_console_cookies_sign_nobody_in(
    console_app: Console, make_settings: Callable[..., Settings]
) -> None:
    app, client, admin_email = console_app
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    good = client.cookies[TOKENS_COOKIE]
    pending = (await client.get("/admin/signin")).cookies[PENDING_COOKIE]
    version, kid, body = good.split(".", 2)
    other_key = Sealer([secrets.token_bytes(32)])
    sealer = app_services(app).security.sealer
    forged = [
        f"{version}.{kid}.{body[:20]}{'A' if body[20] != 'A' else 'B'}{body[21:]}",  # one byte off
        good[: len(good) // 2],  # truncated
        f"{version}.{kid}.",  # no body
        f"{version}.{kid}.{body[:10]}",  # shorter than a nonce
        f"v9.{kid}.{body}",  # another format
        "x" * 5000,  # over-long
        good + "A" * 5000,
        pending,  # the sign-in cookie, sealed for another purpose
        other_key.seal(b'{"access_token": "x"}', b"admin-console-tokens"),  # another key
        sealer.seal(b"[]", b"admin-console-tokens"),  # ours, but not an object
        sealer.seal(b'{"access_token": 1}', b"admin-console-tokens"),  # missing fields
        sealer.seal(b"\xff\xfe", b"admin-console-tokens"),  # not even UTF-8
    ]
    async with browser(app) as attacker:
        for value in forged:
            attacker.cookies.set(TOKENS_COOKIE, value)
            answer = await attacker.get("/admin/users")
            assert sent_to_signin(answer), (value[:40], answer.status_code, answer.text[:200])
            fragment = await attacker.get("/admin/health/panel", headers={"X-Admin-Fragment": "1"})
            assert fragment.status_code == 401


async def test_an_admin_demoted_or_deactivated_while_signed_in_is_refused_at_once(
    console_app: Console,
) -> None:
    app, client, admin_email = console_app
    api = await admin_bearer(client, admin_email)
    second = unique_email("second-admin")
    made = await client.post(
        f"{API}/users",
        json={"email": second, "password": PASSWORD, "role": "admin", "email_verified": True},
        headers=api,
    )
    assert made.status_code == 201, made.text
    sid = made.json()["id"]
    pages = [
        "/admin",
        "/admin/users",
        "/admin/users/new",
        f"/admin/users/{sid}",
        "/admin/clients",
        "/admin/clients/new",
        "/admin/keys",
        "/admin/events",
        "/admin/health",
        "/admin/health/panel",
    ]
    async with browser(app) as console:
        assert (await sign_in(console, second, PASSWORD)).status_code == 200
        assert (await console.get("/admin/health")).status_code == 200
        demoted = await client.patch(f"{API}/users/{sid}", json={"role": "user"}, headers=api)
        assert demoted.status_code == 200, demoted.text
        copy = console.cookies[TOKENS_COOKIE]
        for path in pages:
            console.cookies.delete(TOKENS_COOKIE)
            console.cookies.set(TOKENS_COOKIE, copy)
            answer = await console.get(path)
            if path == pages[0]:
                text = assert_readable_page(answer, 403)
                assert "Administrators only" in text, path
                # Nothing of the console shows: no menu, no admin data.
                assert 'aria-label="Console"' not in text and "Outbox" not in text, path
                # Its console tokens end with the first refusal, and the cookie goes.
                assert "max-age=0" in cookie_header(answer, TOKENS_COOKIE).lower()
            else:
                assert sent_to_signin(answer), (path, answer.status_code)
        async with app_services(app).sessionmaker() as db:
            rows = await db.execute(
                select(UserSession).where(
                    UserSession.user_id == uuid.UUID(sid),
                    UserSession.client_id == CONSOLE_CLIENT_ID,
                )
            )
            assert all(row.revoked_at is not None for row in rows.scalars())

    promoted = await client.patch(f"{API}/users/{sid}", json={"role": "admin"}, headers=api)
    assert promoted.status_code == 200
    async with browser(app) as console:
        assert (await sign_in(console, second, PASSWORD)).status_code == 200
        gone = await client.patch(f"{API}/users/{sid}", json={"is_active": False}, headers=api)
        assert gone.status_code == 200
        for path in pages:
            answer = await console.get(path)
            assert sent_to_signin(answer), (path, answer.status_code)


# --- authorization of the new API ---------------------------------------------------------------


async def _client_credentials_token(client: httpx.AsyncClient, api: dict[str, str]) -> str:
    made = await client.post(
        f"{API}/clients",
        json={
            "name": "Service",
            "client_type": "confidential",
            "redirect_uris": [],
            "grant_types": ["client_credentials"],
            "scopes": ["profile"],
        },
        headers=api,
    )
    assert made.status_code == 201, made.text
    creds = (made.json()["client_id"], made.json()["client_secret"])
    token = await client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, auth=creds
    )
    assert token.status_code == 200, token.text
    return str(token.json()["access_token"])


async def test_the_new_admin_api_answers_only_administrators(console_app: Console) -> None:
    app, client, admin_email = console_app
    api = await admin_bearer(client, admin_email)
    user = await register(client, unique_email("plain"))
    plain = bearer(await login(client, user["email"]))
    service = bearer(await _client_credentials_token(client, api))
    victim = await register(client, unique_email("victim"))
    missing = str(uuid.uuid4())
    endpoints: list[tuple[str, str, Any]] = []
    for target in (victim["id"], missing):
        endpoints += [
            ("GET", f"{API}/users/{target}/sessions", None),
            ("DELETE", f"{API}/users/{target}/sessions/{uuid.uuid4()}", None),
            ("POST", f"{API}/users/{target}/password-reset", None),
            ("GET", f"{API}/users/{target}/mfa", None),
            ("DELETE", f"{API}/users/{target}/mfa", None),
            ("GET", f"{API}/users/{target}/events", None),
            ("GET", f"{API}/users/{target}", None),
        ]
    endpoints += [
        ("GET", f"{API}/keys", None),
        ("POST", f"{API}/keys/rotate", {"force": True}),
        ("GET", f"{API}/events", None),
    ]
    for method, path, body in endpoints:
        nobody = await client.request(method, path, json=body)
        assert_problem(nobody, 401)
        forged = await client.request(
            method, path, json=body, headers={"Authorization": "Bearer forged.token.value"}
        )
        assert_problem(forged, 401)
        for headers in (plain, service):
            answer = await client.request(method, path, json=body, headers=headers)
            assert answer.status_code in (401, 403), (method, path, answer.status_code)
            assert_problem(answer, answer.status_code)
    # A non-admin learns nothing about which accounts exist: the same answer for both.
    for suffix in ("", "/sessions", "/mfa", "/events"):
        real = await client.get(f"{API}/users/{victim['id']}{suffix}", headers=plain)
        fake = await client.get(f"{API}/users/{missing}{suffix}", headers=plain)
        assert real.status_code == fake.status_code == 403
        assert real.json()["detail"] == fake.json()["detail"]
    # Nor does the console, to anyone not signed in to it.
    for target in (victim["id"], missing):
        answer = await client.get(f"/admin/users/{target}")
        assert sent_to_signin(answer)
    # Nothing was done.
    done = {row.type for row in await outbox(app, victim["id"])}
    assert done == {"user.registered", "user.verification_requested"}, done


async def test_a_session_of_one_user_cannot_be_revoked_through_another(
    console_app: Console,
) -> None:
    app, client, admin_email = console_app
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    api = await admin_bearer(client, admin_email)
    a = await register(client, unique_email("a"))
    b = await register(client, unique_email("b"))
    b_auth = bearer(await login(client, b["email"]))
    [b_session] = (await client.get(f"{API}/users/{b['id']}/sessions", headers=api)).json()
    wrong = await client.delete(f"{API}/users/{a['id']}/sessions/{b_session['id']}", headers=api)
    assert_problem(wrong, 404)
    fields = await csrf_fields(client)
    through_console = await client.post(
        f"/admin/users/{a['id']}/sessions/{b_session['id']}/revoke", data=fields
    )
    assert_readable_page(through_console, 404)
    assert (await client.get(f"{API}/users/me", headers=b_auth)).status_code == 200
    assert await outbox(app, b["id"], "user.session_revoked") == []
    assert await outbox(app, a["id"], "user.session_revoked") == []


# --- filters, cursors and errors -----------------------------------------------------------------


async def test_event_filters_and_cursors_that_are_no_such_thing_are_422(
    console_app: Console,
) -> None:
    _, client, admin_email = console_app
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    api = await admin_bearer(client, admin_email)
    bad = [
        {"limit": "1000000000"},
        {"limit": "0"},
        {"limit": "-1"},
        {"limit": "9" * 400},
        {"cursor": "9" * 19},
        {"cursor": "9" * 40},
        {"cursor": "-1"},
        {"cursor": "1e5"},
        {"cursor": "\u00b2"},
        {"cursor": "\u0661\u0662"},
        {"cursor": " 1"},
        {"user_id": "not-a-uuid"},
        {"user_id": "9" * 400},
        {"since": "yesterday"},
        {"since": "2026-13-45T99:99:99Z"},
        {"since": "2026-01-01T00:00:00"},  # no offset
        {"since": "9999-12-31T23:59:59-23:59"},  # after year 9999 in UTC
        {"until": "0001-01-01T00:00:00+23:59"},  # before year 1 in UTC
        {"since": "0001-01-01T00:00:00+00:01"},
        {"until": "9999-12-31T23:59:59.999999-00:01"},
        {"since": "2026-01-01T00:00:00+99:00"},
        {"since": "1" * 400},
        {"type": "x" * 65},
        {"type": ""},
    ]
    for params in bad:
        answer = await client.get(f"{API}/events", params=params, headers=api)
        assert answer.status_code == 422, (params, answer.status_code, answer.text)
        assert_problem(answer, 422)
    fine = [
        {"cursor": "9" * 18},
        {"cursor": "0"},
        {"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:59Z"},
        {"since": "2026-01-01T00:00:00+14:00"},
        {"type": "no.such.type"},
        {"user_id": str(uuid.uuid4())},
    ]
    for params in fine:
        answer = await client.get(f"{API}/events", params=params, headers=api)
        assert answer.status_code == 200, (params, answer.text)
    # The console turns them into sentences on its page, never a server error.
    for params in (
        {"since": "9999-12-31T23:59"},
        {"until": "0001-01-01T00:00"},
        {"since": "2026-13-45T99:99"},
        {"cursor": "9" * 40},
        {"cursor": "-5"},
        {"user": "x" * 5000},
        {"user": "@"},
    ):
        answer = await client.get("/admin/events", params=params)
        assert answer.status_code in (200, 400, 422), (params, answer.status_code)
        assert_readable_page(answer, answer.status_code)
    # Keyset cursors are base64 of "created_at|id": forged ones, down to a time that is no date
    # once in UTC, are refused by the API (422), and by the console as a page.
    for forged in (
        f"9999-12-31T23:59:59-23:59|{uuid.uuid4()}",
        f"0001-01-01T00:00:00+23:59|{uuid.uuid4()}",
        f"2026-01-01T00:00:00|{uuid.uuid4()}",
        "2026-01-01T00:00:00+00:00|not-a-uuid",
    ):
        cursor = base64.urlsafe_b64encode(forged.encode()).decode().rstrip("=")
        for path in (f"{API}/users", f"{API}/clients"):
            answer = await client.get(path, params={"cursor": cursor}, headers=api)
            assert_problem(answer, 422)
        for path in ("/admin/users", "/admin/clients"):
            assert_readable_page(await client.get(path, params={"cursor": cursor}), 422)
    for params in ({"cursor": "forged"}, {"cursor": "A" * 300}, {"q": "x" * 5000}):
        answer = await client.get("/admin/users", params=params)
        assert answer.status_code in (200, 422), (params, answer.status_code)
        assert_readable_page(answer, answer.status_code)
        answer = await client.get("/admin/clients", params=params)
        assert answer.status_code in (200, 422), (params, answer.status_code)
        assert_readable_page(answer, answer.status_code)


async def test_console_errors_are_readable_pages(
    console_app: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client, admin_email = console_app
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    fields = await csrf_fields(client)
    for path in (
        "/admin/no-such-page",
        "/admin/users/not-a-uuid",
        f"/admin/users/{uuid.uuid4()}/sessions",
        "/admin/users/1/delete",
        "/admin/clients/%2E",
        "/admin/clients/%2E%2E",
        "/admin/clients/" + "a" * 65,
        "/admin/clients/a%20b",
    ):
        answer = await client.get(httpx.URL(BASE + path))
        text = assert_readable_page(answer, 404)
        assert "Back to the console" in text, path
    for path in ("/admin/clients/%2E", "/admin/clients/%2E/delete"):
        posted = await client.post(httpx.URL(BASE + path), data={**fields, "confirm": "."})
        assert_readable_page(posted, 404)
    posted = await client.post("/admin/users/not-a-uuid/deactivate", data=fields)
    assert_readable_page(posted, 404)
    put = await client.put("/admin/users", data=fields)
    assert_readable_page(put, 405)
    # A body that is no form at all: Starlette's 400, as a page.
    unparsable = await client.post(
        "/admin/users/new", content=b"x", headers={"content-type": "multipart/form-data"}
    )
    assert_readable_page(unparsable, 400)
    # Signed out, an unknown console page still sends nobody to a JSON answer.
    async with browser(app) as anonymous:
        assert_readable_page(await anonymous.get("/admin/nothing"), 404)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom: an internal detail")

    monkeypatch.setattr(keys_screen, "_keys_page", broken)
    crashed = await client.get("/admin/keys")
    text = assert_readable_page(crashed, 500)
    assert "boom" not in text and "internal detail" not in text
    # The API keeps answering problem+json.
    assert_problem(await client.get(f"{API}/users/not-a-uuid", headers={}), 401)


# --- twenty at once ------------------------------------------------------------------------------


async def test_twenty_copies_of_each_action_at_once_agree(console_app: Console) -> None:
    app, client, admin_email = console_app
    api = await admin_bearer(client, admin_email)

    async def twenty(method: str, path: str, **kwargs: Any) -> Counter[int]:
        answers = await asyncio.gather(
            *(client.request(method, path, headers=api, **kwargs) for _ in range(PARALLEL))
        )
        for answer in answers:
            if answer.status_code >= 400:
                assert_problem(answer, answer.status_code)
        return Counter(answer.status_code for answer in answers)

    user = await register(client, unique_email("many"))
    uid = user["id"]
    await login(client, user["email"])
    [session] = (await client.get(f"{API}/users/{uid}/sessions", headers=api)).json()
    revoked = await twenty("DELETE", f"{API}/users/{uid}/sessions/{session['id']}")
    assert revoked == Counter({204: 1, 404: PARALLEL - 1}), revoked
    assert len(await outbox(app, uid, "user.session_revoked")) == 1

    deactivated = await twenty("PATCH", f"{API}/users/{uid}", json={"is_active": False})
    assert 500 not in deactivated and deactivated[200] >= 1, deactivated
    assert len(await outbox(app, uid, "user.deactivated")) == 1

    rotated = await twenty("POST", f"{API}/keys/rotate", json={})
    assert 500 not in rotated and rotated[200] <= 1, rotated
    ring = Counter(key["state"] for key in (await client.get(f"{API}/keys", headers=api)).json())
    assert ring["active"] == 1 and ring["next"] == 1, ring
    forced = await twenty("POST", f"{API}/keys/rotate", json={"force": True})
    assert forced == Counter({200: PARALLEL}), forced
    ring = Counter(key["state"] for key in (await client.get(f"{API}/keys", headers=api)).json())
    assert ring["active"] == 1 and ring["next"] == 1, ring

    deleted = await twenty("DELETE", f"{API}/users/{uid}")
    assert deleted == Counter({204: 1, 404: PARALLEL - 1}), deleted
    assert len(await outbox(app, uid, "user.deleted")) == 1

    # Through the console: the same, as pages.
    await sign_in(client, admin_email, ADMIN_PASSWORD)
    target = await register(client, unique_email("console-many"))
    fields = await csrf_fields(client)
    action = f"/admin/users/{target['id']}/deactivate"
    pages = await asyncio.gather(*(client.post(action, data=fields) for _ in range(PARALLEL)))
    statuses = Counter(page.status_code for page in pages)
    assert 500 not in statuses and statuses[303] >= 1, statuses
    for page in pages:
        if page.status_code != 303:
            assert_readable_page(page, page.status_code)
    assert len(await outbox(app, target["id"], "user.deactivated")) == 1
    action = f"/admin/users/{target['id']}/delete"
    confirm = {**fields, "confirm": target["email"]}
    pages = await asyncio.gather(*(client.post(action, data=confirm) for _ in range(PARALLEL)))
    statuses = Counter(page.status_code for page in pages)
    assert statuses[303] == 1 and set(statuses) <= {303, 404}, statuses


# --- in a real browser: another site's form and frame --------------------------------------------


def evil_site(target: str) -> Starlette:
    """Another site (``localhost`` is not the same site as ``127.0.0.1``): a page whose form
    posts to the console by itself, with whatever CSRF token it is given, and a page framing the
    console."""

    async def forge(request: Request) -> HTMLResponse:
        action = html.escape(target + request.query_params["action"], quote=True)
        token = html.escape(request.query_params.get("token", ""), quote=True)
        return HTMLResponse(
            f'<!doctype html><form id="f" method="post" action="{action}">'
            f'<input name="csrf_token" value="{token}"></form>'
            "<script>document.getElementById('f').submit()</script>"
        )

    async def frame(request: Request) -> HTMLResponse:
        src = html.escape(target + "/admin/users", quote=True)
        return HTMLResponse(
            f'<!doctype html><iframe id="console" src="{src}"'
            " onload=\"document.title = 'loaded'\"></iframe>"
        )

    return Starlette(routes=[Route("/forge", forge), Route("/frame", frame)])


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"
)
async def test_another_site_can_neither_post_to_nor_frame_the_console(
    make_settings: Callable[..., Settings], clean_db: None
) -> None:
    from playwright.async_api import async_playwright, expect

    port, evil_port = free_port(), free_port()
    base, evil = f"http://127.0.0.1:{port}", f"http://localhost:{evil_port}"
    admin_email = unique_email("admin")
    settings = make_settings(
        PUBLIC_BASE_URL=base, FIRST_ADMIN_EMAIL=admin_email, FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD
    )
    with live_server(create_app(settings), port), live_server(evil_site(base), evil_port):
        async with httpx.AsyncClient(base_url=base, timeout=30) as api:
            target = await register(api, unique_email("target"))
            admin = await admin_bearer(api, admin_email)
        async with async_playwright() as playwright:
            chromium = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
            )
            try:
                page = await (await chromium.new_context()).new_page()
                await browser_sign_in(page, base, admin_email, ADMIN_PASSWORD)
                await page.wait_for_url(f"{base}/admin/users")
                await page.goto(f"{base}/admin/users/{target['id']}")
                # The attacker is even handed the right CSRF token: the cookies stay home.
                token = await page.locator('input[name="csrf_token"]').first.input_value()
                action = f"/admin/users/{target['id']}/deactivate"
                await page.goto(f"{evil}/forge?{urlencode({'action': action, 'token': token})}")
                await page.wait_for_url(f"{base}{action}")
                await expect(page.get_by_role("heading", level=1)).to_have_text(
                    "This form has expired"
                )
                async with httpx.AsyncClient(base_url=base, timeout=30) as api:
                    after = await api.get(f"{API}/users/{target['id']}", headers=admin)
                    assert after.json()["is_active"] is True
                # The same token from the console's own page works: the refusal was the cookies.
                await page.goto(f"{base}/admin/users/{target['id']}")
                await page.get_by_role("button", name="Deactivate").click()
                await expect(page.get_by_role("status")).to_have_text(
                    "The account was deactivated; all its sessions ended."
                )

                await page.goto(f"{evil}/frame")
                await expect(page).to_have_title("loaded")
                framed = page.frame_locator("#console")
                await expect(framed.get_by_role("heading", name="Users")).to_have_count(0)
                assert [f.url for f in page.frames if f.url.startswith(base)] == [], [
                    f.url for f in page.frames
                ]
            finally:
                await chromium.close()
