"""The provider attacked from outside: open redirects, stolen codes, confused clients, forged
forms, leaked consent, confused tokens, account enumeration, headers.

Every test states the safe behaviour. The app is served over https://id.example.com in process
(as in test_authorization_code.py), so the cookies are ``__Host-`` and Secure.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from src.db.models import AuthorizationCode, UserSession
from src.db.types import utcnow
from tests.support.app import PASSWORD, bearer, unique_email
from tests.support.auth import _sessions, assert_oauth_error, password_grant, set_active
from tests.support.oidc import (
    ADMIN_PASSWORD,
    ISSUER,
    REDIRECT_URI,
    Provider,
    allow,
    authorize_query,
    code_flow,
    create_client,
    exchange,
    form_posting_to,
    introspect,
    new_user,
    pkce_pair,
    query_of,
    sign_in,
)

EVIL = "evil.example.net"
SESSION_COOKIE = "__Host-ums_session"
CSRF_COOKIE = "__Host-ums_csrf"


def browser(app: FastAPI) -> httpx.AsyncClient:
    """Another browser (its own cookie jar) on the same app."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER)


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
    client: httpx.AsyncClient,
    client_id: str,
    email: str,
    scope: str = "openid",
    password: str = PASSWORD,
    **extra: str,
) -> tuple[str, str]:
    """(code, verifier) for a third-party client, consenting on the way when asked."""
    verifier, challenge = pkce_pair()
    query = authorize_query(client_id, challenge, scope=scope, **extra)
    page = await client.get(f"/oauth2/authorize?{query}")
    if page.status_code == 200 and 'action="/account/signin"' in page.text:
        fields = form_posting_to(page.text, "/account/signin")
        fields.update(email=email, password=password)
        page = await client.post("/account/signin", data=fields)
    if page.status_code == 200 and 'action="/oauth2/consent"' in page.text:
        page = await allow(client, page)
    assert page.status_code in (302, 303), page.text
    return query_of(page.headers["location"])["code"], verifier


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
    tokens = (
        await exchange(client, code, verifier, mine["client_id"], mine["client_secret"])
    ).json()
    for params in (
        {"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": uri},
        {"client_id": mine["client_id"], "post_logout_redirect_uri": uri},
        {"post_logout_redirect_uri": uri},
    ):
        assert_refused_page(await client.get("/oauth2/logout", params=params), EVIL)
    # Signed out already (no cookie): the registered URI is followed at once, an edited one never.
    async with browser(app) as stranger:
        refused = await stranger.get(
            "/oauth2/logout",
            params={"client_id": mine["client_id"], "post_logout_redirect_uri": uri},
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
        "a" * 50_000,
    ):
        refused = await exchange(client, code, bad, client_id)
        assert refused.status_code == 400, (bad, refused.text)
        if "\x00" in (bad or ""):  # refused before the app: a problem document
            assert refused.headers["content-type"] == "application/problem+json"
        else:
            assert refused.json()["error"] in ("invalid_grant", "invalid_request"), bad
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
    answers = await asyncio.gather(*(exchange(client, code, verifier, *creds) for _ in range(20)))
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
    assert (
        await exchange(client, code, verifier, "reused-id", first["client_secret"])
    ).status_code == 401
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


# --- the token endpoint ---------------------------------------------------------------------------


async def test_client_authentication_cannot_be_confused(provider: Provider) -> None:
    _, client, admin = provider
    confidential = await create_client(
        client, admin, grant_types=["client_credentials"], redirect_uris=[], scopes=["profile"]
    )
    public = await create_client(client, admin, name="SPA", client_type="public")
    cid, secret = confidential["client_id"], confidential["client_secret"]
    grant = {"grant_type": "client_credentials"}

    # Basic and a form secret at once; two different ids.
    both = await client.post(
        "/oauth2/token", data={**grant, "client_secret": secret}, headers=basic(cid, secret)
    )
    assert_oauth_error(both, "invalid_request")
    mixed = await client.post(
        "/oauth2/token",
        data={**grant, "client_id": public["client_id"]},
        headers=basic(cid, secret),
    )
    assert_oauth_error(mixed, "invalid_request")
    # Correct either way on its own.
    assert (
        await client.post("/oauth2/token", data=grant, headers=basic(cid, secret))
    ).status_code == 200
    posted = await client.post(
        "/oauth2/token", data={**grant, "client_id": cid, "client_secret": secret}
    )
    assert posted.status_code == 200

    def refused(answer: httpx.Response) -> dict[str, Any]:
        assert answer.status_code == 401, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["www-authenticate"].startswith("Basic")
        assert answer.headers["cache-control"] == "no-store"
        body: dict[str, Any] = answer.json()
        assert body["error"] == "invalid_client"
        return body

    # A confidential client without its secret, or with an empty one.
    refused(await client.post("/oauth2/token", data={**grant, "client_id": cid}))
    refused(
        await client.post("/oauth2/token", data={**grant, "client_id": cid, "client_secret": ""})
    )
    refused(await client.post("/oauth2/token", data=grant, headers=basic(cid, "")))
    # A public client that sends a secret is not who it claims to be.
    refused(
        await client.post(
            "/oauth2/token",
            data={**grant, "client_id": public["client_id"], "client_secret": "x"},
        )
    )
    refused(await client.post("/oauth2/token", data=grant, headers=basic(public["client_id"], "x")))
    # No client id, but a secret; an empty Basic user.
    refused(await client.post("/oauth2/token", data={**grant, "client_secret": secret}))
    refused(await client.post("/oauth2/token", data=grant, headers=basic("", secret)))
    refused(await client.post("/oauth2/token", data=grant, headers=basic("", "")))
    # Malformed Basic.
    for header in ("Basic !!!", "Basic " + base64.b64encode(b"\xff\xfe:x").decode(), "Basic "):
        refused(await client.post("/oauth2/token", data=grant, headers={"Authorization": header}))

    # Unknown client and wrong secret: the same answer, byte for byte.
    unknown = await client.post(
        "/oauth2/token", data=grant, headers=basic("no-such-client", secret)
    )
    wrong = await client.post("/oauth2/token", data=grant, headers=basic(cid, secret[:-1] + "x"))
    assert refused(unknown) == refused(wrong)
    assert unknown.headers["www-authenticate"] == wrong.headers["www-authenticate"]
    unknown = await client.post(
        "/oauth2/token", data={**grant, "client_id": "no-such-client", "client_secret": "s"}
    )
    wrong = await client.post(
        "/oauth2/token", data={**grant, "client_id": cid, "client_secret": "s"}
    )
    assert refused(unknown) == refused(wrong)


