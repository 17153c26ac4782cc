"""Tokens signed with asymmetric keys: access tokens, client tokens and ID tokens.

Other services verify them with the public keys served as a JWKS, so no secret is shared. Keys
are parsed once into key objects: PyJWT re-parses PEM text on every call (~37 ms per RS256
token).

The codec holds a key ring: one *active* key signs; every *published* key (the active one, the
next one, retired ones whose tokens may still be live) verifies. ``src.auth.keys`` keeps the ring
in the database and ``src.app.wiring`` hands it over with ``set_keys``. Verification looks the key
up by the token's ``kid`` and pins that key's own algorithm, which refuses ``alg=none`` and the
HS256 "public key as HMAC secret" confusion whatever the token's header says.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from src.config.settings import Settings, SettingsError

logger = logging.getLogger(__name__)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

MIN_RSA_BITS = 2048
REQUIRED_CLAIMS = ["sub", "sid", "iat", "exp", "jti", "iss", "aud"]
CLIENT_TOKEN_CLAIMS = ["sub", "client_id", "scope", "iat", "exp", "jti", "iss", "aud"]

_EXPECTED_KEY = {
    "RS256": f"an RSA key of at least {MIN_RSA_BITS} bits",
    "ES256": "an EC key on curve P-256",
    "EdDSA": "an Ed25519 key",
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_uint(value: int) -> str:
    return _b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def _jwk_members(public_key: PublicKey) -> dict[str, str]:
    """The JWK members RFC 7638 hashes for a thumbprint (the key itself, nothing else)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        return {"e": _b64url_uint(numbers.e), "kty": "RSA", "n": _b64url_uint(numbers.n)}
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        point = public_key.public_numbers()
        size = (public_key.curve.key_size + 7) // 8
        return {
            "crv": "P-256",
            "kty": "EC",
            "x": _b64url(point.x.to_bytes(size, "big")),
            "y": _b64url(point.y.to_bytes(size, "big")),
        }
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}


