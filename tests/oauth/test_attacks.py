"""The provider attacked from outside: open redirects, stolen codes, confused clients, forged
forms, leaked consent, confused tokens, account enumeration, headers.

Every test states the safe behaviour. The app is served over https://id.example.com in process
(as in test_authorization_code.py), so the cookies are ``__Host-`` and Secure.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import update

from src.db.models import AuthorizationCode, UserSession
from src.db.types import utcnow
from tests.conftest import SettingsFactory
from tests.support.app import PASSWORD, bearer, register, running_app, unique_email
from tests.support.auth import _sessions, assert_oauth_error, password_grant, set_active
from tests.support.oidc import (
    REDIRECT_URI,
    allow,
    authorize_query,
    code_flow,
    create_client,
    exchange,
    form_posting_to,
    pkce_pair,
    query_of,
    sign_in,
)

ISSUER = "https://id.example.com"
EVIL = "evil.example.net"
SESSION_COOKIE = "__Host-ums_session"
CSRF_COOKIE = "__Host-ums_csrf"

Provider = tuple[FastAPI, httpx.AsyncClient, dict[str, str]]


@pytest_asyncio.fixture
async def provider(make_settings: SettingsFactory, clean_db: None) -> AsyncIterator[Provider]:
    admin_email = unique_email("admin")
    settings = make_settings(
        PUBLIC_BASE_URL=ISSUER,
        FIRST_ADMIN_EMAIL=admin_email,
        FIRST_ADMIN_PASSWORD="admin password for tests",
        KAFKA_ENABLED=False,
    )
    async with running_app(settings) as (app, _):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as client:
            tokens = (await password_grant(client, admin_email, "admin password for tests")).json()
            yield app, client, bearer(tokens)


def browser(app: FastAPI) -> httpx.AsyncClient:
    """Another browser (its own cookie jar) on the same app."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER)


async def new_user(client: httpx.AsyncClient) -> str:
    email = unique_email()
    await register(client, email)
    return email


def assert_refused_page(answer: httpx.Response, *hidden: str) -> None:
    """An error page shown here, never a redirect, naming none of ``hidden``."""
    assert answer.status_code == 400, (answer.status_code, answer.headers, answer.text[:500])
    assert "location" not in answer.headers
    assert answer.headers["content-type"].startswith("text/html")
    for text in hidden:
        assert text not in answer.text


def assert_no_crash(answer: httpx.Response) -> None:
    assert answer.status_code < 500, (answer.status_code, answer.text[:500])
    assert "Traceback" not in answer.text


async def third_party_code(
    client: httpx.AsyncClient, client_id: str, email: str, scope: str = "openid", **extra: str
) -> tuple[str, str]:
    """(code, verifier) for a third-party client, consenting on the way when asked."""
    verifier, challenge = pkce_pair()
    query = authorize_query(client_id, challenge, scope=scope, **extra)
    page = await client.get(f"/oauth2/authorize?{query}")
    if page.status_code == 200 and 'action="/account/signin"' in page.text:
        fields = form_posting_to(page.text, "/account/signin")
        fields.update(email=email, password=PASSWORD)
        page = await client.post("/account/signin", data=fields)
    if page.status_code == 200 and 'action="/oauth2/consent"' in page.text:
        page = await allow(client, page)
    assert page.status_code in (302, 303), page.text
    return query_of(page.headers["location"])["code"], verifier


async def introspect(
    client: httpx.AsyncClient, creds: tuple[str, str], token: str
) -> dict[str, Any]:
    response = await client.post("/oauth2/introspect", data={"token": token}, auth=creds)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def db_update(app: FastAPI, statement: Any) -> None:
    async with _sessions(app)() as db:
        await db.execute(statement)
        await db.commit()


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