async def test_each_client_gets_only_its_grant_types(provider: Provider) -> None:
    _, client, admin = provider
    code_only = await create_client(client, admin, grant_types=["authorization_code"])
    service = await create_client(
        client, admin, grant_types=["client_credentials"], redirect_uris=[], scopes=["profile"]
    )
    third = await create_client(
        client, admin, first_party=False, grant_types=["authorization_code", "password"]
    )
    email = await new_user(client)
    code_creds = (code_only["client_id"], code_only["client_secret"])

    code, verifier, _ = await code_flow(client, code_creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *code_creds)).json()
    assert "refresh_token" not in tokens  # no refresh_token grant, no refresh token

    cc = await client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, auth=code_creds
    )
    assert_oauth_error(cc, "unauthorized_client")
    service_creds = (service["client_id"], service["client_secret"])
    code_at_service = await client.post(
        "/oauth2/token",
        data={"grant_type": "authorization_code", "code": "x", "redirect_uri": REDIRECT_URI},
        auth=service_creds,
    )
    assert_oauth_error(code_at_service, "unauthorized_client")
    refresh_at_service = await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": "x"},
        auth=service_creds,
    )
    assert_oauth_error(refresh_at_service, "unauthorized_client")
    # The password grant is for first-party clients only, even when registered.
    password = await client.post(
        "/oauth2/token",
        data={"grant_type": "password", "username": email, "password": PASSWORD},
        auth=(third["client_id"], third["client_secret"]),
    )
    assert_oauth_error(password, "unauthorized_client")
    for grant_type in (
        "implicit",
        "token",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "PASSWORD",
    ):
        answer = await client.post(
            "/oauth2/token", data={"grant_type": grant_type}, auth=service_creds
        )
        assert_oauth_error(answer, "unsupported_grant_type")


async def test_scopes_cannot_be_escalated_at_the_token_endpoint(provider: Provider) -> None:
    _, client, admin = provider
    service = await create_client(
        client,
        admin,
        grant_types=["client_credentials"],
        redirect_uris=[],
        scopes=["openid", "profile", "offline_access"],
    )
    creds = (service["client_id"], service["client_secret"])
    for scope in ("openid", "offline_access", "email", "profile email", "admin", "profile openid"):
        answer = await client.post(
            "/oauth2/token", data={"grant_type": "client_credentials", "scope": scope}, auth=creds
        )
        assert_oauth_error(answer, "invalid_scope")
    default = await client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, auth=creds
    )
    assert default.status_code == 200 and default.json()["scope"] == "profile"

    cli = await create_client(
        client, admin, name="CLI", grant_types=["password", "refresh_token"], scopes=["openid"]
    )
    cli_creds = (cli["client_id"], cli["client_secret"])
    email = await new_user(client)
    for scope in ("openid email", "profile", "offline_access", "openid admin"):
        answer = await client.post(
            "/oauth2/token",
            data={
                "grant_type": "password",
                "username": email,
                "password": PASSWORD,
                "scope": scope,
            },
            auth=cli_creds,
        )
        assert_oauth_error(answer, "invalid_scope")
    granted = await client.post(
        "/oauth2/token",
        data={"grant_type": "password", "username": email, "password": PASSWORD, "scope": "openid"},
        auth=cli_creds,
    )
    assert granted.status_code == 200 and granted.json()["scope"] == "openid"
    # A refresh keeps the scope it had, whatever it asks for.
    refreshed = await client.post(
        "/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": granted.json()["refresh_token"],
            "scope": "openid profile email",
        },
        auth=cli_creds,
    )
    assert refreshed.status_code in (200, 400), refreshed.text
    if refreshed.status_code == 200:
        assert refreshed.json()["scope"] == "openid"
    info = await client.get("/oauth2/userinfo", headers=bearer(granted.json()))
    assert info.status_code == 200 and set(info.json()) == {"sub"}


_FIELDS = (
    "grant_type",
    "code",
    "redirect_uri",
    "code_verifier",
    "refresh_token",
    "username",
    "password",
    "scope",
    "client_id",
    "client_secret",
)
_ODD_VALUES = (
    "x" * 100_000,
    "\u202e\u0000\ufeff",
    "\u00e9\u4e2d\U0001f600",
    "\ud800",
    "%00",
    "' OR 1=1 --",
    "\r\nSet-Cookie: x=1",
    " ",
)


