"""Opaque tokens: refresh tokens and one-time (password reset, email verification) tokens.

Only a token's hash is stored, so a leaked database row cannot be replayed.
"""

from __future__ import annotations

import hashlib
import secrets

TOKEN_BYTES = 32


def new_token() -> str:
    """A URL-safe token carrying 256 bits from the OS CSPRNG (43 characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """SHA-256 of the token, hex: the form stored and looked up.

    A fast hash is right here, unlike for passwords: the token has 256 random bits, so no
    dictionary or brute-force search over its hash is feasible, and a salt or a slow hash would
    add nothing but latency (and a salt would prevent looking the token up by its hash).
    """
    # surrogatepass: a malformed token from a JSON body ("\ud800") must hash to nothing stored,
    # not raise.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
