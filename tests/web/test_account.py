"""The signed-in account page (details, applications allowed, sign-out) and the consents API."""

from __future__ import annotations

import httpx
from fastapi.responses import HTMLResponse

from src.config.settings import Settings
from src.web.render import clear_session_cookie, set_session_cookie
from tests.support.app import PASSWORD, bearer, login, register, unique_email
from tests.support.auth import API, assert_problem, assert_unauthenticated
from tests.web.helpers import (
    PAGE_CSP,
    SESSION_COOKIE,
    App,
    add_client,
    add_consent,
    attributes,
    browser_session,
    browser_session_row,
    consent_exists,
    cookie_header,
    form_at,
    scan,
    session_row,
    submit,
)
from tests.web.test_pages import assert_accessible, assert_page_headers

CONSENTS_URL = f"{API}/users/me/consents"


async def _signed_in_page(app: App, **extra: str) -> tuple[dict[str, str], httpx.Response]:
    """A fresh account signed in on the hosted pages, and its account page."""
    fastapi_app, client = app
    user = await register(client, **extra)
    client.cookies.set(SESSION_COOKIE, await browser_session(fastapi_app, user["email"]))
    page = await client.get("/account")
    assert page.status_code == 200, page.text
    return user, page


async def test_the_account_page_needs_a_browser_session(app: App) -> None:
    _, client = app
    response = await client.get("/account")
    assert response.status_code == 303 and response.headers["location"] == "/account/signin"
    assert_page_headers(response)
    client.cookies.set(SESSION_COOKIE, "not-a-session")
    response = await client.get("/account")
    assert response.status_code == 303 and response.headers["location"] == "/account/signin"


async def test_the_account_page_shows_the_account_escaped(app: App) -> None:
    user, page = await _signed_in_page(app, full_name="<script>alert('name')</script>")
    assert page.headers["content-security-policy"] == PAGE_CSP
    assert_accessible(page)
    assert user["email"] in page.text and "Not confirmed" in page.text
    assert "<script>" not in page.text
    assert "&lt;script&gt;alert(&#39;name&#39;)&lt;/script&gt;" in page.text
    assert "You have not allowed any application" in page.text
    form = form_at(page, "/account/signout")
    assert form.fields["csrf_token"] and form.buttons == [("", "")]


async def test_revoking_an_application_on_the_page(app: App) -> None:
    fastapi_app, client = app
    client_id = await add_client(fastapi_app, "Photo <b>Printer</b>")
    user, _ = await _signed_in_page(app)
    app_session = await add_consent(fastapi_app, user["id"], client_id, "openid email")
    page = await client.get("/account")
    assert "Photo &lt;b&gt;Printer&lt;/b&gt;" in page.text
    assert "Your email address and whether it is verified" in page.text  # scopes in words
    action = f"/account/consents/{client_id}/revoke"
    assert_accessible(page)

    refused = await submit(client, page, action, drop=("csrf_token",))
    assert refused.status_code == 403
    assert await consent_exists(fastapi_app, user["id"], client_id)
    assert (await session_row(fastapi_app, app_session)).revoked_at is None

    # Without a browser session (the cookie gone) nothing happens either.
    cookie = client.cookies[SESSION_COOKIE]
    client.cookies.delete(SESSION_COOKIE)
    anonymous = await submit(client, page, action)
    assert anonymous.status_code == 303 and anonymous.headers["location"] == "/account/signin"
    assert await consent_exists(fastapi_app, user["id"], client_id)
    client.cookies.set(SESSION_COOKIE, cookie)

    response = await submit(client, page, action)
    assert response.status_code == 303 and response.headers["location"] == "/account"
    assert not await consent_exists(fastapi_app, user["id"], client_id)
    ended = await session_row(fastapi_app, app_session)
    assert ended.revoked_at is not None and ended.revoked_reason == "consent_revoked"
    assert "Photo" not in (await client.get("/account")).text


async def test_signing_out_on_the_account_page(app: App) -> None:
    fastapi_app, client = app
    user, page = await _signed_in_page(app)

    refused = await submit(client, page, "/account/signout", drop=("csrf_token",))
    assert refused.status_code == 403
    assert (await browser_session_row(fastapi_app, user["id"])).revoked_at is None

    response = await submit(client, page, "/account/signout")
    assert response.status_code == 200 and "You are signed out." in response.text
    assert_page_headers(response)
    cleared = attributes(cookie_header(response, SESSION_COOKIE))
    assert cleared["max-age"] == "0" and cleared["path"] == "/" and cleared["httponly"] is True
    assert (await browser_session_row(fastapi_app, user["id"])).revoked_at is not None
    assert (await client.get("/account")).status_code == 303