def jwk_thumbprint(members: dict[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, without whitespace."""
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def _describe(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"an RSA key of {key.key_size} bits"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC key on curve {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    return f"a key of type {type(key).__name__}"


def _fitting_key(key: object, algorithm: str) -> PrivateKey | None:
    """``key`` if it suits ``algorithm`` (type, size, curve), else None."""
    if algorithm == "RS256" and isinstance(key, rsa.RSAPrivateKey) and key.key_size >= MIN_RSA_BITS:
        return key
    if (
        algorithm == "ES256"
        and isinstance(key, ec.EllipticCurvePrivateKey)
        and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    if algorithm == "EdDSA" and isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    return None


def _load_pem(pem: bytes) -> object:
    """The key in unencrypted PEM text; ValueError that never echoes the text (it is a secret)."""
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("not an unencrypted PEM private key") from None


@dataclass(frozen=True)
class SigningKey:
    algorithm: str
    kid: str
    private_key: PrivateKey = field(repr=False)
    public_key: PublicKey = field(repr=False)

    @classmethod
    def from_private_key(cls, algorithm: str, private_key: PrivateKey) -> SigningKey:
        public_key = private_key.public_key()
        return cls(
            algorithm=algorithm,
            kid=jwk_thumbprint(_jwk_members(public_key)),
            private_key=private_key,
            public_key=public_key,
        )

    @classmethod
    def from_pem(cls, algorithm: str, pem: bytes) -> SigningKey:
        """The key in PKCS#8 PEM text; ValueError (without the text) if it does not suit
        ``algorithm``."""
        loaded = _load_pem(pem)
        key = _fitting_key(loaded, algorithm)
        if key is None:
            needed = _EXPECTED_KEY.get(algorithm, "a supported algorithm")
            raise ValueError(f"holds {_describe(loaded)}, but {algorithm} needs {needed}")
        return cls.from_private_key(algorithm, key)

    def private_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted: only ever stored sealed (``src.auth.keys``)."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_jwk(self) -> dict[str, str]:
        return {
            **_jwk_members(self.public_key),
            "kid": self.kid,
            "alg": self.algorithm,
            "use": "sig",
        }


def _settings_error(variable: str, problem: str) -> SettingsError:
    return SettingsError(f"Invalid configuration: {variable}: {problem}")


def _parse_private_key(pem: bytes, algorithm: str, variable: str) -> PrivateKey:
    """The key object for PEM text, refusing a key that does not fit the algorithm."""
    try:
        loaded = _load_pem(pem)
    except ValueError as exc:
        raise _settings_error(variable, str(exc)) from None
    key = _fitting_key(loaded, algorithm)
    if key is None:
        raise _settings_error(
            variable,
            f"holds {_describe(loaded)}, but JWT_ALGORITHM={algorithm} needs "
            f"{_EXPECTED_KEY[algorithm]}",
        )
    return key


def _generate_private_key(algorithm: str) -> PrivateKey:
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def generate_signing_key(algorithm: str) -> SigningKey:
    """A fresh key for ``algorithm`` (RSA keys take ~25 ms: call it off the event loop)."""
    return SigningKey.from_private_key(algorithm, _generate_private_key(algorithm))


def _store_new_key(path: Path, key: PrivateKey) -> None:
    """Write the key with mode 0600, atomically, unless another process got there first.

    ``os.link`` refuses to replace an existing file, so when several workers start at once they
    all end up reading the one key that won, instead of each signing with its own.
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _development_key(settings: Settings) -> SigningKey:
    algorithm = settings.JWT_ALGORITHM
    path = settings.DATA_DIR / f"jwt-{algorithm}.pem"
    try:
        if not path.exists():
            _store_new_key(path, _generate_private_key(algorithm))
        pem = path.read_bytes()
    except OSError as exc:
        raise _settings_error(
            "DATA_DIR", f"cannot keep the development signing key at {path}: {exc.strerror}"
        ) from None
    key = _parse_private_key(pem, algorithm, f"DATA_DIR (development key {path})")
    logger.warning(
        "An empty signing key ring is seeded with the development key kept at %s; "
        "set JWT_PRIVATE_KEY or JWT_PRIVATE_KEY_FILE for any shared or production deployment",
        path,
    )
    return SigningKey.from_private_key(algorithm, key)


def load_signing_key(settings: Settings) -> SigningKey:
    """The *seed* key: the first key of an empty key ring (``src.auth.keys.ensure_keys``).

    JWT_PRIVATE_KEY or JWT_PRIVATE_KEY_FILE when set; otherwise in development a key generated
    once and kept under DATA_DIR (so a restart against a fresh database signs as before), and in
    production a fresh key: the ring in the database, sealed with ENCRYPTION_KEY, is what lasts.
    """
    algorithm = settings.JWT_ALGORITHM
    inline = settings.JWT_PRIVATE_KEY.get_secret_value() if settings.JWT_PRIVATE_KEY else ""
    if inline.strip():
        if "\n" not in inline:
            # A PEM squeezed onto one line for an environment variable, with literal "\n"s.
            inline = inline.replace("\\n", "\n")
        key = _parse_private_key(inline.encode("utf-8"), algorithm, "JWT_PRIVATE_KEY")
        return SigningKey.from_private_key(algorithm, key)
    if settings.JWT_PRIVATE_KEY_FILE is not None:
        path = settings.JWT_PRIVATE_KEY_FILE
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise _settings_error(
                "JWT_PRIVATE_KEY_FILE", f"cannot read {path}: {exc.strerror}"
            ) from None
        key = _parse_private_key(pem, algorithm, "JWT_PRIVATE_KEY_FILE")
        return SigningKey.from_private_key(algorithm, key)
    if settings.is_production:
        # Nothing on disk in production: a key file there would be an unsealed copy.
        return generate_signing_key(algorithm)
    return _development_key(settings)


@dataclass(frozen=True)
class AccessTokenClaims:
    sub: str
    sid: str
    iat: int
    exp: int
    jti: str
    iss: str
    aud: str
    role: str | None = None
    client_id: str | None = None
    scope: str | None = None
    amr: tuple[str, ...] = ()
    # When the user last proved who they are (seconds since the epoch): step-up checks it.
    auth_time: int | None = None


@dataclass(frozen=True)
class ClientTokenClaims:
    """An OAuth client-credentials token: the client acts for itself, no user, no session."""

    sub: str
    client_id: str
    scope: str
    iat: int
    exp: int
    jti: str


class TokenError(Exception):
    """A token that must not be accepted; the message is a short reason, never the token."""


@dataclass(frozen=True)
class _KeyRing:
    """Replaced whole by ``set_keys``, so a token is never checked against half a ring, and the
    tokens it verified go with it (a retired key's tokens are checked again, and refused)."""

    active: SigningKey
    published: dict[str, SigningKey]
    # Access tokens whose signature and claims this ring has checked: a client sends the same
    # token with every request, and checking an RS256 signature costs more than the rest of a
    # cached request. Only verified tokens enter, so a flood of forgeries cannot fill it.
    verified: dict[str, AccessTokenClaims] = field(default_factory=dict)


# Bounded: an entry is a token and its claims (about 1 KiB); the oldest entry goes first.
VERIFIED_TOKENS_MAX = 4096


def _ring(active: SigningKey, published: Sequence[SigningKey]) -> _KeyRing:
    # The active key first (the JWKS lists it first), and always there: it must verify what it
    # signs even if a caller forgot it in ``published``.
    keys = {active.kid: active}
    for key in published:
        keys.setdefault(key.kid, key)
    return _KeyRing(active, keys)


class AccessTokenCodec:
    """Issues tokens with the active key; verifies them with any published key."""

    def __init__(self, signing_key: SigningKey, settings: Settings) -> None:
        self._ring = _ring(signing_key, [signing_key])
        # Access and client tokens name JWT_ISSUER when set; ID tokens always the issuer URL
        # (OpenID Connect: exactly what discovery says).
        self._issuer = settings.access_token_issuer
        self._id_issuer = settings.issuer
        self._audience = settings.JWT_AUDIENCE
        self._lifetime = settings.ACCESS_TOKEN_EXPIRE_MINUTES * 60
        self._id_lifetime = settings.ID_TOKEN_EXPIRE_MINUTES * 60
        # Clock skew tolerated between the host that issued a token and the one checking it.
        self._leeway = settings.JWT_LEEWAY_SECONDS

    def set_keys(self, active: SigningKey, published: Sequence[SigningKey]) -> None:
        """Sign with ``active`` from now on; accept tokens of any ``published`` key."""
        self._ring = _ring(active, published)

    @property
    def signing_key(self) -> SigningKey:
        """The active key."""
        return self._ring.active

    @property
    def published_keys(self) -> tuple[SigningKey, ...]:
        return tuple(self._ring.published.values())

    def _sign(self, payload: dict[str, Any]) -> str:
        key = self._ring.active
        return jwt.encode(
            payload, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid}
        )

    def issue(
        self,
        user_id: uuid.UUID,
        session_id: uuid.UUID,
        role: str,
        now: datetime | None = None,
        *,
        client_id: str | None = None,
        scope: str | None = None,
        amr: Sequence[str] | None = None,
        auth_time: int | None = None,
    ) -> tuple[str, int]:
        """A signed access token and its lifetime in seconds (the OAuth2 ``expires_in``)."""
        issued_at = _timestamp(now)
        payload: dict[str, Any] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": str(user_id),
            "sid": str(session_id),
            "role": role,
            "iat": issued_at,
            "exp": issued_at + self._lifetime,
            "jti": uuid.uuid4().hex,
        }
        if client_id is not None:
            payload["client_id"] = client_id
        if scope is not None:
            payload["scope"] = scope
        if amr is not None:
            payload["amr"] = list(amr)
        if auth_time is not None:
            payload["auth_time"] = auth_time
        return self._sign(payload), self._lifetime

    def issue_client_token(
        self, client_id: str, scope: str, now: datetime | None = None
    ) -> tuple[str, int]:
        """A client-credentials access token and its lifetime: no ``sid``, no ``role``."""
        issued_at = _timestamp(now)
        payload = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": client_id,
            "client_id": client_id,
            "scope": scope,
            "iat": issued_at,
            "exp": issued_at + self._lifetime,
            "jti": uuid.uuid4().hex,
        }
        return self._sign(payload), self._lifetime

    def issue_id_token(self, claims: dict[str, Any], now: datetime | None = None) -> str:
        """An OpenID Connect ID token: ``claims`` (sub, aud, nonce, auth_time, ...) plus ``iss``,
        ``iat`` and ``exp``, which are ours to set.

        It carries no ``jti`` (unless a caller adds one) and its ``aud`` is a client id, so
        ``decode`` never takes it for an access token.
        """
        issued_at = _timestamp(now)
        payload = {
            **claims,
            "iss": self._id_issuer,
            "iat": issued_at,
            "exp": issued_at + self._id_lifetime,
        }
        return self._sign(payload)

    def _verify(
        self,
        token: str,
        *,
        issuer: str,
        audience: str | None,
        require: list[str],
        verify_exp: bool = True,
    ) -> dict[str, Any]:
        """The payload of a token signed by a published key, with the claims checked."""
        ring = self._ring
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("malformed token") from None
        kid = header.get("kid")
        # isinstance first: the header is anybody's JSON, and a list is not hashable.
        key = ring.published.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenError("unknown signing key")
        if header.get("alg") != key.algorithm:
            raise TokenError("algorithm not allowed")
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                key.public_key,
                algorithms=[key.algorithm],
                audience=audience,
                issuer=issuer,
                leeway=self._leeway,
                options={
                    "require": require,
                    "strict_aud": audience is not None,
                    "verify_aud": audience is not None,
                    "verify_exp": verify_exp,
                },
            )
        except jwt.PyJWTError as exc:
            raise TokenError(_reason(exc)) from None
        return payload

    def decode(self, token: str) -> AccessTokenClaims:
        """A user's access token (it names a session); TokenError for anything not issued by
        us, expired or malformed. A token verified before is only checked for expiry again."""
        ring = self._ring
        claims = ring.verified.get(token)
        if claims is None:
            claims = self._access_claims(token)
            if len(ring.verified) >= VERIFIED_TOKENS_MAX:
                del ring.verified[next(iter(ring.verified))]
            ring.verified[token] = claims
        elif claims.exp <= time.time() - self._leeway:  # PyJWT's own rule, on its clock
            raise TokenError("token expired")
        return claims

    def _access_claims(self, token: str) -> AccessTokenClaims:
        payload = self._verify(
            token, issuer=self._issuer, audience=self._audience, require=REQUIRED_CLAIMS
        )
        role, client_id, scope = payload.get("role"), payload.get("client_id"), payload.get("scope")
        amr = payload.get("amr", [])
        auth_time = payload.get("auth_time")
        if (
            not isinstance(payload["sid"], str)
            or not (auth_time is None or (type(auth_time) is int and auth_time >= 0))
            or not _optional_str(role)
            or not _optional_str(client_id)
            or not _optional_str(scope)
            or not (isinstance(amr, list) and all(isinstance(item, str) for item in amr))
        ):
            raise TokenError("invalid claims")
        return AccessTokenClaims(
            sub=payload["sub"],
            sid=payload["sid"],
            iat=int(payload["iat"]),
            exp=int(payload["exp"]),
            jti=payload["jti"],
            iss=self._issuer,
            aud=self._audience,
            role=role,
            client_id=client_id,
            scope=scope,
            amr=tuple(amr),
            auth_time=auth_time,
        )

    def decode_client_token(self, token: str) -> ClientTokenClaims:
        """A client-credentials token; a user's token (it names a session) is refused."""
        payload = self._verify(
            token, issuer=self._issuer, audience=self._audience, require=CLIENT_TOKEN_CLAIMS
        )
        if "sid" in payload:
            raise TokenError("not a client token")
        client_id, scope = payload["client_id"], payload["scope"]
        if not isinstance(client_id, str) or not isinstance(scope, str):
            raise TokenError("invalid claims")
        if payload["sub"] != client_id:
            raise TokenError("invalid claims")
        return ClientTokenClaims(
            sub=payload["sub"],
            client_id=client_id,
            scope=scope,
            iat=int(payload["iat"]),
            exp=int(payload["exp"]),
            jti=payload["jti"],
        )

    def decode_id_token_hint(self, token: str) -> dict[str, Any]:
        """The claims of an ID token we issued, for RP-initiated logout: signature and issuer
        are checked; expiry and audience are not (OpenID Connect allows an expired hint)."""
        claims = self._verify(
            token, issuer=self._id_issuer, audience=None, require=["iss", "sub"], verify_exp=False
        )
        # Access and client tokens carry a jti (and scope, client_id) and may share the issuer:
        # only an ID token names the client it was for in aud and nothing else.
        if {"jti", "scope", "client_id", "role"} & claims.keys():
            raise TokenError("not an ID token")
        return claims

    def jwks(self) -> dict[str, Any]:
        """Every published key, the active one first."""
        return {"keys": [key.public_jwk() for key in self._ring.published.values()]}


def _timestamp(now: datetime | None) -> int:
    return int((now or datetime.now(UTC)).timestamp())


def _optional_str(value: object) -> bool:
    return value is None or isinstance(value, str)


def _reason(exc: jwt.PyJWTError) -> str:
    # Our own words: PyJWT's messages are harmless today, but a reason must never carry the token.
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not yet valid"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim {exc.claim}"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "invalid signature"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    if isinstance(exc, jwt.DecodeError):
        return "malformed token"
    return "invalid token"
