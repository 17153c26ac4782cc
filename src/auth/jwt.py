"""Access tokens: short-lived JWTs signed with an asymmetric key.

Other services verify them with the public key served as a JWKS, so no secret is shared. The key
is parsed once into a key object: PyJWT re-parses PEM text on every call (~37 ms per RS256 token).
Verification pins the one algorithm of our key, which refuses ``alg=none`` and the HS256 "public
key as HMAC secret" confusion whatever the token's header says.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import uuid
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

    def public_jwk(self) -> dict[str, str]:
        return {
            **_jwk_members(self.public_key),
            "kid": self.kid,
            "alg": self.algorithm,
            "use": "sig",
        }


def _settings_error(variable: str, problem: str) -> SettingsError:
    return SettingsError(f"Invalid configuration: {variable}: {problem}")


def _describe(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"an RSA key of {key.key_size} bits"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC key on curve {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    return f"a key of type {type(key).__name__}"


def _parse_private_key(pem: bytes, algorithm: str, variable: str) -> PrivateKey:
    """The key object for PEM text, refusing a key that does not fit the algorithm."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Never echo the text: it is (or was meant to be) a private key.
        raise _settings_error(variable, "not an unencrypted PEM private key") from None
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
    raise _settings_error(
        variable,
        f"holds {_describe(key)}, but JWT_ALGORITHM={algorithm} needs {_EXPECTED_KEY[algorithm]}",
    )


def _generate_private_key(algorithm: str) -> PrivateKey:
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


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
        "Access tokens are signed with a development key kept at %s; "
        "set JWT_PRIVATE_KEY or JWT_PRIVATE_KEY_FILE for any shared or production deployment",
        path,
    )
    return SigningKey.from_private_key(algorithm, key)


def load_signing_key(settings: Settings) -> SigningKey:
    """The signing key from the settings; in development, a generated one kept under DATA_DIR."""
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
        raise _settings_error(
            "JWT_PRIVATE_KEY", "required in production (PEM text, or set JWT_PRIVATE_KEY_FILE)"
        )
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


class TokenError(Exception):
    """An access token that must not be accepted; the message is a short reason, never the token."""


class AccessTokenCodec:
    """Issues and verifies access tokens with one signing key."""

    def __init__(self, signing_key: SigningKey, settings: Settings) -> None:
        self._key = signing_key
        self._issuer = settings.JWT_ISSUER
        self._audience = settings.JWT_AUDIENCE
        self._lifetime = settings.ACCESS_TOKEN_EXPIRE_MINUTES * 60
        # Clock skew tolerated between the host that issued a token and the one checking it.
        self._leeway = settings.JWT_LEEWAY_SECONDS

    @property
    def signing_key(self) -> SigningKey:
        return self._key

    def issue(
        self,
        user_id: uuid.UUID,
        session_id: uuid.UUID,
        role: str,
        now: datetime | None = None,
    ) -> tuple[str, int]:
        """A signed token and its lifetime in seconds (the OAuth2 ``expires_in``)."""
        issued_at = int((now or datetime.now(UTC)).timestamp())
        payload = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": str(user_id),
            "sid": str(session_id),
            "role": role,
            "iat": issued_at,
            "exp": issued_at + self._lifetime,
            "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(
            payload,
            self._key.private_key,
            algorithm=self._key.algorithm,
            headers={"kid": self._key.kid},
        )
        return token, self._lifetime

    def decode(self, token: str) -> AccessTokenClaims:
        """The verified claims; TokenError for anything not issued by us, expired or malformed."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("malformed token") from None
        if header.get("alg") != self._key.algorithm:
            raise TokenError("algorithm not allowed")
        if header.get("kid") != self._key.kid:
            raise TokenError("unknown signing key")
        try:
            payload = jwt.decode(
                token,
                self._key.public_key,
                algorithms=[self._key.algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": REQUIRED_CLAIMS, "strict_aud": True},
            )
        except jwt.PyJWTError as exc:
            raise TokenError(_reason(exc)) from None
        role = payload.get("role")
        if not isinstance(payload["sid"], str) or not (role is None or isinstance(role, str)):
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
        )

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self._key.public_jwk()]}


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