async def test_odd_values_in_any_token_field_are_a_4xx_json_answer(provider: Provider) -> None:
    _, client, admin = provider
    registered = await create_client(
        client, admin, grant_types=["authorization_code", "refresh_token", "password"]
    )
    base = {
        "grant_type": "authorization_code",
        "code": "c",
        "redirect_uri": REDIRECT_URI,
        "code_verifier": "v" * 43,
        "client_id": registered["client_id"],
        "client_secret": registered["client_secret"],
    }
    grants = (
        base,
        {**base, "grant_type": "password", "username": "a@example.com", "password": "p"},
        {**base, "grant_type": "refresh_token", "refresh_token": "r"},
        {**base, "grant_type": "client_credentials"},
    )
    for path in ("/oauth2/token", "/api/v1/auth/login", "/oauth2/revoke", "/oauth2/introspect"):
        for form in grants:
            for field in (*_FIELDS, "token"):
                for value in _ODD_VALUES:
                    data = {**form, field: value}
                    body = urlencode(data, encoding="utf-8", errors="surrogatepass")
                    answer = await client.post(
                        path,
                        content=body,
                        headers={"Content-Type": "application/x-www-form-urlencoded"},
                    )
                    assert_no_crash(answer)
                    if answer.status_code >= 400:
                        assert answer.headers["content-type"] in (
                            "application/json",
                            "application/problem+json",
                        ), (path, field, value[:20], answer.text[:200])
                    assert "set-cookie" not in answer.headers
            if path != "/oauth2/token" and path != "/api/v1/auth/login":
                break


async def test_twenty_parallel_refreshes_of_one_token_give_one_new_token_and_end_the_session(
    provider: Provider,
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *creds)).json()

    async def refresh() -> httpx.Response:
        return await client.post(
            "/oauth2/token",
            data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
            auth=creds,
        )

    answers = await asyncio.gather(*(refresh() for _ in range(20)))
    for answer in answers:
        assert_no_crash(answer)
    winners = [a for a in answers if a.status_code == 200]
    assert len(winners) == 1, [a.status_code for a in answers]
    for answer in answers:
        if answer.status_code != 200:
            assert_oauth_error(answer, "invalid_grant")
    # The losers were reuse: the session is over, the winner's new tokens with it.
    new = winners[0].json()
    assert (await introspect(client, creds, new["access_token"]))["active"] is False
    again = await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": new["refresh_token"]},
        auth=creds,
    )
    assert_oauth_error(again, "invalid_grant")


# --- browser sessions, cookies and forged forms ---------------------------------------------------


def _set_cookie_headers(answer: httpx.Response, name: str) -> list[str]:
    return [h for h in answer.headers.get_list("set-cookie") if h.startswith(f"{name}=")]


async def test_each_sign_in_gets_a_new_session_and_ends_the_old_one(provider: Provider) -> None:
    app, client, admin = provider
    registered = await create_client(client, admin)
    email = await new_user(client)
    other = await new_user(client)
    _, challenge = pkce_pair()
    query = authorize_query(registered["client_id"], challenge)

    first = await sign_in(client, query, email, PASSWORD)
    assert first.status_code == 303
    [cookie] = _set_cookie_headers(first, SESSION_COOKIE)
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "secure", "path", "samesite"} <= attributes
    assert "domain" not in attributes
    assert "samesite=lax" in cookie.lower() and "path=/" in cookie.lower()
    old = client.cookies[SESSION_COOKIE]

    # Signing in again (as someone else, even) never keeps the session id the browser had.
    second = await sign_in(
        client, authorize_query(registered["client_id"], challenge, prompt="login"), other, PASSWORD
    )
    assert second.status_code == 303
    new = client.cookies[SESSION_COOKIE]
    assert new != old
    async with browser(app) as attacker:
        attacker.cookies.set(SESSION_COOKIE, old, domain="id.example.com")
        silent = authorize_query(registered["client_id"], challenge, prompt="none")
        page = await attacker.get(f"/oauth2/authorize?{silent}")
        assert page.status_code == 302
        assert query_of(page.headers["location"])["error"] == "login_required"
        assert (await attacker.get("/account")).headers["location"] == "/account/signin"
    # A cookie the attacker made up is not a session either.
    async with browser(app) as attacker:
        attacker.cookies.set(SESSION_COOKIE, "A" * 43, domain="id.example.com")
        assert (await attacker.get("/account")).status_code == 303


async def test_csrf_cookie_is_host_only_http_only_and_secure(provider: Provider) -> None:
    _, client, _ = provider
    page = await client.get("/account/signin")
    [cookie] = _set_cookie_headers(page, CSRF_COOKIE)
    lowered = cookie.lower()
    assert "httponly" in lowered and "secure" in lowered and "path=/" in lowered
    assert "samesite=lax" in lowered and "domain" not in lowered