# --- open redirects -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "HTTPS://app.example.com/callback",
        "https://APP.example.com/callback",
        "https://app.example.com/Callback",
        "https://app.example.com./callback",
        "https://app.example.com/callback/",
        "https://app.example.com/callback?next=1",
        "https://app.example.com/callback#frag",
        "https://app.example.com:443/callback",
        "https://app.example.com:8443/callback",
        f"https://app.example.com@{EVIL}/callback",
        f"https://app.example.com%40{EVIL}/callback",
        f"https://app.example.com%2F@{EVIL}/callback",
        f"https://app.example.com\\@{EVIL}/callback",
        f"https://{EVIL}\\app.example.com/callback",
        "https://app.example.com/callback/../../evil",
        "https://app.example.com/callback%2F..%2F..%2Fevil",
        "https://app.example.com/callback%00",
        "https://app.example.com/callback\n",
        " https://app.example.com/callback",
        f"//{EVIL}/callback",
        f"https:/{EVIL}/callback",
        "https://xn--pp-8cd.example.com/callback",
        "https://\u0430pp.example.com/callback",
        f"https://app.example.com.{EVIL}/callback",
        "http://app.example.com/callback",
        "javascript:alert(1)//https://app.example.com/callback",
    ],
)
async def test_redirect_uri_look_alikes_get_an_error_page(
    provider: Provider, redirect_uri: str
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    _, challenge = pkce_pair()
    query = authorize_query(registered["client_id"], challenge, redirect_uri=redirect_uri)
    assert_refused_page(await client.get(f"/oauth2/authorize?{query}"), EVIL)
    # Even a request that is wrong in every other way too is refused here, not redirected.
    broken = authorize_query(
        registered["client_id"], "", redirect_uri=redirect_uri, response_type="token"
    )
    assert_refused_page(await client.get(f"/oauth2/authorize?{broken}"), EVIL)
    none = authorize_query(registered["client_id"], challenge, redirect_uri=redirect_uri)
    assert_refused_page(await client.get(f"/oauth2/authorize?{none}&prompt=none"), EVIL)


async def test_errors_of_an_unknown_client_are_never_redirected(provider: Provider) -> None:
    _, client, _ = provider
    query = urlencode(
        {
            "client_id": "no-such-client",
            "redirect_uri": f"https://{EVIL}/cb",
            "response_type": "token",
            "prompt": "none",
        }
    )
    assert_refused_page(await client.get(f"/oauth2/authorize?{query}"), EVIL)
    assert_refused_page(await client.get("/oauth2/authorize"))
    many = "&".join(f"x{i}=1" for i in range(60))
    assert_refused_page(await client.get(f"/oauth2/authorize?{many}"))


@pytest.mark.parametrize(
    ("presented", "allowed"),
    [
        ("http://127.0.0.1/cb", True),
        ("http://127.0.0.1:1234/cb", True),
        ("http://127.0.0.1:65535/cb", True),
        ("http://127.0.0.1:65536/cb", False),
        ("http://127.0.0.1:99999/cb", False),
        ("http://127.0.0.1:/cb", False),
        ("http://127.0.0.1:1234/cb/", False),
        ("http://127.0.0.1:1234/cb/../x", False),
        ("http://127.0.0.1:1234/cb?x=1", False),
        ("http://127.0.0.1:1234", False),
        (f"http://127.0.0.1.{EVIL}/cb", False),
        (f"http://127.0.0.1:1234@{EVIL}/cb", False),
        (f"http://127.0.0.1@{EVIL}/cb", False),
        ("http://127.0.0.2:1234/cb", False),
        ("http://127.1:1234/cb", False),
        ("http://2130706433:1234/cb", False),
        ("https://127.0.0.1:1234/cb", False),
        ("http://[::1]:1234/cb", False),
        ("http://localhost/cb", True),
        ("http://localhost:1234/cb", False),
        ("http://LOCALHOST/cb", False),
    ],
)
async def test_only_registered_loopback_ip_uris_get_the_port_exception(
    provider: Provider, presented: str, allowed: bool
) -> None:
    _, client, admin = provider
    registered = await create_client(
        client,
        admin,
        client_type="public",
        redirect_uris=["http://127.0.0.1/cb", "http://localhost/cb"],
    )
    _, challenge = pkce_pair()
    query = authorize_query(registered["client_id"], challenge, redirect_uri=presented)
    answer = await client.get(f"/oauth2/authorize?{query}")
    if allowed:
        assert answer.status_code == 200 and 'action="/account/signin"' in answer.text
    else:
        assert_refused_page(answer, EVIL)


async def test_a_loopback_code_goes_to_the_port_asked_for_and_must_be_redeemed_with_it(
    provider: Provider,
) -> None:
    _, client, admin = provider
    registered = await create_client(
        client, admin, client_type="public", redirect_uris=["http://127.0.0.1/cb"]
    )
    email = await new_user(client)
    code, verifier, _ = await code_flow(
        client, registered["client_id"], email, PASSWORD, redirect_uri="http://127.0.0.1:4321/cb"
    )
    other_port = await exchange(
        client, code, verifier, registered["client_id"], redirect_uri="http://127.0.0.1:4322/cb"
    )
    assert_oauth_error(other_port, "invalid_grant")
    answer = await exchange(
        client, code, verifier, registered["client_id"], redirect_uri="http://127.0.0.1:4321/cb"
    )
    assert answer.status_code == 200, answer.text


def _edit(raw: str, **changes: str) -> str:
    params = dict(parse_qsl(raw, keep_blank_values=True))
    params.update(changes)
    return urlencode(params)


async def test_an_authz_field_edited_between_pages_is_checked_again(provider: Provider) -> None:
    _, client, admin = provider
    mine = await create_client(client, admin, name="Mine")
    theirs = await create_client(
        client, admin, name="Theirs", redirect_uris=["https://theirs.example.com/cb"]
    )
    email = await new_user(client)
    _, challenge = pkce_pair()
    page = await client.get(f"/oauth2/authorize?{authorize_query(mine['client_id'], challenge)}")
    fields = form_posting_to(page.text, "/account/signin")
    fields.update(email=email, password=PASSWORD)
    authz = fields["authz"]
    for tampered in (
        _edit(authz, redirect_uri=f"https://{EVIL}/cb"),
        _edit(authz, redirect_uri="https://theirs.example.com/cb"),
        _edit(authz, client_id=theirs["client_id"]),
        authz + f"&redirect_uri=https%3A%2F%2F{EVIL}%2Fcb",
        authz + "&client_id=" + theirs["client_id"],
    ):
        answer = await client.post("/account/signin", data={**fields, "authz": tampered})
        assert_refused_page(answer, EVIL)
        assert SESSION_COOKIE not in answer.cookies
        shown = await client.get("/account/signin", params={"authz": tampered})
        assert_refused_page(shown, EVIL)
    assert_refused_page(await client.get("/account/signin", params={"authz": "x" * 5000}))
    # None of it signed the browser in.
    again = await client.get(f"/oauth2/authorize?{authorize_query(mine['client_id'], challenge)}")
    assert again.status_code == 200 and 'action="/account/signin"' in again.text


async def test_a_consent_form_edited_to_another_redirect_is_refused(provider: Provider) -> None:
    _, client, admin = provider
    third = await create_client(client, admin, first_party=False, name="Third")
    email = await new_user(client)
    _, challenge = pkce_pair()
    consent_page = await sign_in(
        client, authorize_query(third["client_id"], challenge), email, PASSWORD
    )
    fields = form_posting_to(consent_page.text, "/oauth2/consent")
    tampered = _edit(fields["authz"], redirect_uri=f"https://{EVIL}/cb")
    for decision in ("allow", "deny"):
        answer = await client.post(
            "/oauth2/consent", data={**fields, "authz": tampered, "decision": decision}
        )
        assert_refused_page(answer, EVIL)
    # Nothing was granted.
    again = await client.get(f"/oauth2/authorize?{authorize_query(third['client_id'], challenge)}")
    assert again.status_code == 200 and 'action="/oauth2/consent"' in again.text


@pytest.mark.parametrize(
    "uri",
    [
        "https://app.example.com/Signed-out",
        "https://APP.example.com/signed-out",
        "https://app.example.com/signed-out/",
        "https://app.example.com/signed-out?x=1",
        "https://app.example.com./signed-out",
        "https://app.example.com:443/signed-out",
        f"https://app.example.com@{EVIL}/signed-out",
        f"//{EVIL}/signed-out",
        "https://other.example.com/bye",  # another client's
        REDIRECT_URI,  # this client's login redirect, not a post-logout one
    ],
)
async def test_post_logout_redirect_must_be_registered_exactly_for_that_client(
    provider: Provider, uri: str
) -> None:
    app, client, admin = provider
    after = "https://app.example.com/signed-out"
    mine = await create_client(client, admin, post_logout_redirect_uris=[after])
    await create_client(
        client,
        admin,
        name="Other",
        redirect_uris=["https://other.example.com/cb"],
        post_logout_redirect_uris=["https://other.example.com/bye"],
    )
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, mine["client_id"], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, mine["client_id"], mine["client_secret"])).json()
    for params in (
        {"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": uri},
        {"client_id": mine["client_id"], "post_logout_redirect_uri": uri},
        {"post_logout_redirect_uri": uri},
    ):
        assert_refused_page(await client.get("/oauth2/logout", params=params), EVIL)
    # Signed out already (no cookie): the registered URI is followed at once, an edited one never.
    async with browser(app) as stranger:
        refused = await stranger.get(
            "/oauth2/logout", params={"client_id": mine["client_id"], "post_logout_redirect_uri": uri}
        )
        assert_refused_page(refused, EVIL)
        ok = await stranger.get(
            "/oauth2/logout",
            params={"client_id": mine["client_id"], "post_logout_redirect_uri": after},
        )
        assert ok.status_code == 303 and ok.headers["location"] == after