async def test_sign_up_then_sign_in_reaches_the_account_page(app: App) -> None:
    """The pages together, as a person meets them: the sign-in route renders signin.html."""
    _, client = app
    email = unique_email("journey")
    page = await client.get("/account/signup")
    created = await submit(client, page, "/account/signup", {"email": email, "password": PASSWORD})
    assert created.status_code == 303
    signin = await client.get(created.headers["location"])
    assert signin.status_code == 200, signin.text
    assert_page_headers(signin)
    assert_accessible(signin)
    assert scan(signin).alerts == 0 and 'role="status"' in signin.text
    signed_in = await submit(
        client, signin, "/account/signin", {"email": email, "password": PASSWORD}
    )
    assert signed_in.status_code == 303, signed_in.text
    account = await client.get(signed_in.headers["location"])
    assert account.status_code == 200 and email in account.text


def test_session_cookie_flags() -> None:
    plain = Settings(_env_file=None, PUBLIC_BASE_URL="http://localhost:8000")
    response = HTMLResponse("")
    set_session_cookie(response, plain, "secret-value")
    cookie = attributes(cookie_header_of(response, "ums_session"))
    assert cookie == {
        "httponly": True,
        "max-age": str(plain.SESSION_MAX_LIFETIME_DAYS * 86400),
        "path": "/",
        "samesite": "lax",
    }
    secure = Settings(_env_file=None, PUBLIC_BASE_URL="https://accounts.example")
    response = HTMLResponse("")
    set_session_cookie(response, secure, "secret-value")
    clear_session_cookie(response, secure)
    set_cookie, cleared = response.headers.getlist("set-cookie")
    assert set_cookie.startswith("__Host-ums_session=secret-value;")
    assert attributes(set_cookie)["secure"] is True
    assert cleared.startswith("__Host-ums_session=")
    assert attributes(cleared)["secure"] is True and attributes(cleared)["max-age"] == "0"


def cookie_header_of(response: HTMLResponse, name: str) -> str:
    [value] = [v for v in response.headers.getlist("set-cookie") if v.startswith(f"{name}=")]
    return value


# --- the API --------------------------------------------------------------------------------------


async def test_consents_api_lists_and_revokes(app: App) -> None:
    fastapi_app, client = app
    assert_unauthenticated(await client.get(CONSENTS_URL))
    user = await register(client)
    other = await register(client)
    headers = bearer(await login(client, user["email"]))
    client_id = await add_client(fastapi_app, "Calendar")
    app_session = await add_consent(fastapi_app, user["id"], client_id, "email openid")
    await add_consent(fastapi_app, other["id"], client_id, "openid")

    listed = await client.get(CONSENTS_URL, headers=headers)
    assert listed.status_code == 200
    assert listed.json() == [
        {"client_id": client_id, "client_name": "Calendar", "scopes": ["email", "openid"]}
    ]

    assert_unauthenticated(await client.delete(f"{CONSENTS_URL}/{client_id}"))
    revoked = await client.delete(f"{CONSENTS_URL}/{client_id}", headers=headers)
    assert revoked.status_code == 204
    assert (await session_row(fastapi_app, app_session)).revoked_at is not None
    assert (await client.get(CONSENTS_URL, headers=headers)).json() == []
    assert await consent_exists(fastapi_app, other["id"], client_id)  # only the caller's

    assert_problem(await client.delete(f"{CONSENTS_URL}/{client_id}", headers=headers), 404)
    assert_problem(await client.delete(f"{CONSENTS_URL}/{'x' * 256}", headers=headers), 422)


async def test_a_consent_for_an_unknown_client_is_named_by_its_id(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    await add_consent(fastapi_app, user["id"], "gone-app", "openid")
    listed = await client.get(CONSENTS_URL, headers=bearer(await login(client, user["email"])))
    assert listed.json() == [
        {"client_id": "gone-app", "client_name": "gone-app", "scopes": ["openid"]}
    ]
