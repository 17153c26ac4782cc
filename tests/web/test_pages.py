"""The account pages anyone can reach: sign-up, forgotten password, and the links mailed for a
reset, a verification and an email change. Each is driven as a browser would drive it: GET the
page, post its form back with the hidden fields it carries."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from src.config.settings import Settings
from tests.support.app import PASSWORD, bearer, login, register, running_app, unique_email
from tests.support.auth import (
    API,
    ME_URL,
    one_time_token,
    one_time_token_row,
    outbox,
    password_grant,
    user_row,
)
from tests.web.helpers import (
    CSRF_COOKIE,
    PAGE_CSP,
    App,
    attributes,
    cookie_header,
    form_at,
    scan,
    submit,
)

NEW_PASSWORD = "a page-reset passphrase"
RESET_REQUESTED = "user.password_reset_requested"
VERIFICATION_REQUESTED = "user.verification_requested"

PUBLIC_PAGES = [
    ("/account/signup", "/account/signup"),
    ("/account/forgot-password", "/account/forgot-password"),
    ("/account/reset-password?token=abc", "/account/reset-password"),
    ("/account/verify-email?token=abc", "/account/verify-email"),
    ("/account/confirm-email-change?token=abc", "/account/confirm-email-change"),
    ("/account/undo-email-change?token=abc", "/account/undo-email-change"),
]


def assert_page_headers(response: httpx.Response) -> None:
    assert response.headers["content-security-policy"] == PAGE_CSP
    assert "unsafe-inline" not in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-content-type-options"] == "nosniff"


def assert_accessible(response: httpx.Response) -> None:
    """The checks a page can pass or fail on its own: a language, one h1 and no skipped heading
    level, a label for every visible input, nothing the policy would refuse."""
    page = scan(response)
    assert page.lang == "en"
    assert page.headings and page.headings[0] == 1 and page.headings.count(1) == 1
    assert all(b - a <= 1 for a, b in zip(page.headings, page.headings[1:], strict=False))
    for attrs in page.inputs:
        if attrs.get("type") != "hidden":
            assert attrs.get("id") in page.label_targets, attrs
    assert page.scripts == 0 and page.inline_styles == [] and page.handlers == []
    assert [href.split("?")[0] for href in page.stylesheets] == ["/assets/style.css"]


# --- every page -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "action"), PUBLIC_PAGES)
async def test_page_has_the_policy_a_csrf_cookie_and_field(app: App, url: str, action: str) -> None:
    _, client = app
    response = await client.get(url)
    assert response.status_code == 200, response.text
    assert_page_headers(response)
    assert_accessible(response)

    cookie = attributes(cookie_header(response, CSRF_COOKIE))
    assert cookie["httponly"] is True and cookie["path"] == "/" and cookie["samesite"] == "lax"
    assert "secure" not in cookie and "max-age" not in cookie  # plain http; a browser session
    token = client.cookies[CSRF_COOKIE]
    assert form_at(response, action).fields["csrf_token"] == token

    # The cookie is kept: the next page carries the same token and sets no new cookie.
    again = await client.get(url)
    assert form_at(again, action).fields["csrf_token"] == token
    assert "set-cookie" not in again.headers


async def test_the_stylesheet_is_served_from_the_service(app: App) -> None:
    _, client = app
    page = scan(await client.get("/account/signup"))
    [href] = page.stylesheets
    css = await client.get(href)
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert ":focus-visible" in css.text
    assert page.images
    for src in page.images:
        image = await client.get(src)
        assert image.status_code == 200 and image.headers["content-type"] == "image/svg+xml"


async def test_over_https_the_cookie_is_host_bound_and_secure(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(PUBLIC_BASE_URL="https://accounts.example")
    async with running_app(settings) as (_, client):
        response = await client.get("/account/signup")
    cookie = attributes(cookie_header(response, "__Host-ums_csrf"))
    assert cookie["secure"] is True and cookie["path"] == "/" and "domain" not in cookie


async def test_a_garbled_cookie_is_replaced(app: App) -> None:
    _, client = app
    response = await client.get("/account/signup", headers={"Cookie": f"{CSRF_COOKIE}=not-a-token"})
    token = form_at(response, "/account/signup").fields["csrf_token"]
    assert token != "not-a-token"
    assert cookie_header(response, CSRF_COOKIE).startswith(f"{CSRF_COOKIE}={token};")


# --- CSRF -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["no field", "another value", "no cookie"])
async def test_signup_without_the_right_token_is_refused_and_creates_nothing(
    app: App, how: str
) -> None:
    fastapi_app, client = app
    page = await client.get("/account/signup")
    email = unique_email("csrf")
    values = {"email": email, "password": PASSWORD}
    if how == "no field":
        response = await submit(client, page, "/account/signup", values, drop=("csrf_token",))
    elif how == "another value":
        values["csrf_token"] = "A" * 43
        response = await submit(client, page, "/account/signup", values)
    else:
        client.cookies.clear()
        response = await submit(client, page, "/account/signup", values)
    assert response.status_code == 403
    assert_page_headers(response)
    assert "This form has expired" in response.text
    assert await user_row(fastapi_app, email) is None


# --- sign-up --------------------------------------------------------------------------------------


async def test_signup_creates_the_account_and_sends_the_user_to_sign_in(app: App) -> None:
    fastapi_app, client = app
    page = await client.get("/account/signup?authz=" + "response_type%3Dcode%26client_id%3Dx")
    assert form_at(page, "/account/signup").fields["authz"] == "response_type=code&client_id=x"
    email = unique_email("signup")
    response = await submit(
        client, page, "/account/signup", {"email": email, "full_name": "Ada", "password": PASSWORD}
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == (
        "/account/signin?notice=registered&authz=response_type%3Dcode%26client_id%3Dx"
    )
    assert_page_headers(response)
    row = await user_row(fastapi_app, email)
    assert row is not None and row.full_name == "Ada" and not row.email_verified
    assert (await password_grant(client, email)).status_code == 200


async def test_signup_errors_are_shown_in_the_form(app: App) -> None:
    _, client = app
    taken = (await register(client))["email"]
    cases = [
        ({"email": "not an address", "password": PASSWORD}, 422, "correct format"),
        ({"email": unique_email(), "password": "password"}, 422, "too common"),
        ({"email": unique_email(), "password": "short"}, 422, "at least 8 characters"),
        ({"email": taken, "password": PASSWORD}, 409, "already exists"),
        ({"email": "", "password": PASSWORD}, 422, "Enter your email address"),
        ({"email": unique_email(), "password": ""}, 422, "Enter a password"),
        # Every problem at once: the address and the password.
        ({"email": "nope", "password": "short"}, 422, "correct format"),
        ({"email": "nope", "password": "short"}, 422, "at least 8 characters"),
    ]
    for values, status, message in cases:
        page = await client.get("/account/signup")
        response = await submit(client, page, "/account/signup", values)
        assert response.status_code == status, (values, response.text)
        assert message in response.text, (values, response.text)
        page_scan = scan(response)
        assert page_scan.alerts == 1
        # What was typed comes back, except the password.
        again = form_at(response, "/account/signup")
        assert again.fields["email"] == values["email"] or not values["email"]
        assert "password" not in again.fields or again.fields["password"] == ""
        assert PASSWORD not in response.text


async def test_signup_is_throttled_like_the_api(make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings(MAIL_RATE_LIMIT_PER_ADDRESS=1)) as (_, client):
        email = unique_email("throttled")
        for expected in (303, 429):
            page = await client.get("/account/signup")
            values = {"email": email, "password": PASSWORD}
            response = await submit(client, page, "/account/signup", values)
            assert response.status_code == expected, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert "Too many attempts" in response.text


async def test_signup_is_a_404_page_when_registration_is_closed(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings(SELF_REGISTRATION_ENABLED=False)) as (fastapi_app, client):
        page = await client.get("/account/signup")
        assert page.status_code == 404
        assert "Sign-up is closed" in page.text
        assert_page_headers(page)
        token = client.cookies[CSRF_COOKIE]
        email = unique_email("closed")
        data = {"email": email, "password": PASSWORD, "csrf_token": token}
        response = await client.post("/account/signup", data=data)
        assert response.status_code == 404 and "Sign-up is closed" in response.text
        assert await user_row(fastapi_app, email) is None


# --- forgotten password and reset -----------------------------------------------------------------


async def test_forgot_password_answers_the_same_for_known_and_unknown_addresses(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    before = len(await outbox(fastapi_app, type_=RESET_REQUESTED))
    answers = []
    for email in (user["email"], unique_email("nobody")):
        page = await client.get("/account/forgot-password")
        answers.append(await submit(client, page, "/account/forgot-password", {"email": email}))
    known, unknown = answers
    assert known.status_code == unknown.status_code == 200
    assert known.content == unknown.content
    assert "If the account exists, a message is on its way." in known.text
    rows = await outbox(fastapi_app, type_=RESET_REQUESTED)
    assert len(rows) == before + 1 and str(rows[-1].aggregate_id) == user["id"]


async def test_forgot_password_refuses_a_bad_address_or_token(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    page = await client.get("/account/forgot-password")
    bad = await submit(client, page, "/account/forgot-password", {"email": "nope"})
    assert bad.status_code == 422 and "correct format" in bad.text
    refused = await submit(
        client, page, "/account/forgot-password", {"email": user["email"]}, drop=("csrf_token",)
    )
    assert refused.status_code == 403
    assert await outbox(fastapi_app, user["id"], RESET_REQUESTED) == []


async def test_reset_through_the_pages_sets_the_new_password(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    page = await client.get("/account/forgot-password")
    await submit(client, page, "/account/forgot-password", {"email": user["email"]})
    token = await one_time_token(fastapi_app, user["id"], RESET_REQUESTED)

    form_page = await client.get(f"/account/reset-password?token={token}")
    assert form_page.status_code == 200
    assert form_at(form_page, "/account/reset-password").fields["token"] == token
    assert (await one_time_token_row(fastapi_app, token)).used_at is None  # GET spends nothing

    # Without the CSRF token: refused, the token still unspent.
    refused = await submit(
        client,
        form_page,
        "/account/reset-password",
        {"password": NEW_PASSWORD, "password_confirm": NEW_PASSWORD},
        drop=("csrf_token",),
    )
    assert refused.status_code == 403
    assert (await one_time_token_row(fastapi_app, token)).used_at is None

    mismatch = await submit(
        client,
        form_page,
        "/account/reset-password",
        {"password": NEW_PASSWORD, "password_confirm": "something else"},
    )
    assert mismatch.status_code == 422 and "not the same" in mismatch.text
    weak = await submit(
        client,
        form_page,
        "/account/reset-password",
        {"password": "password", "password_confirm": "password"},
    )
    assert weak.status_code == 422 and "too common" in weak.text
    assert (await one_time_token_row(fastapi_app, token)).used_at is None

    done = await submit(
        client,
        form_page,
        "/account/reset-password",
        {"password": NEW_PASSWORD, "password_confirm": NEW_PASSWORD},
    )
    assert done.status_code == 200, done.text
    assert "Your password is changed" in done.text
    assert 'href="/account/signin?notice=reset"' in done.text
    assert (await password_grant(client, user["email"], NEW_PASSWORD)).status_code == 200
    assert (await password_grant(client, user["email"])).status_code == 400

    again = await submit(
        client,
        form_page,
        "/account/reset-password",
        {"password": "yet another passphrase", "password_confirm": "yet another passphrase"},
    )
    assert again.status_code == 400 and "does not work" in again.text


async def test_a_reset_link_without_a_usable_token_says_so(app: App) -> None:
    _, client = app
    for url in ("/account/reset-password", f"/account/reset-password?token={'a' * 513}"):
        response = await client.get(url)
        assert response.status_code == 400 and "does not work" in response.text
        assert_page_headers(response)


# --- email verification ---------------------------------------------------------------------------


async def test_verify_email_get_does_not_spend_the_link_and_post_does(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    token = await one_time_token(fastapi_app, user["id"], VERIFICATION_REQUESTED)

    page = await client.get(f"/account/verify-email?token={token}")
    assert page.status_code == 200 and "Confirm my address" in page.text
    await client.get(f"/account/verify-email?token={token}")  # a mail scanner, twice
    assert (await one_time_token_row(fastapi_app, token)).used_at is None
    row = await user_row(fastapi_app, user["email"])
    assert row is not None and not row.email_verified

    refused = await submit(client, page, "/account/verify-email", drop=("csrf_token",))
    assert refused.status_code == 403
    assert (await one_time_token_row(fastapi_app, token)).used_at is None

    done = await submit(client, page, "/account/verify-email")
    assert done.status_code == 200 and "is confirmed" in done.text
    assert user["email"] in done.text
    row = await user_row(fastapi_app, user["email"])
    assert row is not None and row.email_verified
    assert (await one_time_token_row(fastapi_app, token)).used_at is not None

    again = await submit(client, page, "/account/verify-email")
    assert again.status_code == 400 and "does not work" in again.text


# --- email change ---------------------------------------------------------------------------------


async def test_email_change_is_confirmed_and_undone_through_the_pages(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    headers = bearer(await login(client, user["email"]))
    new_email = unique_email("moved")
    asked = await client.post(
        f"{ME_URL}/email",
        json={"new_email": new_email, "current_password": PASSWORD},
        headers=headers,
    )
    assert asked.status_code == 202, asked.text
    token = await one_time_token(fastapi_app, user["id"], "user.email_change_requested")

    page = await client.get(f"/account/confirm-email-change?token={token}")
    assert page.status_code == 200 and "Confirm my new address" in page.text
    assert (await one_time_token_row(fastapi_app, token)).used_at is None
    refused = await submit(client, page, "/account/confirm-email-change", drop=("csrf_token",))
    assert refused.status_code == 403
    assert (await user_row(fastapi_app, new_email)) is None

    done = await submit(client, page, "/account/confirm-email-change")
    assert done.status_code == 200, done.text
    assert new_email in done.text
    assert (await user_row(fastapi_app, new_email)) is not None

    undo = await one_time_token(fastapi_app, user["id"], "user.email_change_notice")
    undo_page = await client.get(f"/account/undo-email-change?token={undo}")
    assert undo_page.status_code == 200 and "Undo the change" in undo_page.text
    refused = await submit(client, undo_page, "/account/undo-email-change", drop=("csrf_token",))
    assert refused.status_code == 403
    assert (await user_row(fastapi_app, new_email)) is not None

    undone = await submit(client, undo_page, "/account/undo-email-change")
    assert undone.status_code == 200 and "The change is undone" in undone.text
    assert (await user_row(fastapi_app, user["email"])) is not None
    assert (await client.get(ME_URL, headers=headers)).status_code == 401

    spent = await submit(client, undo_page, "/account/undo-email-change")
    assert spent.status_code == 400 and "does not work" in spent.text


# --- bad input ------------------------------------------------------------------------------------


async def test_over_long_fields_get_a_clear_answer(app: App) -> None:
    fastapi_app, client = app
    cases = [
        ("/account/signup", {"email": "a" * 310 + "@example.com"}, "at most 320 characters"),
        ("/account/signup", {"full_name": "n" * 201}, "at most 200 characters"),
        ("/account/signup", {"password": "p" * 1025}, "at most 1024 characters"),
        ("/account/signup", {"authz": "z" * 4097}, "at most 4096 characters"),
        ("/account/forgot-password", {"email": "a" * 321}, "at most 320 characters"),
    ]
    for action, values, message in cases:
        page = await client.get(action)
        email = unique_email("long")
        response = await submit(
            client, page, action, {"email": email, "password": PASSWORD, **values}
        )
        assert response.status_code == 422, (values, response.text[:500])
        assert message in response.text
        assert scan(response).alerts == 1
        assert await user_row(fastapi_app, email) is None

    page = await client.get("/account/reset-password?token=abc")
    long_token = await submit(
        client,
        page,
        "/account/reset-password",
        {"token": "t" * 513, "password": PASSWORD, "password_confirm": PASSWORD},
    )
    assert long_token.status_code == 400 and "does not work" in long_token.text
    for action in ("/account/verify-email", "/account/confirm-email-change"):
        page = await client.get(f"{action}?token=abc")
        response = await submit(client, page, action, {"token": "t" * 513})
        assert response.status_code == 400 and "does not work" in response.text


async def test_nul_characters_and_odd_bodies_are_refused_without_a_server_error(app: App) -> None:
    fastapi_app, client = app
    page = await client.get("/account/signup")
    token = form_at(page, "/account/signup").fields["csrf_token"]
    email = unique_email("nul")

    nul = await client.post(
        "/account/signup",
        content=f"csrf_token={token}&email={email}&password=a%00b".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert nul.status_code == 400 and "NUL" in nul.text

    # A file where the address should be.
    upload = await client.post(
        "/account/signup",
        data={"csrf_token": token, "password": PASSWORD},
        files={"email": ("email.txt", b"ada@example.com", "text/plain")},
    )
    assert upload.status_code == 422 and "must be text" in upload.text

    garbled = await client.post(
        "/account/signup",
        content=b"--x\r\nContent-Disposition: form-data\r\n\r\nnope",
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    assert garbled.status_code in (400, 403), garbled.text
    assert "text/html" in garbled.headers["content-type"]
    assert await user_row(fastapi_app, email) is None

    query = await client.get("/account/reset-password?token=a%00b")
    assert query.status_code == 400


async def test_typed_text_comes_back_escaped(app: App) -> None:
    _, client = app
    page = await client.get("/account/signup")
    hostile = '"><script>alert(1)</script>'
    response = await submit(
        client,
        page,
        "/account/signup",
        {"email": hostile, "full_name": hostile, "password": PASSWORD},
    )
    assert response.status_code == 422
    assert "<script>" not in response.text
    assert "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
    assert form_at(response, "/account/signup").fields["full_name"] == hostile


async def test_the_page_asks_for_a_reset_like_the_api(app: App) -> None:
    """The page schedules the API's work: one event per request, whatever the capitalisation."""
    fastapi_app, client = app
    user = await register(client)
    response = await client.post(
        f"{API}/auth/password-reset/request", json={"email": user["email"]}
    )
    assert response.status_code == 202
    page = await client.get("/account/forgot-password")
    await submit(client, page, "/account/forgot-password", {"email": user["email"].upper()})
    rows = await outbox(fastapi_app, user["id"], RESET_REQUESTED)
    assert len(rows) == 2
