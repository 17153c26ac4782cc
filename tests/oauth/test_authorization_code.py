"""The authorization code flow through the hosted pages, in process: the rules and the attacks.

The stock relying party over real HTTP is in test_oidc_live.py, the browser in test_browser.py.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from src.db.models import AuthorizationCode
from src.db.types import utcnow
from tests.conftest import SettingsFactory
from tests.support.app import PASSWORD, bearer, running_app
from tests.support.auth import (
    _sessions,
    assert_oauth_error,
    password_grant,
    set_active,
    unverified_claims,
)
from tests.support.oidc import (
    ISSUER,
    REDIRECT_URI,
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


async def test_discovery_names_every_endpoint_and_only_s256(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, _ = provider
    response = await client.get("/.well-known/openid-configuration")
    assert response.status_code == 200
    meta = response.json()
    assert meta["issuer"] == ISSUER
    for name, path in {
        "authorization_endpoint": "/oauth2/authorize",
        "token_endpoint": "/oauth2/token",
        "userinfo_endpoint": "/oauth2/userinfo",
        "jwks_uri": "/.well-known/jwks.json",
        "revocation_endpoint": "/oauth2/revoke",
        "introspection_endpoint": "/oauth2/introspect",
        "end_session_endpoint": "/oauth2/logout",
    }.items():
        assert meta[name] == ISSUER + path
    assert meta["response_types_supported"] == ["code"]
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["authorization_response_iss_parameter_supported"] is True
    assert {"client_secret_basic", "client_secret_post", "none"} <= set(
        meta["token_endpoint_auth_methods_supported"]
    )
    assert {"openid", "profile", "email"} <= set(meta["scopes_supported"])
    assert "RS256" in meta["id_token_signing_alg_values_supported"]
    assert "max-age" in response.headers["cache-control"]


async def test_first_party_code_flow_gives_tokens_bound_to_the_client(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    app, client, admin = provider
    registered = await create_client(client, admin)
    client_id, secret = registered["client_id"], registered["client_secret"]
    email = await new_user(client)

    code, verifier, params = await code_flow(client, client_id, email, PASSWORD, nonce="n-123")
    assert params["iss"] == ISSUER  # RFC 9207
    assert params["state"].startswith("state-")
    response = await exchange(client, code, verifier, client_id, secret)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    tokens = response.json()
    assert tokens["token_type"] == "bearer" and tokens["refresh_token"]
    assert set(tokens["scope"].split()) == {"openid", "profile", "email"}

    id_claims = app.state.services.security.tokens.decode_id_token_hint(tokens["id_token"])
    assert id_claims["iss"] == ISSUER and id_claims["aud"] == client_id
    assert id_claims["nonce"] == "n-123"
    assert id_claims["amr"] == ["pwd"]
    assert id_claims["email"] == email and id_claims["email_verified"] is False
    assert {"sub", "sid", "auth_time", "exp", "iat"} <= set(id_claims)
    access = unverified_claims(tokens["access_token"])
    assert access["client_id"] == client_id and "openid" in access["scope"].split()

    info = await client.get("/oauth2/userinfo", headers=bearer(tokens))
    assert info.status_code == 200, info.text
    assert info.json()["sub"] == id_claims["sub"] and info.json()["email"] == email

    # The refresh token works for this client only, and rotates.
    other = await create_client(client, admin, name="Other app")
    stolen = await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        auth=(other["client_id"], other["client_secret"]),
    )
    assert_oauth_error(stolen, "invalid_grant")
    refreshed = await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        auth=(client_id, secret),
    )
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.json()["refresh_token"] != tokens["refresh_token"]


async def test_a_replayed_code_is_refused_and_revokes_what_it_gave(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    first = await exchange(client, code, verifier, *creds)
    assert first.status_code == 200
    tokens = first.json()
    assert (await introspect(client, creds, tokens["access_token"]))["active"] is True

    replay = await exchange(client, code, verifier, *creds)
    assert_oauth_error(replay, "invalid_grant")
    assert (await introspect(client, creds, tokens["access_token"]))["active"] is False
    assert (await client.get("/api/v1/users/me", headers=bearer(tokens))).status_code == 401


async def test_parallel_exchanges_of_one_code_give_one_answer(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    answers = await asyncio.gather(*(exchange(client, code, verifier, *creds) for _ in range(20)))
    assert sorted(a.status_code for a in answers) == [200] + [400] * 19


@pytest.mark.parametrize(
    ("verifier_of", "redirect_uri"),
    [
        (lambda v: "x" * 43 + "wrong", REDIRECT_URI),  # wrong verifier
        (lambda v: None, REDIRECT_URI),  # no verifier
        (lambda v: v, REDIRECT_URI + "/other"),  # another redirect URI
        (lambda v: v, "https://evil.example.com/callback"),
    ],
)
async def test_the_code_is_bound_to_its_verifier_and_redirect_uri(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
    verifier_of: Any,
    redirect_uri: str,
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    answer = await exchange(client, code, verifier_of(verifier), *creds, redirect_uri=redirect_uri)
    assert_oauth_error(answer, "invalid_grant")


async def test_a_code_for_another_client_or_expired_is_refused(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    app, client, admin = provider
    mine = await create_client(client, admin)
    theirs = await create_client(client, admin, name="Theirs")
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, mine["client_id"], email, PASSWORD)
    answer = await exchange(client, code, verifier, theirs["client_id"], theirs["client_secret"])
    assert_oauth_error(answer, "invalid_grant")

    code, verifier, _ = await code_flow(client, mine["client_id"], email, PASSWORD)
    async with _sessions(app)() as db:
        await db.execute(
            update(AuthorizationCode).values(expires_at=utcnow() - timedelta(seconds=1))
        )
        await db.commit()
    answer = await exchange(client, code, verifier, mine["client_id"], mine["client_secret"])
    assert_oauth_error(answer, "invalid_grant")


async def test_pkce_is_required_and_only_s256(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    _, challenge = pkce_pair()
    for extra in (
        {"code_challenge": ""},
        {"code_challenge_method": "plain"},
        {"code_challenge_method": ""},
    ):
        query = authorize_query(registered["client_id"], challenge, state="s1", **extra)
        answer = await client.get(f"/oauth2/authorize?{query}")
        assert answer.status_code == 302, answer.text
        params = query_of(answer.headers["location"])
        assert answer.headers["location"].startswith(REDIRECT_URI + "?")
        assert params["error"] == "invalid_request" and params["state"] == "s1"
        assert params["iss"] == ISSUER


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "https://evil.example.com/callback",
        REDIRECT_URI + "/",
        REDIRECT_URI + "?next=https://evil.example.com",
        REDIRECT_URI + "#x",
        "",
    ],
)
async def test_an_unregistered_redirect_uri_gets_an_error_page_not_a_redirect(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]], redirect_uri: str
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    _, challenge = pkce_pair()
    query = authorize_query(registered["client_id"], challenge, redirect_uri=redirect_uri)
    answer = await client.get(f"/oauth2/authorize?{query}")
    assert answer.status_code == 400
    assert "location" not in answer.headers
    assert answer.headers["content-type"].startswith("text/html")
    assert "evil.example.com" not in answer.text


async def test_unknown_client_and_repeated_parameters_get_an_error_page(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    _, challenge = pkce_pair()
    query = authorize_query("no-such-client", challenge)
    assert (await client.get(f"/oauth2/authorize?{query}")).status_code == 400
    query = authorize_query(registered["client_id"], challenge)
    doubled = f"{query}&redirect_uri=https%3A%2F%2Fevil.example.com%2Fcb"
    answer = await client.get(f"/oauth2/authorize?{doubled}")
    assert answer.status_code == 400 and "location" not in answer.headers
    nul = f"{query}&state=%00"
    assert (await client.get(f"/oauth2/authorize?{nul}")).status_code == 400


async def test_prompt_none_without_a_session_is_login_required(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    _, challenge = pkce_pair()
    query = authorize_query(registered["client_id"], challenge, prompt="none", state="abc")
    answer = await client.get(f"/oauth2/authorize?{query}")
    assert answer.status_code == 302
    params = query_of(answer.headers["location"])
    assert params == {
        "error": "login_required",
        "error_description": params["error_description"],
        "state": "abc",
        "iss": ISSUER,
    }


async def test_a_signed_in_browser_gets_a_code_without_the_form_until_deactivated(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    app, client, admin = provider
    registered = await create_client(client, admin)
    email = await new_user(client)
    await code_flow(client, registered["client_id"], email, PASSWORD)
    _, challenge = pkce_pair()
    query = authorize_query(registered["client_id"], challenge, prompt="none")
    silent = await client.get(f"/oauth2/authorize?{query}")
    assert silent.status_code == 302 and "code" in query_of(silent.headers["location"])

    api = (await password_grant(client, email, PASSWORD)).json()
    me = (await client.get("/api/v1/users/me", headers=bearer(api))).json()
    await set_active(app, me["id"], False)
    again = await client.get(f"/oauth2/authorize?{query}")
    assert again.status_code == 302
    assert query_of(again.headers["location"])["error"] == "login_required"
    interactive = authorize_query(registered["client_id"], challenge)
    page = await client.get(f"/oauth2/authorize?{interactive}")
    assert page.status_code == 200 and 'action="/account/signin"' in page.text


async def test_every_form_refuses_a_missing_csrf_token(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin, first_party=False)
    email = await new_user(client)
    _, challenge = pkce_pair()
    query = authorize_query(registered["client_id"], challenge)
    page = await client.get(f"/oauth2/authorize?{query}")
    fields = form_posting_to(page.text, "/account/signin")
    fields.update(email=email, password=PASSWORD)
    for bad in ("", "forged"):
        answer = await client.post("/account/signin", data={**fields, "csrf_token": bad})
        assert answer.status_code == 403
    consent_page = await client.post("/account/signin", data=fields)
    assert consent_page.status_code == 200 and 'action="/oauth2/consent"' in consent_page.text
    consent = form_posting_to(consent_page.text, "/oauth2/consent")
    answer = await client.post(
        "/oauth2/consent", data={**consent, "decision": "allow", "csrf_token": ""}
    )
    assert answer.status_code == 403
    logout = await client.post("/oauth2/logout", data={"logout_request": ""})
    assert logout.status_code == 403
    # None of it signed anybody out or granted anything: the consent page is still needed.
    again = await client.get(f"/oauth2/authorize?{query}")
    assert 'action="/oauth2/consent"' in again.text


async def test_consent_is_asked_once_and_deny_goes_back_as_access_denied(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin, first_party=False, name="Third party")
    email = await new_user(client)
    _, challenge = pkce_pair()
    query = authorize_query(registered["client_id"], challenge, state="st")
    consent_page = await sign_in(client, query, email, PASSWORD)
    assert consent_page.status_code == 200
    assert "Third party" in consent_page.text
    fields = form_posting_to(consent_page.text, "/oauth2/consent")
    denied = await client.post("/oauth2/consent", data={**fields, "decision": "deny"})
    assert denied.status_code == 303
    assert query_of(denied.headers["location"])["error"] == "access_denied"

    allowed = await allow(client, await client.get(f"/oauth2/authorize?{query}"))
    assert allowed.status_code == 303 and "code" in query_of(allowed.headers["location"])
    remembered = await client.get(f"/oauth2/authorize?{query}")
    assert remembered.status_code == 302 and "code" in query_of(remembered.headers["location"])
    forced = await client.get(f"/oauth2/authorize?{query}&prompt=consent")
    assert forced.status_code == 200 and 'action="/oauth2/consent"' in forced.text
    consents = await client.get("/api/v1/users/me/consents", headers=bearer(
        (await password_grant(client, email, PASSWORD)).json()
    ))  # fmt: skip
    assert [c["client_id"] for c in consents.json()] == [registered["client_id"]]


async def test_client_credentials_for_confidential_clients_only(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, admin = provider
    service = await create_client(
        client,
        admin,
        name="Billing service",
        redirect_uris=[],
        grant_types=["client_credentials"],
        scopes=["profile"],
        first_party=False,
    )
    creds = (service["client_id"], service["client_secret"])
    answer = await client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, auth=creds
    )
    assert answer.status_code == 200, answer.text
    token = answer.json()
    assert "refresh_token" not in token and "id_token" not in token
    claims = unverified_claims(token["access_token"])
    assert claims["sub"] == service["client_id"] and "sid" not in claims
    assert (await introspect(client, creds, token["access_token"]))["active"] is True
    # A service token is not a user's: the user API refuses it.
    assert (await client.get("/api/v1/users/me", headers=bearer(token))).status_code == 401
    wrong = await client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, auth=(creds[0], "nope")
    )
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    assert wrong.headers["www-authenticate"].startswith("Basic")

    spa = await create_client(client, admin, name="SPA", client_type="public")
    public = await client.post(
        "/oauth2/token",
        data={"grant_type": "client_credentials", "client_id": spa["client_id"]},
    )
    assert_oauth_error(public, "unauthorized_client")


async def test_the_password_grant_can_be_off_per_client_and_globally(
    make_settings: SettingsFactory,
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, admin = provider
    email = await new_user(client)
    without = await create_client(client, admin)  # no "password" grant
    answer = await client.post(
        "/oauth2/token",
        data={"grant_type": "password", "username": email, "password": PASSWORD},
        auth=(without["client_id"], without["client_secret"]),
    )
    assert_oauth_error(answer, "unauthorized_client")
    first_party = await create_client(
        client, admin, grant_types=["password", "refresh_token"], name="CLI"
    )
    answer = await client.post(
        "/oauth2/token",
        data={"grant_type": "password", "username": email, "password": PASSWORD},
        auth=(first_party["client_id"], first_party["client_secret"]),
    )
    assert answer.status_code == 200, answer.text

    async with running_app(make_settings(PASSWORD_GRANT_ENABLED=False)) as (_, off):
        answer = await password_grant(off, email, PASSWORD)
        assert_oauth_error(answer, "unsupported_grant_type")
        meta = (await off.get("/.well-known/openid-configuration")).json()
        assert "password" not in meta["grant_types_supported"]


async def test_introspection_sees_logout_and_deactivation_at_once(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    app, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)

    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *creds)).json()
    answer = await introspect(client, creds, tokens["access_token"])
    assert answer["active"] is True and answer["client_id"] == creds[0]
    assert answer["username"] == email  # the email scope was granted
    # A first-party resource server (the company's gateway) sees every client's tokens.
    gateway = await create_client(client, admin, name="Gateway", redirect_uris=[], grant_types=[
        "client_credentials"
    ])  # fmt: skip
    seen = await introspect(
        client, (gateway["client_id"], gateway["client_secret"]), tokens["access_token"]
    )
    assert seen["active"] is True and seen["client_id"] == creds[0]
    assert (await client.post("/api/v1/auth/logout", headers=bearer(tokens))).status_code == 204
    assert (await introspect(client, creds, tokens["access_token"]))["active"] is False
    assert (await introspect(client, creds, tokens["refresh_token"]))["active"] is False

    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *creds)).json()
    assert (await introspect(client, creds, tokens["refresh_token"]))["active"] is True
    me = (await client.get("/api/v1/users/me", headers=bearer(tokens))).json()
    await set_active(app, me["id"], False)
    assert (await introspect(client, creds, tokens["access_token"]))["active"] is False
    assert (await introspect(client, creds, tokens["refresh_token"]))["active"] is False
    assert (await introspect(client, creds, "garbage"))["active"] is False

    public = await create_client(client, admin, client_type="public", name="SPA")
    refused = await client.post(
        "/oauth2/introspect", data={"token": "x", "client_id": public["client_id"]}
    )
    assert refused.status_code == 401


async def test_revocation_ends_the_session_of_that_client_only(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    other = await create_client(client, admin, name="Other")
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *creds)).json()

    # Another client cannot revoke it (200, nothing happens: RFC 7009 section 2.2).
    answer = await client.post(
        "/oauth2/revoke",
        data={"token": tokens["refresh_token"]},
        auth=(other["client_id"], other["client_secret"]),
    )
    assert answer.status_code == 200
    assert (await introspect(client, creds, tokens["access_token"]))["active"] is True
    answer = await client.post(
        "/oauth2/revoke",
        data={"token": tokens["refresh_token"], "token_type_hint": "refresh_token"},
        auth=creds,
    )
    assert answer.status_code == 200
    assert (await introspect(client, creds, tokens["access_token"]))["active"] is False
    assert (
        await client.post("/oauth2/revoke", data={"token": "unknown"}, auth=creds)
    ).status_code == 200
    assert (await client.post("/oauth2/revoke", data={}, auth=creds)).status_code == 400


async def test_rp_initiated_logout_ends_the_sign_in_and_what_came_from_it(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, admin = provider
    after = "https://app.example.com/signed-out"
    registered = await create_client(client, admin, post_logout_redirect_uris=[after])
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *creds)).json()

    evil = await client.get(
        "/oauth2/logout",
        params={
            "id_token_hint": tokens["id_token"],
            "post_logout_redirect_uri": "https://evil.example.com/",
        },
    )
    assert evil.status_code == 400 and "location" not in evil.headers

    page = await client.get(
        "/oauth2/logout",
        params={
            "id_token_hint": tokens["id_token"],
            "post_logout_redirect_uri": after,
            "state": "bye",
        },
    )
    assert page.status_code == 200
    fields = form_posting_to(page.text, "/oauth2/logout")
    answer = await client.post("/oauth2/logout", data=fields)
    assert answer.status_code == 303
    assert answer.headers["location"] == f"{after}?state=bye"
    assert (await introspect(client, creds, tokens["access_token"]))["active"] is False
    # The browser is signed out: the next authorization shows the form again.
    _, challenge = pkce_pair()
    page = await client.get(f"/oauth2/authorize?{authorize_query(creds[0], challenge)}")
    assert 'action="/account/signin"' in page.text


async def test_browser_sessions_are_listed_and_ended_by_logout_all(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    email = await new_user(client)
    await code_flow(client, registered["client_id"], email, PASSWORD)
    api = (await password_grant(client, email, PASSWORD)).json()
    sessions = (await client.get("/api/v1/users/me/sessions", headers=bearer(api))).json()
    assert {s["kind"] for s in sessions} == {"browser", "token"}
    assert (await client.post("/api/v1/auth/logout-all", headers=bearer(api))).status_code == 204
    _, challenge = pkce_pair()
    query = authorize_query(registered["client_id"], challenge, prompt="none")
    answer = await client.get(f"/oauth2/authorize?{query}")
    assert query_of(answer.headers["location"])["error"] == "login_required"


async def test_max_age_and_prompt_login_ask_for_the_password_again(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    email = await new_user(client)
    await code_flow(client, registered["client_id"], email, PASSWORD)
    _, challenge = pkce_pair()
    for extra in ({"max_age": "0"}, {"prompt": "login"}):
        query = authorize_query(registered["client_id"], challenge, **extra)
        page = await client.get(f"/oauth2/authorize?{query}")
        assert page.status_code == 200 and 'action="/account/signin"' in page.text, extra
        # Signing in again honours the request: back with a code, not to the form once more.
        fields = form_posting_to(page.text, "/account/signin")
        answer = await client.post(
            "/account/signin", data={**fields, "email": email, "password": PASSWORD}
        )
        assert answer.status_code == 303 and "code" in query_of(answer.headers["location"])
    silent = authorize_query(registered["client_id"], challenge, prompt="none", max_age="0")
    answer = await client.get(f"/oauth2/authorize?{silent}")
    assert query_of(answer.headers["location"])["error"] == "login_required"
    roomy = authorize_query(registered["client_id"], challenge, prompt="none", max_age="3600")
    answer = await client.get(f"/oauth2/authorize?{roomy}")
    assert "code" in query_of(answer.headers["location"])


async def test_revoking_a_browser_session_ends_the_applications_sessions_it_opened(
    provider: tuple[FastAPI, httpx.AsyncClient, dict[str, str]],
) -> None:
    _, client, admin = provider
    registered = await create_client(client, admin)
    creds = (registered["client_id"], registered["client_secret"])
    email = await new_user(client)
    code, verifier, _ = await code_flow(client, creds[0], email, PASSWORD)
    tokens = (await exchange(client, code, verifier, *creds)).json()
    api = bearer((await password_grant(client, email, PASSWORD)).json())
    sessions = (await client.get("/api/v1/users/me/sessions", headers=api)).json()
    browser = next(s for s in sessions if s["kind"] == "browser")
    ended = await client.delete(f"/api/v1/users/me/sessions/{browser['id']}", headers=api)
    assert ended.status_code == 204
    assert (await introspect(client, creds, tokens["refresh_token"]))["active"] is False
    assert (await client.get("/api/v1/users/me", headers=api)).status_code == 200