async def test_forms_posted_without_this_browsers_csrf_token_change_nothing(
    provider: Provider,
) -> None:
    app, client, admin = provider
    third = await create_client(client, admin, first_party=False, name="Third")
    email = await new_user(client)
    code, _ = await third_party_code(client, third["client_id"], email, scope="openid")
    assert code
    account = await client.get("/account")
    assert account.status_code == 200
    revoke_url = f"/account/consents/{third['client_id']}/revoke"
    assert f'action="{revoke_url}"' in account.text

    # The attacker's own browser gives it a valid token... for its own cookie only.
    async with browser(app) as attacker:
        page = await attacker.get("/account/signin")
        attackers_token = form_posting_to(page.text, "/account/signin")["csrf_token"]
    _, challenge = pkce_pair()
    attempts: list[tuple[str, dict[str, str]]] = [
        ("/account/signin", {"email": email, "password": PASSWORD}),
        (
            "/oauth2/consent",
            {
                "authz": authorize_query(third["client_id"], challenge, scope="openid email"),
                "decision": "allow",
            },
        ),
        ("/oauth2/logout", {"logout_request": ""}),
        ("/account/signout", {}),
        (revoke_url, {}),
        ("/account/signup", {"email": unique_email(), "password": PASSWORD}),
        ("/account/forgot-password", {"email": email}),
    ]
    for token in (None, "", "forged", attackers_token, "A" * 43):
        for path, fields in attempts:
            data = dict(fields)
            if token is not None:
                data["csrf_token"] = token
            answer = await client.post(path, data=data)
            assert answer.status_code == 403, (path, token, answer.status_code)
            assert SESSION_COOKIE not in answer.cookies

    # A cross-site browser (no cookies at all) posting the attacker's pair: login CSRF refused.
    async with browser(app) as victim:
        answer = await victim.post(
            "/account/signin",
            data={"email": email, "password": PASSWORD, "csrf_token": attackers_token},
        )
        assert answer.status_code == 403 and SESSION_COOKIE not in answer.cookies
    # Still signed in, the consent still there, no extra scope granted.
    account = await client.get("/account")
    assert account.status_code == 200 and f'action="{revoke_url}"' in account.text
    query = authorize_query(third["client_id"], challenge, scope="openid", prompt="none")
    assert "code" in query_of((await client.get(f"/oauth2/authorize?{query}")).headers["location"])
    query = authorize_query(third["client_id"], challenge, scope="openid email", prompt="none")
    silent = await client.get(f"/oauth2/authorize?{query}")
    assert query_of(silent.headers["location"])["error"] == "consent_required"


# --- consent --------------------------------------------------------------------------------------


async def test_revoked_consent_is_asked_again_and_never_silently(provider: Provider) -> None:
    _, client, admin = provider
    third = await create_client(client, admin, first_party=False, name="Third")
    creds = (third["client_id"], third["client_secret"])
    email = await new_user(client)
    scope = "openid profile offline_access"
    code, verifier = await third_party_code(client, creds[0], email, scope=scope)
    tokens = (await exchange(client, code, verifier, *creds)).json()
    account = await client.get("/account")
    revoke_url = f"/account/consents/{creds[0]}/revoke"
    fields = form_posting_to(account.text, revoke_url)
    assert (await client.post(revoke_url, data=fields)).status_code == 303
    # Its tokens ended with the consent...
    assert (await client.get("/oauth2/userinfo", headers=bearer(tokens))).status_code == 401
    refreshed = await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        auth=creds,
    )
    assert_oauth_error(refreshed, "invalid_grant")
    # ... and no code comes back without asking again.
    _, challenge = pkce_pair()
    query = authorize_query(creds[0], challenge, scope="openid", prompt="none", state="s1")
    silent = await client.get(f"/oauth2/authorize?{query}")
    assert silent.status_code == 302
    assert query_of(silent.headers["location"]) == {
        "error": "consent_required",
        "error_description": query_of(silent.headers["location"])["error_description"],
        "state": "s1",
        "iss": ISSUER,
    }
    page = await client.get(
        f"/oauth2/authorize?{authorize_query(creds[0], challenge, scope='openid')}"
    )
    assert page.status_code == 200 and 'action="/oauth2/consent"' in page.text


async def test_consent_to_some_scopes_does_not_cover_more(provider: Provider) -> None:
    _, client, admin = provider
    third = await create_client(client, admin, first_party=False, name="Third")
    creds = (third["client_id"], third["client_secret"])
    email = await new_user(client)
    await third_party_code(client, creds[0], email, scope="openid")
    _, challenge = pkce_pair()
    more = authorize_query(creds[0], challenge, scope="openid email")
    page = await client.get(f"/oauth2/authorize?{more}")
    assert page.status_code == 200 and 'action="/oauth2/consent"' in page.text
    assert "Your email address" in page.text and "Sign you in" not in page.text
    silent = await client.get(f"/oauth2/authorize?{more}&prompt=none")
    assert query_of(silent.headers["location"])["error"] == "consent_required"
    # Denying the addition keeps the old consent, adds nothing.
    fields = form_posting_to(page.text, "/oauth2/consent")
    denied = await client.post("/oauth2/consent", data={**fields, "decision": "deny"})
    assert query_of(denied.headers["location"])["error"] == "access_denied"
    silent = await client.get(f"/oauth2/authorize?{more}&prompt=none")
    assert query_of(silent.headers["location"])["error"] == "consent_required"
    code, verifier = await third_party_code(client, creds[0], email, scope="openid", prompt="none")
    tokens = (await exchange(client, code, verifier, *creds)).json()
    assert tokens["scope"] == "openid"
    assert set((await client.get("/oauth2/userinfo", headers=bearer(tokens))).json()) == {"sub"}


async def test_one_users_consent_is_not_anothers(provider: Provider) -> None:
    app, client, admin = provider
    third = await create_client(client, admin, first_party=False, name="Third")
    alice = await new_user(client)
    bob = await new_user(client)
    await third_party_code(client, third["client_id"], alice, scope="openid email")
    async with browser(app) as bobs:
        _, challenge = pkce_pair()
        query = authorize_query(third["client_id"], challenge, scope="openid email")
        page = await sign_in(bobs, query, bob, PASSWORD)
        assert page.status_code == 200 and 'action="/oauth2/consent"' in page.text
        assert bob in page.text and alice not in page.text
        silent = await bobs.get(f"/oauth2/authorize?{query}&prompt=none")
        assert query_of(silent.headers["location"])["error"] == "consent_required"