# --- stolen and replayed codes --------------------------------------------------------------------


async def test_a_code_is_useless_to_another_client_and_with_another_redirect_uri(
    provider: Provider,
) -> None:
    _, client, admin = provider
    mine = await create_client(
        client, admin, redirect_uris=[REDIRECT_URI, "https://app.example.com/other"]
    )
    thief = await create_client(client, admin, name="Thief", redirect_uris=[REDIRECT_URI])
    public_thief = await create_client(
        client, admin, name="Public thief", client_type="public", redirect_uris=[REDIRECT_URI]
    )
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, mine["client_id"], email, PASSWORD)

    stolen = await exchange(client, code, verifier, thief["client_id"], thief["client_secret"])
    assert_oauth_error(stolen, "invalid_grant")
    stolen = await exchange(client, code, verifier, public_thief["client_id"])
    assert_oauth_error(stolen, "invalid_grant")
    # Claiming to be the owner without its secret is an authentication failure, not a grant.
    unauthenticated = await exchange(client, code, verifier, mine["client_id"])
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["error"] == "invalid_client"
    for redirect_uri in ("https://app.example.com/other", REDIRECT_URI + "/", ""):
        answer = await exchange(
            client, code, verifier, mine["client_id"], mine["client_secret"], redirect_uri
        )
        assert_oauth_error(answer, "invalid_grant")
    without = await client.post(
        "/oauth2/token",
        data={"grant_type": "authorization_code", "code": code, "code_verifier": verifier},
        auth=(mine["client_id"], mine["client_secret"]),
    )
    assert_oauth_error(without, "invalid_grant")
    # None of those attempts spent it: the owner still can.
    answer = await exchange(client, code, verifier, mine["client_id"], mine["client_secret"])
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"code_challenge_method": "plain"}, "plain"),
        ({"code_challenge_method": ""}, "no method"),
        ({"code_challenge_method": "s256"}, "lower-case method"),
        ({"code_challenge": ""}, "no challenge"),
        ({"code_challenge": "a" * 42}, "too short"),
        ({"code_challenge": "a" * 129}, "too long"),
        ({"code_challenge": "a" * 42 + "+"}, "not unreserved"),
        ({"code_challenge": "a" * 42 + "="}, "padding"),
        ({"code_challenge": "\u0430" * 43}, "not ASCII"),
    ],
)
async def test_pkce_cannot_be_downgraded_at_the_authorization_endpoint(
    provider: Provider, extra: dict[str, str], why: str
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin, client_type="public")
    _, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": registered["client_id"],
        "redirect_uri": REDIRECT_URI,
        "scope": "openid",
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(extra)
    answer = await client.get("/oauth2/authorize", params=params)
    assert answer.status_code == 302, (why, answer.text)
    location = answer.headers["location"]
    assert location.startswith(REDIRECT_URI + "?"), why
    assert query_of(location)["error"] == "invalid_request", why
    assert "code" not in query_of(location)


