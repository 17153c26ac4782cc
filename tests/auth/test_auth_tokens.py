"""Access tokens: what is refused, JWKS verification by a third party, and a stock OAuth2 client."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from src.app.container import app_services
from src.auth.context import Security
from src.config.settings import Settings
from tests.auth.conftest import App
from tests.support.app import PASSWORD, bearer, login, register, running_app
from tests.support.auth import (
    ME_URL,
    TOKEN_URL,
    assert_unauthenticated,
    session_of,
    unverified_claims,
)
from tests.support.oidc import register_client


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64_json(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def _unb64_json(part: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def _tampered_payload(token: str, _: Security) -> str:
    header, payload, signature = token.split(".")
    claims = _unb64_json(payload)
    claims["role"] = "admin"
    return f"{header}.{_b64_json(claims)}.{signature}"


def _foreign_signature(token: str, _: Security) -> str:
    # The same header (our kid) and claims, signed by a key that is not ours.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    header = jwt.get_unverified_header(token)
    return jwt.encode(unverified_claims(token), other, algorithm="RS256", headers=header)


def _mangled_signature(token: str, _: Security) -> str:
    header, payload, signature = token.split(".")
    return f"{header}.{payload}.{signature[::-1]}"


def _expired(token: str, sec: Security) -> str:
    claims = unverified_claims(token)
    past = datetime.now(UTC) - timedelta(hours=1)
    expired, _ = sec.tokens.issue(
        uuid.UUID(claims["sub"]), uuid.UUID(claims["sid"]), "user", now=past
    )
    return expired


def _alg_none(token: str, _: Security) -> str:
    header = {**jwt.get_unverified_header(token), "alg": "none"}
    return f"{_b64_json(header)}.{token.split('.')[1]}."


def _hs256_with_public_key(token: str, sec: Security) -> str:
    # The classic confusion: a verifier that trusts the header would check this HMAC with the
    # public key (which everyone has, from the JWKS) as the secret.
    pem = sec.tokens.signing_key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {**jwt.get_unverified_header(token), "alg": "HS256"}
    signing_input = f"{_b64_json(header)}.{token.split('.')[1]}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def _garbage(_token: str, _: Security) -> str:
    return "this-is-not-a-jwt"


def _wrong_audience(token: str, sec: Security) -> str:
    claims = {**unverified_claims(token), "aud": "another-service"}
    key = sec.tokens.signing_key
    return jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid})


@pytest.mark.parametrize(
    "forge",
    [
        _tampered_payload,
        _foreign_signature,
        _mangled_signature,
        _expired,
        _alg_none,
        _hs256_with_public_key,
        _garbage,
        _wrong_audience,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
async def test_forged_or_stale_tokens_are_refused(
    app: App, forge: Callable[[str, Security], str]
) -> None:
    fastapi_app, client = app
    user = await register(client)
    tokens = await login(client, user["email"])
    assert (await client.get(ME_URL, headers=bearer(tokens))).status_code == 200

    forged = forge(tokens["access_token"], app_services(fastapi_app).security)
    response = await client.get(ME_URL, headers=bearer(forged))
    assert_unauthenticated(response)
    assert forged not in response.text and tokens["access_token"] not in response.text


async def test_missing_or_other_scheme_authorization_is_refused(
    app_client: httpx.AsyncClient,
) -> None:
    assert_unauthenticated(await app_client.get(ME_URL))
    assert_unauthenticated(await app_client.get(ME_URL, headers={"Authorization": "Bearer"}))
    basic = base64.b64encode(f"someone@example.com:{PASSWORD}".encode()).decode()
    assert_unauthenticated(
        await app_client.get(ME_URL, headers={"Authorization": f"Basic {basic}"})
    )


async def test_token_of_a_deleted_user_is_refused(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    tokens = await login(client, user["email"])
    assert (await client.get(ME_URL, headers=bearer(tokens))).status_code == 200
    deleted = await client.request(
        "DELETE", ME_URL, json={"current_password": PASSWORD}, headers=bearer(tokens)
    )
    assert deleted.status_code == 204, deleted.text

    assert_unauthenticated(await client.get(ME_URL, headers=bearer(tokens)))
    # Even a correctly signed, unexpired token naming the deleted user and its old session.
    fresh, _ = app_services(fastapi_app).security.tokens.issue(
        uuid.UUID(user["id"]), uuid.UUID(session_of(tokens)), "user"
    )
    assert_unauthenticated(await client.get(ME_URL, headers=bearer(fresh)))


async def test_jwks_verifies_an_issued_token(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    tokens = await login(client, user["email"])

    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    assert "max-age" in response.headers["cache-control"]
    keys = response.json()["keys"]
    kid = jwt.get_unverified_header(tokens["access_token"])["kid"]
    # The signing key, and the next one, published ahead of its use (docs/signing-keys.md).
    assert len(keys) == 2 and kid in {key["kid"] for key in keys}
    jwk = next(key for key in keys if key["kid"] == kid)
    assert (jwk["kty"], jwk["alg"], jwk["use"]) == ("RSA", "RS256", "sig")
    assert not {"d", "p", "q", "dp", "dq", "qi"} & jwk.keys(), "private members published"
    assert jwk["kid"] == jwt.get_unverified_header(tokens["access_token"])["kid"]

    settings: Settings = fastapi_app.state.settings
    claims = jwt.decode(
        tokens["access_token"],
        jwt.PyJWK(jwk).key,
        algorithms=[jwk["alg"]],
        audience=settings.JWT_AUDIENCE,
        issuer=settings.JWT_ISSUER or settings.issuer,
    )
    assert claims["sub"] == user["id"]
    # And it is the public half of the key the service signs with: a forged token fails.
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            _foreign_signature(tokens["access_token"], app_services(fastapi_app).security),
            jwt.PyJWK(jwk).key,
            algorithms=[jwk["alg"]],
            audience=settings.JWT_AUDIENCE,
        )


async def test_a_stock_oauth2_client_signs_in_refreshes_and_calls_the_api(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    await register_client(fastapi_app, "cli")
    async with AsyncOAuth2Client(
        client_id="cli",
        token_endpoint_auth_method="none",
        transport=httpx.ASGITransport(app=fastapi_app),
        base_url="http://test",
    ) as oauth:
        token = await oauth.fetch_token(
            f"http://test{TOKEN_URL}", username=user["email"], password=PASSWORD
        )
        assert token["token_type"] == "bearer" and token["expires_in"] == 900
        assert token["expires_at"] > 0  # authlib understood expires_in

        refreshed = await oauth.refresh_token(
            f"http://test{TOKEN_URL}", refresh_token=token["refresh_token"]
        )
        assert refreshed["refresh_token"] != token["refresh_token"]
        assert refreshed["access_token"] != token["access_token"]

        me = await oauth.get(ME_URL)
        assert me.status_code == 200, me.text
        assert me.json()["id"] == user["id"]
        assert me.request.headers["authorization"] == f"Bearer {refreshed['access_token']}"


# --- clock skew and client binding ----------------------------------------------------------------


async def test_expiry_leeway_is_a_setting(make_settings: Callable[..., Settings]) -> None:
    for leeway, accepted in ((5, True), (0, False)):
        async with running_app(make_settings(JWT_LEEWAY_SECONDS=leeway)) as (fastapi_app, client):
            user = await register(client)
            tokens = await login(client, user["email"])
            codec = app_services(fastapi_app).security.tokens
            lifetime = timedelta(minutes=fastapi_app.state.settings.ACCESS_TOKEN_EXPIRE_MINUTES)
            # Expired three seconds ago, as a token checked on a host whose clock runs behind.
            issued = datetime.now(UTC) - lifetime - timedelta(seconds=3)
            late, _ = codec.issue(
                uuid.UUID(user["id"]), uuid.UUID(session_of(tokens)), "user", now=issued
            )
            response = await client.get(ME_URL, headers=bearer(late))
            assert (response.status_code == 200) is accepted, (leeway, response.text)


def _basic(client_id: str) -> str:
    return base64.b64encode(f"{client_id}:".encode()).decode()


async def _grant(client: httpx.AsyncClient, **form: str) -> httpx.Response:
    auth = form.pop("basic", None)
    headers = {"Authorization": f"Basic {auth}"} if auth else {}
    return await client.post(TOKEN_URL, data=form, headers=headers)


async def test_refresh_tokens_work_only_for_the_client_that_obtained_them(app: App) -> None:
    fastapi_app, client = app
    user = await register(client)
    await register_client(fastapi_app, "web")
    await register_client(fastapi_app, "mobile")
    signed_in = await _grant(
        client, grant_type="password", username=user["email"], password=PASSWORD, client_id="web"
    )
    assert signed_in.status_code == 200, signed_in.text
    refresh = signed_in.json()["refresh_token"]

    for other in ({"client_id": "mobile"}, {}, {"basic": _basic("mobile")}):
        stolen = await _grant(client, grant_type="refresh_token", refresh_token=refresh, **other)
        assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant", other
    # The right client, in the form or with HTTP Basic (RFC 6749 section 2.3.1).
    rotated = await _grant(
        client, grant_type="refresh_token", refresh_token=refresh, client_id="web"
    )
    assert rotated.status_code == 200, rotated.text
    again = await _grant(
        client,
        grant_type="refresh_token",
        refresh_token=rotated.json()["refresh_token"],
        basic=_basic("web"),
    )
    assert again.status_code == 200, again.text

    # A session opened without a client_id refreshes only without one.
    plain = await login(client, user["email"])
    as_web = await _grant(
        client, grant_type="refresh_token", refresh_token=plain["refresh_token"], client_id="web"
    )
    assert as_web.status_code == 400
    # Two different client ids at once, or an unprintable one, are refused outright.
    mixed = await _grant(
        client,
        grant_type="refresh_token",
        refresh_token=plain["refresh_token"],
        client_id="web",
        basic=_basic("mobile"),
    )
    assert mixed.status_code == 400 and mixed.json()["error"] == "invalid_request"
    bad = await _grant(
        client, grant_type="password", username=user["email"], password=PASSWORD, client_id="we\tb"
    )
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"
    assert bad.headers["www-authenticate"].startswith("Basic")