async def test_a_third_party_gets_a_refresh_token_only_when_offline_access_was_consented(
    provider: Provider,
) -> None:
    """The consent page lists offline_access ("Stay signed in") as something the user grants;
    a refresh token handed out without it would make that line meaningless."""
    _, client, admin = provider
    third = await create_client(client, admin, first_party=False, name="Third")
    creds = (third["client_id"], third["client_secret"])
    email = await new_user(client)
    code, verifier = await third_party_code(client, creds[0], email, scope="openid")
    tokens = (await exchange(client, code, verifier, *creds)).json()
    assert "refresh_token" not in tokens, "refresh token without offline_access consent"
    code, verifier = await third_party_code(client, creds[0], email, scope="openid offline_access")
    tokens = (await exchange(client, code, verifier, *creds)).json()
    assert tokens.get("refresh_token")


# --- tokens used where they do not belong ---------------------------------------------------------


async def test_a_third_party_token_is_not_a_key_to_the_account_api(provider: Provider) -> None:
    """A third-party application's access token carries the scopes the user consented to
    (here only ``openid``). It must not read the account (the email the user did not share),
    change it, or, for an administrator, act as one."""
    _, client, admin = provider
    third = await create_client(client, admin, first_party=False, name="Third", scopes=["openid"])
    creds = (third["client_id"], third["client_secret"])
    email = await new_user(client)
    code, verifier = await third_party_code(client, creds[0], email, scope="openid")
    tokens = (await exchange(client, code, verifier, *creds)).json()
    assert (await client.get("/oauth2/userinfo", headers=bearer(tokens))).json().keys() == {"sub"}

    me = await client.get("/api/v1/users/me", headers=bearer(tokens))
    assert me.status_code in (401, 403), me.text
    assert email not in me.text
    patched = await client.patch(
        "/api/v1/users/me", json={"full_name": "Owned"}, headers=bearer(tokens)
    )
    assert patched.status_code in (401, 403), patched.text
    sessions = await client.get("/api/v1/users/me/sessions", headers=bearer(tokens))
    assert sessions.status_code in (401, 403), sessions.text


async def test_an_administrators_third_party_token_cannot_use_the_admin_api(
    provider: Provider,
) -> None:
    _, client, admin = provider
    third = await create_client(client, admin, first_party=False, name="Third", scopes=["openid"])
    creds = (third["client_id"], third["client_secret"])
    admin_me = (await client.get("/api/v1/users/me", headers=admin)).json()
    client.cookies.clear()
    code, verifier = await third_party_code(
        client, creds[0], admin_me["email"], scope="openid", password=ADMIN_PASSWORD
    )
    tokens = (await exchange(client, code, verifier, *creds)).json()
    users = await client.get("/api/v1/users", headers=bearer(tokens))
    assert users.status_code in (401, 403), users.text
    clients = await client.get("/api/v1/clients", headers=bearer(tokens))
    assert clients.status_code in (401, 403), clients.text


async def test_userinfo_wants_the_openid_scope(provider: Provider) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD, scope="profile email")
    tokens = (await exchange(client, code, verifier, *creds)).json()
    assert "id_token" not in tokens
    for method in ("GET", "POST"):
        answer = await client.request(method, "/oauth2/userinfo", headers=bearer(tokens))
        assert answer.status_code == 403, answer.text
        assert 'error="insufficient_scope"' in answer.headers["www-authenticate"]
        assert email not in answer.text
    assert (await client.get("/oauth2/userinfo")).status_code == 401
    garbage = await client.get("/oauth2/userinfo", headers={"Authorization": "Bearer x.y.z"})
    assert garbage.status_code == 401


async def test_an_id_token_is_not_an_access_token(provider: Provider) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *creds)).json()
    id_token = {"access_token": tokens["id_token"]}
    assert (await client.get("/api/v1/users/me", headers=bearer(id_token))).status_code == 401
    assert (await client.get("/oauth2/userinfo", headers=bearer(id_token))).status_code == 401
    assert (await introspect(client, creds, tokens["id_token"]))["active"] is False
    revoked = await client.post("/oauth2/revoke", data={"token": tokens["id_token"]}, auth=creds)
    assert revoked.status_code == 200
    assert (await client.get("/oauth2/userinfo", headers=bearer(tokens))).status_code == 200


async def test_only_an_id_token_is_accepted_as_id_token_hint(provider: Provider) -> None:
    """OpenID Connect RP-Initiated Logout: id_token_hint is an ID token this provider issued.
    An access token (same signing key, same issuer) or a service token is not one."""
    _, client, admin = provider
    after = "https://app.example.com/signed-out"
    registered = await create_client(client, admin, post_logout_redirect_uris=[after])
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *creds)).json()
    service = await create_client(
        client, admin, grant_types=["client_credentials"], redirect_uris=[], scopes=["profile"]
    )
    service_token = (
        await client.post(
            "/oauth2/token",
            data={"grant_type": "client_credentials"},
            auth=(service["client_id"], service["client_secret"]),
        )
    ).json()["access_token"]
    page = await client.get("/oauth2/logout", params={"id_token_hint": tokens["id_token"]})
    assert page.status_code == 200
    for kind, hint in (
        ("refresh token", tokens["refresh_token"]),
        ("garbage", "x.y.z"),
        ("access token", tokens["access_token"]),
        ("service token", service_token),
    ):
        answer = await client.get("/oauth2/logout", params={"id_token_hint": hint})
        assert answer.status_code == 400, f"{kind} accepted as id_token_hint"
        assert_refused_page(answer)