async def test_pkce_verifier_must_match_exactly(provider: Provider) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin, client_type="public")
    client_id = registered["client_id"]
    email = await new_user(client)
    verifier, challenge = pkce_pair()
    query = authorize_query(client_id, challenge)
    answer = await sign_in(client, query, email, PASSWORD)
    code = query_of(answer.headers["location"])["code"]
    for bad in (
        None,
        "",
        challenge,  # "plain": the challenge itself
        verifier[:-1],
        verifier + "a",
        verifier.upper() if verifier != verifier.upper() else verifier.lower(),
        "a" * 42,
        "\u0430" * 43,
        verifier + "\x00",
        "a" * 129,
        "a" * 100_000,
    ):
        refused = await exchange(client, code, bad, client_id)
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["error"] in ("invalid_grant", "invalid_request"), (bad, refused.text)
    assert (await exchange(client, code, verifier, client_id)).status_code == 200


async def test_a_replayed_code_is_refused_and_ends_what_it_gave(provider: Provider) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *creds)).json()
    assert (await introspect(client, creds, tokens["access_token"]))["active"] is True
    replay = await exchange(client, code, verifier, *creds)
    assert_oauth_error(replay, "invalid_grant")
    assert (await introspect(client, creds, tokens["access_token"]))["active"] is False
    assert (await introspect(client, creds, tokens["refresh_token"]))["active"] is False
    refreshed = await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        auth=creds,
    )
    assert_oauth_error(refreshed, "invalid_grant")
    assert (await client.get("/oauth2/userinfo", headers=bearer(tokens))).status_code == 401


