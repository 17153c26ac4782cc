"""Tokens: signing keys, issue/decode (access, client and ID tokens), the classic JWT attacks,
the key ring and the JWKS.

Pure logic: no servers (the key ring in the database: tests/test_keys.py). Keys are generated
once per module (RSA generation is slow).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from src.auth.jwt import (
    AccessTokenClaims,
    AccessTokenCodec,
    ClientTokenClaims,
    SigningKey,
    TokenError,
    generate_signing_key,
    jwk_thumbprint,
    load_signing_key,
)
from src.config.settings import Settings, SettingsError

ALGORITHMS = ["RS256", "ES256", "EdDSA"]
USER_ID = uuid.UUID("0b0c4f8e-7a51-4a8e-9a63-5a2f1f0c0001")
SESSION_ID = uuid.UUID("0b0c4f8e-7a51-4a8e-9a63-5a2f1f0c0002")
# The issuer URL (PUBLIC_BASE_URL's default): access tokens name it unless JWT_ISSUER is set.
ISSUER = "http://localhost:8000"
AUDIENCE = "user-management-service"


def pem_of(key: Any) -> str:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data.decode()


@pytest.fixture(scope="module")
def pems() -> dict[str, str]:
    return {
        "RS256": pem_of(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "ES256": pem_of(ec.generate_private_key(ec.SECP256R1())),
        "EdDSA": pem_of(ed25519.Ed25519PrivateKey.generate()),
    }


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"ENVIRONMENT": "test", "DATA_DIR": tmp_path, **overrides}
    return Settings(_env_file=None, **values)


def make_codec(
    tmp_path: Path, pems: dict[str, str], algorithm: str = "RS256", **overrides: Any
) -> AccessTokenCodec:
    settings = make_settings(
        tmp_path, JWT_ALGORITHM=algorithm, JWT_PRIVATE_KEY=pems[algorithm], **overrides
    )
    return AccessTokenCodec(load_signing_key(settings), settings)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    padded = [part + "=" * (-len(part) % 4) for part in (header, payload)]
    return (
        json.loads(base64.urlsafe_b64decode(padded[0])),
        json.loads(base64.urlsafe_b64decode(padded[1])),
        signature,
    )


def assert_refused(codec: AccessTokenCodec, token: str, reason: str) -> None:
    with pytest.raises(TokenError) as excinfo:
        codec.decode(token)
    assert reason in str(excinfo.value)
    assert token not in str(excinfo.value)
    for part in token.split("."):
        if len(part) > 8:
            assert part not in str(excinfo.value)


# --- issue and decode ----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_round_trip(tmp_path: Path, pems: dict[str, str], algorithm: str) -> None:
    codec = make_codec(tmp_path, pems, algorithm)
    token, expires_in = codec.issue(USER_ID, SESSION_ID, "admin")
    assert expires_in == 15 * 60

    header, payload, _ = segments(token)
    assert header["alg"] == algorithm
    assert header["kid"] == codec.signing_key.kid
    assert {"sub", "sid", "role", "iat", "exp", "jti", "iss", "aud"} <= payload.keys()

    claims = codec.decode(token)
    assert isinstance(claims, AccessTokenClaims)
    assert claims.sub == str(USER_ID)
    assert claims.sid == str(SESSION_ID)
    assert claims.role == "admin"
    assert claims.iss == ISSUER
    assert claims.aud == AUDIENCE
    assert claims.exp - claims.iat == expires_in
    assert abs(claims.iat - datetime.now(UTC).timestamp()) < 60
    assert claims.jti == payload["jti"]
    # Every token is distinct, even for the same session in the same second.
    assert codec.issue(USER_ID, SESSION_ID, "admin")[0] != token


def test_lifetime_follows_the_setting(tmp_path: Path, pems: dict[str, str]) -> None:
    codec = make_codec(tmp_path, pems, ACCESS_TOKEN_EXPIRE_MINUTES=5)
    token, expires_in = codec.issue(USER_ID, SESSION_ID, "user")
    claims = codec.decode(token)
    assert expires_in == 300
    assert claims.exp - claims.iat == 300


def test_expired_token_is_refused(tmp_path: Path, pems: dict[str, str]) -> None:
    codec = make_codec(tmp_path, pems)
    long_ago = datetime.now(UTC) - timedelta(minutes=16)
    token, _ = codec.issue(USER_ID, SESSION_ID, "user", now=long_ago)
    assert_refused(codec, token, "expired")


def test_small_clock_skew_is_tolerated(tmp_path: Path, pems: dict[str, str]) -> None:
    codec = make_codec(tmp_path, pems)
    just_expired = datetime.now(UTC) - timedelta(minutes=15, seconds=3)
    assert codec.decode(codec.issue(USER_ID, SESSION_ID, "user", now=just_expired)[0])
    slightly_ahead = datetime.now(UTC) + timedelta(seconds=3)
    assert codec.decode(codec.issue(USER_ID, SESSION_ID, "user", now=slightly_ahead)[0])


def test_token_issued_in_the_future_is_refused(tmp_path: Path, pems: dict[str, str]) -> None:
    codec = make_codec(tmp_path, pems)
    token, _ = codec.issue(USER_ID, SESSION_ID, "user", now=datetime.now(UTC) + timedelta(hours=1))
    assert_refused(codec, token, "not yet valid")


def test_wrong_audience_is_refused(tmp_path: Path, pems: dict[str, str]) -> None:
    other = make_codec(tmp_path, pems, JWT_AUDIENCE="billing-service")
    token, _ = other.issue(USER_ID, SESSION_ID, "user")
    assert_refused(make_codec(tmp_path, pems), token, "wrong audience")


def test_wrong_issuer_is_refused(tmp_path: Path, pems: dict[str, str]) -> None:
    other = make_codec(tmp_path, pems, JWT_ISSUER="https://evil.example")
    token, _ = other.issue(USER_ID, SESSION_ID, "user")
    assert_refused(make_codec(tmp_path, pems), token, "wrong issuer")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tampered_payload_is_refused(tmp_path: Path, pems: dict[str, str], algorithm: str) -> None:
    codec = make_codec(tmp_path, pems, algorithm)
    token, _ = codec.issue(USER_ID, SESSION_ID, "user")
    header, _, signature = token.split(".")
    claims = segments(token)[1]
    forged = f"{header}.{b64url_json({**claims, 'role': 'admin'})}.{signature}"
    assert forged != token
    assert_refused(codec, forged, "invalid signature")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tampered_signature_is_refused(
    tmp_path: Path, pems: dict[str, str], algorithm: str
) -> None:
    codec = make_codec(tmp_path, pems, algorithm)
    token, _ = codec.issue(USER_ID, SESSION_ID, "user")
    header, payload, signature = token.split(".")
    # Flip a byte in the middle (the last character may only carry padding bits).
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01
    assert_refused(codec, f"{header}.{payload}.{b64url(bytes(raw))}", "invalid signature")
    assert_refused(codec, f"{header}.{payload}.", "")


def valid_claims(codec: AccessTokenCodec) -> dict[str, Any]:
    return segments(codec.issue(USER_ID, SESSION_ID, "admin")[0])[1]


def test_alg_none_is_refused(tmp_path: Path, pems: dict[str, str]) -> None:
    codec = make_codec(tmp_path, pems)
    for alg in ("none", "None", "NONE"):
        header = {"alg": alg, "typ": "JWT", "kid": codec.signing_key.kid}
        token = f"{b64url_json(header)}.{b64url_json(valid_claims(codec))}."
        assert_refused(codec, token, "algorithm not allowed")


def test_hs256_signed_with_the_public_key_is_refused(tmp_path: Path, pems: dict[str, str]) -> None:
    codec = make_codec(tmp_path, pems)
    public_pem = codec.signing_key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": codec.signing_key.kid}
    signing_input = f"{b64url_json(header)}.{b64url_json(valid_claims(codec))}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64url(signature)}"
    assert_refused(codec, token, "algorithm not allowed")


def test_unknown_kid_is_refused(tmp_path: Path, pems: dict[str, str]) -> None:
    codec = make_codec(tmp_path, pems)
    claims = valid_claims(codec)
    # Our own key, but a kid we never published.
    relabelled = jwt.encode(
        claims, codec.signing_key.private_key, algorithm="RS256", headers={"kid": "other"}
    )
    assert_refused(codec, relabelled, "unknown signing key")
    missing = jwt.encode(claims, codec.signing_key.private_key, algorithm="RS256")
    assert_refused(codec, missing, "unknown signing key")
    # Another key presenting our kid: the signature gives it away.
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    impostor = jwt.encode(
        claims, stranger, algorithm="RS256", headers={"kid": codec.signing_key.kid}
    )
    assert_refused(codec, impostor, "invalid signature")


@pytest.mark.parametrize("claim", ["sub", "sid", "exp", "iat", "jti"])
def test_missing_claims_are_refused(tmp_path: Path, pems: dict[str, str], claim: str) -> None:
    codec = make_codec(tmp_path, pems)
    claims = valid_claims(codec)
    del claims[claim]
    token = jwt.encode(
        claims,
        codec.signing_key.private_key,
        algorithm="RS256",
        headers={"kid": codec.signing_key.kid},
    )
    assert_refused(codec, token, f"missing claim {claim}")


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "....", "eyJhbGciOiJSUzI1NiJ9.e30"])
def test_garbage_is_refused(tmp_path: Path, pems: dict[str, str], garbage: str) -> None:
    with pytest.raises(TokenError):
        make_codec(tmp_path, pems).decode(garbage)


# --- JWKS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_jwks_public_key_verifies_tokens(
    tmp_path: Path, pems: dict[str, str], algorithm: str
) -> None:
    codec = make_codec(tmp_path, pems, algorithm)
    jwks = codec.jwks()
    assert len(jwks["keys"]) == 1
    jwk = jwks["keys"][0]
    assert jwk["kid"] == codec.signing_key.kid
    assert jwk["alg"] == algorithm
    assert jwk["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & jwk.keys()  # public part only
    json.dumps(jwks)  # serialisable as it is

    token, _ = codec.issue(USER_ID, SESSION_ID, "user")
    public = jwt.PyJWK(jwk)
    assert public.key_id == jwt.get_unverified_header(token)["kid"]
    payload = jwt.decode(
        token,
        public,
        algorithms=[algorithm],
        audience=AUDIENCE,
        issuer=ISSUER,
    )
    assert payload["sub"] == str(USER_ID)


def test_kid_is_the_rfc7638_thumbprint() -> None:
    # The worked example of RFC 7638, section 3.1.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FD"
        "W2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vM"
        "QFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    members = {"e": "AQAB", "kty": "RSA", "n": n}
    assert jwk_thumbprint(members) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_kid_matches_the_published_key(
    tmp_path: Path, pems: dict[str, str], algorithm: str
) -> None:
    key = make_codec(tmp_path, pems, algorithm).signing_key
    jwk = key.public_jwk()
    members = {k: v for k, v in jwk.items() if k not in {"kid", "alg", "use"}}
    assert key.kid == jwk_thumbprint(members)


# --- loading keys --------------------------------------------------------------------------------


def test_key_loads_from_a_file(tmp_path: Path, pems: dict[str, str]) -> None:
    path = tmp_path / "signing.pem"
    path.write_text(pems["ES256"])
    key = load_signing_key(
        make_settings(tmp_path, JWT_ALGORITHM="ES256", JWT_PRIVATE_KEY_FILE=path)
    )
    assert isinstance(key, SigningKey)
    assert key.algorithm == "ES256"
    assert isinstance(key.private_key, ec.EllipticCurvePrivateKey)
    assert "PRIVATE" not in repr(key)


def test_pem_on_one_line_with_escaped_newlines_loads(tmp_path: Path, pems: dict[str, str]) -> None:
    one_line = pems["EdDSA"].strip().replace("\n", "\\n")
    key = load_signing_key(make_settings(tmp_path, JWT_ALGORITHM="EdDSA", JWT_PRIVATE_KEY=one_line))
    assert isinstance(key.private_key, ed25519.Ed25519PrivateKey)


def test_missing_key_file_names_the_variable(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, JWT_PRIVATE_KEY_FILE=tmp_path / "absent.pem")
    with pytest.raises(SettingsError, match="JWT_PRIVATE_KEY_FILE"):
        load_signing_key(settings)


def test_development_key_is_generated_once_and_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"  # does not exist yet
    settings = make_settings(data_dir, ENVIRONMENT="development")
    caplog.set_level(logging.WARNING, logger="src.auth.jwt")

    first = load_signing_key(settings)
    path = data_dir / "jwt-RS256.pem"
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pem = path.read_bytes()
    assert b"BEGIN PRIVATE KEY" in pem
    assert [p.name for p in data_dir.iterdir()] == ["jwt-RS256.pem"]  # no temporary left over

    second = load_signing_key(settings)
    assert second.kid == first.kid
    assert path.read_bytes() == pem

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per start
    assert all("development key" in r.getMessage() for r in warnings)
    assert "PRIVATE KEY" not in caplog.text
    assert pem.decode().splitlines()[1] not in caplog.text

    # A token from the first start is accepted after a "restart".
    token, _ = AccessTokenCodec(first, settings).issue(USER_ID, SESSION_ID, "user")
    assert AccessTokenCodec(second, settings).decode(token).sub == str(USER_ID)


def test_development_key_per_algorithm(tmp_path: Path) -> None:
    key = load_signing_key(make_settings(tmp_path, JWT_ALGORITHM="EdDSA"))
    assert isinstance(key.private_key, ed25519.Ed25519PrivateKey)
    assert (tmp_path / "jwt-EdDSA.pem").is_file()


def test_production_without_a_key_generates_one(tmp_path: Path) -> None:
    # It only seeds an empty key ring (sealed in the database); nothing is written to disk.
    settings = make_settings(tmp_path, ENVIRONMENT="production", JWT_ALGORITHM="ES256")
    first, second = load_signing_key(settings), load_signing_key(settings)
    assert first.algorithm == "ES256"
    assert isinstance(first.private_key, ec.EllipticCurvePrivateKey)
    assert first.kid != second.kid
    assert list(tmp_path.iterdir()) == []


def test_production_accepts_a_configured_key(tmp_path: Path, pems: dict[str, str]) -> None:
    settings = make_settings(tmp_path, ENVIRONMENT="production", JWT_PRIVATE_KEY=pems["RS256"])
    assert load_signing_key(settings).algorithm == "RS256"


@pytest.mark.parametrize(
    ("algorithm", "key_of"),
    [("ES256", "RS256"), ("RS256", "EdDSA"), ("EdDSA", "ES256")],
)
def test_key_of_the_wrong_type_is_refused(
    tmp_path: Path, pems: dict[str, str], algorithm: str, key_of: str
) -> None:
    settings = make_settings(tmp_path, JWT_ALGORITHM=algorithm, JWT_PRIVATE_KEY=pems[key_of])
    with pytest.raises(SettingsError) as excinfo:
        load_signing_key(settings)
    message = str(excinfo.value)
    assert "JWT_PRIVATE_KEY" in message
    assert f"JWT_ALGORITHM={algorithm}" in message


@pytest.mark.parametrize(
    ("algorithm", "key"),
    [
        ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        ("ES256", ec.generate_private_key(ec.SECP384R1())),
    ],
)
def test_weak_or_wrong_curve_keys_are_refused(tmp_path: Path, algorithm: str, key: Any) -> None:
    settings = make_settings(tmp_path, JWT_ALGORITHM=algorithm, JWT_PRIVATE_KEY=pem_of(key))
    with pytest.raises(SettingsError, match="JWT_PRIVATE_KEY"):
        load_signing_key(settings)


def test_unparseable_key_is_refused_without_echoing_it(tmp_path: Path) -> None:
    text = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ1dC1ub3QtYS1rZXk=\n-----END PRIVATE KEY-----\n"
    with pytest.raises(SettingsError) as excinfo:
        load_signing_key(make_settings(tmp_path, JWT_PRIVATE_KEY=text))
    assert "JWT_PRIVATE_KEY" in str(excinfo.value)
    assert "c2VjcmV0" not in str(excinfo.value)


def test_signing_key_pem_round_trip_and_refusal(pems: dict[str, str]) -> None:
    key = SigningKey.from_pem("EdDSA", pems["EdDSA"].encode())
    again = SigningKey.from_pem("EdDSA", key.private_pem())
    assert again.kid == key.kid
    with pytest.raises(ValueError, match="ES256 needs an EC key on curve P-256") as excinfo:
        SigningKey.from_pem("ES256", pems["RS256"].encode())
    assert "PRIVATE" not in str(excinfo.value)
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        SigningKey.from_pem("RS256", b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n")


# --- issuers -------------------------------------------------------------------------------------


def test_access_tokens_name_the_issuer_url_unless_jwt_issuer_is_set(
    tmp_path: Path, pems: dict[str, str]
) -> None:
    codec = make_codec(tmp_path, pems, PUBLIC_BASE_URL="https://id.example.com/")
    claims = segments(codec.issue(USER_ID, SESSION_ID, "user")[0])[1]
    assert claims["iss"] == "https://id.example.com"  # exactly the OpenID Connect issuer

    legacy = make_codec(tmp_path, pems, JWT_ISSUER="user-management-service")
    token, _ = legacy.issue(USER_ID, SESSION_ID, "user")
    assert legacy.decode(token).iss == "user-management-service"
    assert segments(legacy.issue_client_token("reports", "users:read")[0])[1]["iss"] == (
        "user-management-service"
    )
    # ID tokens always name the issuer URL, whatever JWT_ISSUER says.
    id_token = legacy.issue_id_token({"sub": str(USER_ID), "aud": "web-app"})
    assert segments(id_token)[1]["iss"] == ISSUER


# --- the key ring --------------------------------------------------------------------------------


def test_a_published_key_verifies_after_the_active_key_changes(
    tmp_path: Path, pems: dict[str, str]
) -> None:
    codec = make_codec(tmp_path, pems)
    old = codec.signing_key
    new = SigningKey.from_pem("ES256", pems["ES256"].encode())
    before, _ = codec.issue(USER_ID, SESSION_ID, "user")

    codec.set_keys(new, [new, old])
    assert codec.signing_key is new
    after, _ = codec.issue(USER_ID, SESSION_ID, "user")
    assert segments(after)[0] == {"alg": "ES256", "kid": new.kid, "typ": "JWT"}
    assert codec.decode(before).sub == codec.decode(after).sub == str(USER_ID)
    assert [jwk["kid"] for jwk in codec.jwks()["keys"]] == [new.kid, old.kid]  # active first

    # Once the old key is no longer published, its tokens are refused.
    codec.set_keys(new, [new])
    assert_refused(codec, before, "unknown signing key")
    assert codec.decode(after)


def test_the_active_key_always_verifies(tmp_path: Path, pems: dict[str, str]) -> None:
    codec = make_codec(tmp_path, pems)
    new = SigningKey.from_pem("EdDSA", pems["EdDSA"].encode())
    codec.set_keys(new, [])  # a caller forgot it: it is published all the same
    assert [key.kid for key in codec.published_keys] == [new.kid]
    assert codec.decode(codec.issue(USER_ID, SESSION_ID, "user")[0])


def test_each_key_keeps_its_own_algorithm(tmp_path: Path, pems: dict[str, str]) -> None:
    codec = make_codec(tmp_path, pems)  # RS256
    rsa_key = codec.signing_key
    ec_key = SigningKey.from_pem("ES256", pems["ES256"].encode())
    codec.set_keys(ec_key, [ec_key, rsa_key])
    claims = valid_claims(codec)
    # An RS256 signature presented under the EC key's kid, and the reverse.
    relabelled = jwt.encode(
        claims, rsa_key.private_key, algorithm="RS256", headers={"kid": ec_key.kid}
    )
    assert_refused(codec, relabelled, "algorithm not allowed")
    swapped = jwt.encode(
        claims, ec_key.private_key, algorithm="ES256", headers={"kid": rsa_key.kid}
    )
    assert_refused(codec, swapped, "algorithm not allowed")
    # The HMAC confusion with the public key of a key that is published but not active.
    public_pem = rsa_key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}
    signing_input = f"{b64url_json(header)}.{b64url_json(claims)}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    assert_refused(codec, f"{signing_input}.{b64url(mac)}", "algorithm not allowed")


@pytest.mark.parametrize(
    ("alg", "kid", "reason"),
    [(["RS256"], "ours", "algorithm not allowed"), ("RS256", ["ours"], "malformed token")],
)
def test_header_values_of_the_wrong_type_are_refused(
    tmp_path: Path, pems: dict[str, str], alg: Any, kid: Any, reason: str
) -> None:
    codec = make_codec(tmp_path, pems)
    ours = codec.signing_key.kid
    header = {"alg": alg, "kid": [ours] if isinstance(kid, list) else ours}
    token = f"{b64url_json(header)}.{b64url_json(valid_claims(codec))}.c2ln"
    assert_refused(codec, token, reason)


# --- OAuth claims in access tokens ---------------------------------------------------------------


def test_oauth_claims_appear_only_when_given(tmp_path: Path, pems: dict[str, str]) -> None:
    codec = make_codec(tmp_path, pems)
    plain = codec.issue(USER_ID, SESSION_ID, "user")[0]
    assert not {"client_id", "scope", "amr"} & segments(plain)[1].keys()
    claims = codec.decode(plain)
    assert (claims.client_id, claims.scope, claims.amr) == (None, None, ())

    token, _ = codec.issue(
        USER_ID, SESSION_ID, "user", client_id="web-app", scope="openid email", amr=["pwd", "otp"]
    )
    payload = segments(token)[1]
    assert (payload["client_id"], payload["scope"], payload["amr"]) == (
        "web-app",
        "openid email",
        ["pwd", "otp"],
    )
    claims = codec.decode(token)
    assert (claims.client_id, claims.scope, claims.amr) == (
        "web-app",
        "openid email",
        ("pwd", "otp"),
    )


@pytest.mark.parametrize(
    "extra", [{"client_id": 7}, {"scope": ["openid"]}, {"amr": "pwd"}, {"amr": ["pwd", 1]}]
)
def test_oauth_claims_of_the_wrong_type_are_refused(
    tmp_path: Path, pems: dict[str, str], extra: dict[str, Any]
) -> None:
    codec = make_codec(tmp_path, pems)
    key = codec.signing_key
    token = jwt.encode(
        {**valid_claims(codec), **extra},
        key.private_key,
        algorithm="RS256",
        headers={"kid": key.kid},
    )
    assert_refused(codec, token, "invalid claims")


# --- client-credentials tokens -------------------------------------------------------------------


def test_client_token_round_trip(tmp_path: Path, pems: dict[str, str]) -> None:
    codec = make_codec(tmp_path, pems, ACCESS_TOKEN_EXPIRE_MINUTES=5)
    token, expires_in = codec.issue_client_token("reports", "users:read users:write")
    assert expires_in == 300
    header, payload, _ = segments(token)
    assert header["kid"] == codec.signing_key.kid
    assert set(payload) == {"iss", "aud", "sub", "client_id", "scope", "iat", "exp", "jti"}
    assert (payload["iss"], payload["aud"]) == (ISSUER, AUDIENCE)

    claims = codec.decode_client_token(token)
    assert isinstance(claims, ClientTokenClaims)
    assert (claims.sub, claims.client_id, claims.scope) == (
        "reports",
        "reports",
        "users:read users:write",
    )
    assert claims.exp - claims.iat == 300
    assert claims.jti == payload["jti"]


def test_client_and_user_tokens_are_not_interchangeable(
    tmp_path: Path, pems: dict[str, str]
) -> None:
    codec = make_codec(tmp_path, pems)
    client_token, _ = codec.issue_client_token("reports", "users:read")
    assert_refused(codec, client_token, "missing claim sid")

    user_token, _ = codec.issue(USER_ID, SESSION_ID, "user", client_id="web-app", scope="openid")
    with pytest.raises(TokenError, match="not a client token"):
        codec.decode_client_token(user_token)


def test_client_token_checks(tmp_path: Path, pems: dict[str, str]) -> None:
    codec = make_codec(tmp_path, pems)
    expired, _ = codec.issue_client_token(
        "reports", "users:read", now=datetime.now(UTC) - timedelta(hours=1)
    )
    with pytest.raises(TokenError, match="token expired"):
        codec.decode_client_token(expired)

    key = codec.signing_key
    claims = segments(codec.issue_client_token("reports", "users:read")[0])[1]
    for forged in ({**claims, "sub": "someone-else"}, {**claims, "scope": ["users:read"]}):
        token = jwt.encode(forged, key.private_key, algorithm="RS256", headers={"kid": key.kid})
        with pytest.raises(TokenError, match="invalid claims"):
            codec.decode_client_token(token)
    foreign = make_codec(tmp_path, pems, JWT_AUDIENCE="billing-service")
    with pytest.raises(TokenError, match="wrong audience"):
        codec.decode_client_token(foreign.issue_client_token("reports", "users:read")[0])


# --- ID tokens -----------------------------------------------------------------------------------


def id_claims() -> dict[str, Any]:
    return {
        "sub": str(USER_ID),
        "aud": "web-app",
        "nonce": "n-0S6_WzA2Mj",
        "auth_time": 1_700_000_000,
        "amr": ["pwd"],
        "sid": str(SESSION_ID),
        "email": "ada@example.com",
    }


def test_id_token_carries_the_callers_claims(tmp_path: Path, pems: dict[str, str]) -> None:
    codec = make_codec(tmp_path, pems, "ES256", ID_TOKEN_EXPIRE_MINUTES=10)
    now = datetime.now(UTC)
    token = codec.issue_id_token({**id_claims(), "iss": "https://evil.example"}, now=now)
    header, payload, _ = segments(token)
    assert (header["alg"], header["kid"]) == ("ES256", codec.signing_key.kid)
    assert payload == {
        **id_claims(),
        "iss": ISSUER,  # ours to set
        "iat": int(now.timestamp()),
        "exp": int(now.timestamp()) + 600,
    }
    # Verifiable by a relying party with the JWKS alone.
    jwk = jwt.PyJWK(codec.jwks()["keys"][0])
    assert jwt.decode(token, jwk, algorithms=["ES256"], audience="web-app", issuer=ISSUER)


def test_an_id_token_is_not_an_access_token(tmp_path: Path, pems: dict[str, str]) -> None:
    codec = make_codec(tmp_path, pems)
    token = codec.issue_id_token({**id_claims(), "aud": AUDIENCE})
    with pytest.raises(TokenError):
        codec.decode(token)
    with pytest.raises(TokenError):
        codec.decode_client_token(token)


def test_id_token_hint_may_be_expired_but_must_be_ours(
    tmp_path: Path, pems: dict[str, str]
) -> None:
    codec = make_codec(tmp_path, pems)
    long_ago = datetime.now(UTC) - timedelta(days=3)
    hint = codec.issue_id_token(id_claims(), now=long_ago)
    claims = codec.decode_id_token_hint(hint)
    assert (claims["sub"], claims["sid"], claims["aud"]) == (
        str(USER_ID),
        str(SESSION_ID),
        "web-app",
    )

    # Signed by a key the ring once published: still accepted while it is published.
    old = codec.signing_key
    new = SigningKey.from_pem("EdDSA", pems["EdDSA"].encode())
    codec.set_keys(new, [new, old])
    assert codec.decode_id_token_hint(hint)["sub"] == str(USER_ID)

    other_issuer = make_codec(tmp_path, pems, PUBLIC_BASE_URL="https://elsewhere.example")
    with pytest.raises(TokenError, match="wrong issuer"):
        codec.decode_id_token_hint(other_issuer.issue_id_token(id_claims()))
    stranger = AccessTokenCodec(generate_signing_key("RS256"), make_settings(tmp_path))
    with pytest.raises(TokenError, match="unknown signing key"):
        codec.decode_id_token_hint(stranger.issue_id_token(id_claims()))
    header, payload, signature = hint.split(".")
    forged = f"{header}.{b64url_json({**segments(hint)[1], 'sub': 'someone'})}.{signature}"
    with pytest.raises(TokenError, match="invalid signature"):
        codec.decode_id_token_hint(forged)
    none = f"{b64url_json({'alg': 'none', 'kid': old.kid})}.{payload}."
    with pytest.raises(TokenError, match="algorithm not allowed"):
        codec.decode_id_token_hint(none)