async def test_introspection_needs_a_confidential_client(provider: Provider) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *creds)).json()
    public = await create_client(client, admin, client_type="public", name="SPA")
    for data in (
        {"token": tokens["access_token"], "client_id": public["client_id"]},
        {"token": tokens["access_token"]},
        {"token": tokens["access_token"], "client_id": creds[0]},
        {"token": tokens["access_token"], "client_id": creds[0], "client_secret": "wrong"},
    ):
        refused = await client.post("/oauth2/introspect", data=data)
        assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"
        assert email not in refused.text


async def test_introspection_tells_a_client_no_more_than_the_user_granted_it(
    provider: Provider,
) -> None:
    """A third party allowed ``openid`` only must not learn the user's email address by
    introspecting its own token (introspection answers ``username`` with the address)."""
    _, client, admin = provider
    third = await create_client(
        client, admin, first_party=False, name="Third", scopes=["openid", "offline_access"]
    )
    creds = (third["client_id"], third["client_secret"])
    email = await new_user(client)
    code, verifier = await third_party_code(client, creds[0], email, scope="openid offline_access")
    tokens = (await exchange(client, code, verifier, *creds)).json()
    for token in (tokens["access_token"], tokens["refresh_token"]):
        mine = await introspect(client, creds, token)
        assert mine["active"] is True and mine["client_id"] == creds[0]
        assert email not in str(mine), mine


async def test_introspection_does_not_show_a_client_another_clients_tokens(
    provider: Provider,
) -> None:
    """Any confidential client may call the endpoint; one must not be able to check (and read
    the user behind) a token issued to a different application."""
    _, client, admin = provider
    victim_app = await create_client(client, admin, name="Victim app")
    creds = (victim_app["client_id"], victim_app["client_secret"])
    nosy = await create_client(client, admin, first_party=False, name="Nosy", scopes=["openid"])
    nosy_creds = (nosy["client_id"], nosy["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *creds)).json()
    for token in (tokens["access_token"], tokens["refresh_token"]):
        theirs = await introspect(client, nosy_creds, token)
        assert theirs == {"active": False}, theirs


async def test_dead_tokens_are_inactive_everywhere(provider: Provider) -> None:
    app, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)

    # Revoked by the client.
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *creds)).json()
    assert (
        await client.post("/oauth2/revoke", data={"token": tokens["access_token"]}, auth=creds)
    ).status_code == 200
    for token in (tokens["access_token"], tokens["refresh_token"]):
        assert (await introspect(client, creds, token))["active"] is False
    assert (await client.get("/oauth2/userinfo", headers=bearer(tokens))).status_code == 401

    # Expired (the session's end moved into the past, as time would).
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *creds)).json()
    from tests.support.auth import session_of

    past = utcnow() - timedelta(days=1)
    await db_update(
        app,
        update(UserSession)
        .where(UserSession.id == uuid.UUID(session_of(tokens)))
        .values(expires_at=past, absolute_expires_at=past),
    )
    await app.state.services.security.cache.invalidate(session_ids=[uuid.UUID(session_of(tokens))])
    for token in (tokens["access_token"], tokens["refresh_token"]):
        assert (await introspect(client, creds, token))["active"] is False
    assert (await client.get("/oauth2/userinfo", headers=bearer(tokens))).status_code == 401
    refreshed = await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        auth=creds,
    )
    assert_oauth_error(refreshed, "invalid_grant")


async def test_a_deleted_clients_service_token_is_inactive(provider: Provider) -> None:
    _, client, admin = provider
    service = await create_client(
        client, admin, grant_types=["client_credentials"], redirect_uris=[], scopes=["profile"]
    )
    checker = await create_client(client, admin, name="Resource server")
    checker_creds = (checker["client_id"], checker["client_secret"])
    token = (
        await client.post(
            "/oauth2/token",
            data={"grant_type": "client_credentials"},
            auth=(service["client_id"], service["client_secret"]),
        )
    ).json()["access_token"]
    assert (await introspect(client, checker_creds, token))["active"] is True
    deleted = await client.delete(f"/api/v1/clients/{service['client_id']}", headers=admin)
    assert deleted.status_code == 204
    assert (await introspect(client, checker_creds, token)) == {"active": False}
    assert (await client.get("/oauth2/userinfo", headers=bearer(token))).status_code == 401


# --- account enumeration --------------------------------------------------------------------------


def _without_tokens(html: str, *echoed: str) -> str:
    import re

    html = re.sub(r'name="csrf_token" value="[^"]*"', "", html)
    for text in echoed:
        html = html.replace(text, "EMAIL")
    return html