async def test_twenty_concurrent_redemptions_of_one_code_give_one_token(
    provider: Provider,
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    answers = await asyncio.gather(
        *(exchange(client, code, verifier, *creds) for _ in range(20))
    )
    for answer in answers:
        assert_no_crash(answer)
    assert sorted(a.status_code for a in answers) == [200] + [400] * 19


async def _spoil_code(app: FastAPI, code: str, **values: Any) -> None:
    from src.security.tokens import hash_token

    await db_update(
        app,
        update(AuthorizationCode)
        .where(AuthorizationCode.code_hash == hash_token(code))
        .values(**values),
    )


async def test_an_expired_code_is_refused(provider: Provider) -> None:
    app, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    await _spoil_code(app, code, expires_at=utcnow() - timedelta(seconds=1))
    assert_oauth_error(await exchange(client, code, verifier, *creds), "invalid_grant")


async def test_a_code_dies_with_the_user_or_the_sign_in_behind_it(provider: Provider) -> None:
    app, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])

    # Deactivated between the redirect and the exchange.
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    api = (await password_grant(client, email, PASSWORD)).json()
    me = (await client.get("/api/v1/users/me", headers=bearer(api))).json()
    await set_active(app, me["id"], False)
    assert_oauth_error(await exchange(client, code, verifier, *creds), "invalid_grant")
    await set_active(app, me["id"], True)
    # ... and the code stays spent once the account is back.
    assert_oauth_error(await exchange(client, code, verifier, *creds), "invalid_grant")

    # The browser signed out between the redirect and the exchange.
    client.cookies.clear()
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    page = await client.get("/oauth2/logout")
    fields = form_posting_to(page.text, "/oauth2/logout")
    assert (await client.post("/oauth2/logout", data=fields)).status_code == 200
    assert_oauth_error(await exchange(client, code, verifier, *creds), "invalid_grant")


async def test_a_code_dies_when_the_password_changes_before_the_exchange(
    provider: Provider,
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    api = (await password_grant(client, email, PASSWORD)).json()
    changed = await client.post(
        "/api/v1/users/me/password",
        json={"current_password": PASSWORD, "new_password": "a brand new password 42"},
        headers=bearer(api),
    )
    assert changed.status_code == 204, changed.text
    # The change ended the browser session the code came from: no tokens for it.
    assert_oauth_error(await exchange(client, code, verifier, *creds), "invalid_grant")


async def test_a_deleted_clients_code_is_useless_to_a_client_reusing_its_id(
    provider: Provider,
) -> None:
    _, client, admin = provider
    first = await create_client(client, admin, client_id="reused-id")
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, "reused-id", email, PASSWORD)
    deleted = await client.delete("/api/v1/clients/reused-id", headers=admin)
    assert deleted.status_code == 204
    assert (await exchange(client, code, verifier, "reused-id", first["client_secret"])).status_code == 401
    second = await create_client(client, admin, client_id="reused-id")
    answer = await exchange(client, code, verifier, "reused-id", second["client_secret"])
    assert_oauth_error(answer, "invalid_grant")


async def test_a_code_for_a_redirect_uri_since_removed_from_the_client_is_refused(
    provider: Provider,
) -> None:
    """An administrator removes a redirect URI (say, its host was taken over): a code already
    sent there must not buy tokens, as a code of a client that lost the grant does not."""
    _, client, admin = provider
    registered = await create_client(
        client, admin, redirect_uris=[REDIRECT_URI, "https://old.example.com/cb"]
    )
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(
        client, creds[0], email, PASSWORD, redirect_uri="https://old.example.com/cb"
    )
    changed = await client.patch(
        f"/api/v1/clients/{creds[0]}", json={"redirect_uris": [REDIRECT_URI]}, headers=admin
    )
    assert changed.status_code == 200, changed.text
    answer = await exchange(
        client, code, verifier, *creds, redirect_uri="https://old.example.com/cb"
    )
    assert_oauth_error(answer, "invalid_grant")