async def test_the_sign_in_page_says_the_same_for_an_unknown_account_and_a_wrong_password(
    provider: Provider,
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    email = await new_user(client)
    unknown = unique_email()
    _, challenge = pkce_pair()
    query = authorize_query(registered["client_id"], challenge)
    page = await client.get(f"/oauth2/authorize?{query}")
    fields = form_posting_to(page.text, "/account/signin")
    for authz in (fields["authz"], ""):
        wrong = await client.post(
            "/account/signin", data={**fields, "authz": authz, "email": email, "password": "nope"}
        )
        nobody = await client.post(
            "/account/signin",
            data={**fields, "authz": authz, "email": unknown, "password": "nope"},
        )
        assert wrong.status_code == nobody.status_code == 400
        assert _without_tokens(wrong.text, email) == _without_tokens(nobody.text, unknown)
        assert "Invalid email or password." in wrong.text
        assert wrong.headers.get("set-cookie") == nobody.headers.get("set-cookie")


async def test_forgot_password_says_the_same_whether_or_not_the_account_exists(
    provider: Provider,
) -> None:
    _, client, _ = provider
    email = await new_user(client)
    page = await client.get("/account/forgot-password")
    fields = form_posting_to(page.text, "/account/forgot-password")
    known = await client.post("/account/forgot-password", data={**fields, "email": email})
    unknown = await client.post(
        "/account/forgot-password", data={**fields, "email": unique_email()}
    )
    assert known.status_code == unknown.status_code == 200
    assert _without_tokens(known.text) == _without_tokens(unknown.text)


async def test_sign_up_with_a_taken_address_says_so(provider: Provider) -> None:
    """Documented, not hidden: the sign-up page (like POST /auth/register) answers 409 for an
    address that has an account, so sign-up does reveal accounts (throttled per address and
    client, as registration is)."""
    _, client, _ = provider
    email = await new_user(client)
    page = await client.get("/account/signup")
    fields = form_posting_to(page.text, "/account/signup")
    taken = await client.post(
        "/account/signup", data={**fields, "email": email, "password": "another fine password 1"}
    )
    assert taken.status_code == 409
    assert "Traceback" not in taken.text and "password_hash" not in taken.text


# --- headers and error formats --------------------------------------------------------------------


def assert_page_headers(answer: httpx.Response) -> None:
    csp = answer.headers["content-security-policy"]
    directives = {d.strip().split(" ")[0]: d.strip() for d in csp.split(";")}
    assert directives["default-src"] == "default-src 'none'", csp
    assert directives["frame-ancestors"] == "frame-ancestors 'none'", csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "*" not in csp, csp
    assert "script-src" not in directives or "'none'" in directives["script-src"], csp
    assert answer.headers["cache-control"] == "no-store", answer.headers
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "Traceback" not in answer.text


async def test_every_hosted_page_has_the_strict_headers(provider: Provider) -> None:
    _, client, admin = provider
    third = await create_client(client, admin, first_party=False, name="Third")
    email = await new_user(client)
    _, challenge = pkce_pair()
    query = authorize_query(third["client_id"], challenge)
    answers = [
        await client.get(f"/oauth2/authorize?{query}"),  # sign-in
        await client.get(f"/oauth2/authorize?{query}&response_type=token"),  # redirect error
        await client.get("/oauth2/authorize?client_id=nope"),  # error page
        await client.get("/account/signin"),
        await client.get("/account/signin", params={"authz": "client_id=nope"}),
        await client.get("/account/signup"),
        await client.get("/account/forgot-password"),
        await client.get("/account/reset-password", params={"token": "x"}),
        await client.get("/account/reset-password"),
        await client.get("/account/verify-email", params={"token": "x"}),
        await client.get("/account/confirm-email-change", params={"token": "x"}),
        await client.get("/account/undo-email-change", params={"token": "x"}),
        await client.get("/account"),  # redirect to sign in
        await client.get("/oauth2/logout"),
        await client.post("/account/signin", data={}),  # CSRF refusal
        await client.post("/oauth2/consent", data={}),
        await client.post("/oauth2/logout", data={}),
        await client.post("/account/signout", data={}),
    ]
    consent = await sign_in(client, query, email, PASSWORD)
    answers += [
        consent,
        await client.get("/account"),
        await client.get("/oauth2/logout"),
        await client.get("/account/signin"),  # signed in: redirect to the account
        await allow(client, consent),  # the redirect with a code
    ]
    for answer in answers:
        assert_page_headers(answer)
    # The form may post back to the application's origin, and nowhere else.
    csp = consent.headers["content-security-policy"]
    assert "form-action 'self' https://app.example.com;" in csp + ";", csp


async def test_machine_endpoints_keep_their_formats_and_no_traceback_anywhere(
    provider: Provider,
) -> None:
    _, client, _ = provider
    oauth = await client.post("/oauth2/token", data={})
    assert_oauth_error(oauth, "invalid_request")
    for method, path in (
        ("GET", "/oauth2/token"),
        ("POST", "/oauth2/authorize"),
        ("GET", "/oauth2/nope"),
        ("PUT", "/oauth2/userinfo"),
    ):
        answer = await client.request(method, path)
        assert answer.status_code in (404, 405), (method, path, answer.status_code)
        assert answer.headers["content-type"] == "application/problem+json"
        assert_no_crash(answer)
    json_body = await client.post("/oauth2/token", json={"grant_type": "client_credentials"})
    assert_no_crash(json_body)
    assert json_body.status_code == 400
    multipart = await client.post(
        "/oauth2/token", files={"grant_type": ("x.txt", b"client_credentials")}
    )
    assert_no_crash(multipart)
    broken = await client.post(
        "/account/signin",
        content=b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nb',
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    assert_no_crash(broken)
    broken = await client.post(
        "/oauth2/consent",
        content=b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nb',
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    assert_no_crash(broken)


# --- odd authorization requests -------------------------------------------------------------------


async def test_long_state_and_nonce_are_refused_without_echoing_them(provider: Provider) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    _, challenge = pkce_pair()
    long_state = authorize_query(registered["client_id"], challenge, state="s" * 1025)
    answer = await client.get(f"/oauth2/authorize?{long_state}")
    assert answer.status_code == 302
    params = query_of(answer.headers["location"])
    assert params["error"] == "invalid_request" and "state" not in params
    long_nonce = authorize_query(registered["client_id"], challenge, nonce="n" * 513)
    answer = await client.get(f"/oauth2/authorize?{long_nonce}")
    assert query_of(answer.headers["location"])["error"] == "invalid_request"
    huge = authorize_query(registered["client_id"], challenge, state="s" * 5000)
    assert_refused_page(await client.get(f"/oauth2/authorize?{huge}"))
    huge = authorize_query(registered["client_id"], challenge, nonce="n" * 5000)
    assert_refused_page(await client.get(f"/oauth2/authorize?{huge}"))


@pytest.mark.parametrize(
    "max_age",
    ["-1", "1e3", "0x10", " 5", "5 ", "9" * 13, str(10 * 365 * 86400 + 1), "\u00b2", "\u2460"],
)
async def test_a_malformed_max_age_goes_back_as_invalid_request(
    provider: Provider, max_age: str
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    _, challenge = pkce_pair()
    query = authorize_query(registered["client_id"], challenge, max_age=max_age, state="st")
    answer = await client.get(f"/oauth2/authorize?{query}")
    assert_no_crash(answer)
    assert answer.status_code == 302, answer.text[:300]
    params = query_of(answer.headers["location"])
    assert params["error"] == "invalid_request" and params["state"] == "st"


async def test_max_age_in_other_scripts_digits_does_not_crash(provider: Provider) -> None:
    """Arabic-Indic or full-width digits are read as the number they show (str.isdigit and int
    agree on them): lenient, harmless. Only the answer's kind is checked."""
    _, client, admin = provider
    registered = await create_client(client, admin)
    _, challenge = pkce_pair()
    for max_age in ("\u0661\u0662", "\uff15"):
        query = authorize_query(registered["client_id"], challenge, max_age=max_age)
        answer = await client.get(f"/oauth2/authorize?{query}")
        assert_no_crash(answer)
        assert answer.status_code in (200, 302)


async def test_max_age_zero_and_prompt_login_sign_in_once_then_give_a_code(
    provider: Provider,
) -> None:
    """OpenID Connect Core 3.1.2.1: max_age=0 means "sign in now", like prompt=login. The
    fresh sign-in satisfies it; asking again would trap the user in the form."""
    _, client, admin = provider
    registered = await create_client(client, admin)
    email = await new_user(client)
    await code_flow(client, registered["client_id"], email, PASSWORD)
    for extra in ({"prompt": "login"}, {"max_age": "0"}):
        _, challenge = pkce_pair()
        query = authorize_query(registered["client_id"], challenge, **extra)
        answer = await sign_in(client, query, email, PASSWORD)
        assert answer.status_code == 303, (extra, answer.text[:300])
        assert "code" in query_of(answer.headers["location"]), extra


async def test_login_hint_and_the_client_name_are_escaped_on_the_page(provider: Provider) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin, name='Evil"><b>app</b>', first_party=False)
    _, challenge = pkce_pair()
    hint = '"><script>alert(1)</script><input value="'
    query = authorize_query(registered["client_id"], challenge, login_hint=hint)
    page = await client.get(f"/oauth2/authorize?{query}")
    assert page.status_code == 200
    assert "<script>" not in page.text and '"><b>' not in page.text
    assert "&lt;script&gt;" in page.text or "&#34;&gt;&lt;script" in page.text


@pytest.mark.parametrize(
    "uri",
    [
        "https://my_app.example.com/callback",
        "https://app.example.com%2Fx/callback",
        "https://[fe80::1%25eth0]/callback",
        "https://a!b.example.com/callback",
    ],
)
async def test_any_redirect_uri_the_registration_accepts_can_be_used_without_a_crash(
    provider: Provider, uri: str
) -> None:
    """Whatever the registration rules let an administrator register must give a working page
    (its origin goes into the page's CSP form-action), never a 500."""
    _, client, admin = provider
    response = await client.post(
        "/api/v1/clients",
        json={
            "name": "Odd host",
            "redirect_uris": [uri],
            "post_logout_redirect_uris": [uri],
            "scopes": ["openid"],
        },
        headers=admin,
    )
    assert_no_crash(response)
    if response.status_code == 422:
        return  # refused at registration: safe
    assert response.status_code == 201, response.text
    client_id = response.json()["client_id"]
    email = await new_user(client)
    _, challenge = pkce_pair()
    query = authorize_query(client_id, challenge, redirect_uri=uri, scope="openid")
    page = await client.get(f"/oauth2/authorize?{query}")
    assert_no_crash(page)
    assert page.status_code == 200
    fields = form_posting_to(page.text, "/account/signin")
    consent = await client.post(
        "/account/signin", data={**fields, "email": email, "password": PASSWORD}
    )
    assert_no_crash(consent)
    logout = await client.get(
        "/oauth2/logout", params={"client_id": client_id, "post_logout_redirect_uri": uri}
    )
    assert_no_crash(logout)


async def test_signing_out_ends_the_applications_sessions_and_forgets_the_cookie(
    provider: Provider,
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *creds)).json()
    old = client.cookies[SESSION_COOKIE]
    account = await client.get("/account")
    fields = form_posting_to(account.text, "/account/signout")
    answer = await client.post("/account/signout", data=fields)
    assert answer.status_code == 200
    [cleared] = _set_cookie_headers(answer, SESSION_COOKIE)
    lowered = cleared.lower()
    assert "max-age=0" in lowered or "expires=thu, 01 jan 1970" in lowered, cleared
    assert "secure" in lowered and "path=/" in lowered
    assert (await client.get("/oauth2/userinfo", headers=bearer(tokens))).status_code == 401
    assert (await introspect(client, creds, tokens["refresh_token"]))["active"] is False
    client.cookies.set(SESSION_COOKIE, old, domain="id.example.com")
    assert (await client.get("/account")).headers["location"] == "/account/signin"
