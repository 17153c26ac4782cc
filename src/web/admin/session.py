"""The console's sign-in state, kept in two sealed cookies (ENCRYPTION_KEY, ``Sealer``).

- the pending sign-in (state, PKCE verifier, where to go next) between ``/admin/signin`` and
  ``/admin/callback``: short-lived, SameSite=Lax, since the way back from the authorization
  endpoint is a redirect that may have begun on another site;
- the tokens (access, refresh, expiry, who): SameSite=Strict, HttpOnly, ``__Host-`` over https.
  No script can read them, no other site's request carries them, and they never reach the page.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass

from starlette.requests import Request
from starlette.responses import Response

from src.config.settings import Settings
from src.security.sealing import Sealer, UnsealError

_TOKENS_PURPOSE = b"admin-console-tokens"
_PENDING_PURPOSE = b"admin-console-sign-in"
# How long an admin may take on the sign-in page before the console's request is stale.
PENDING_MAX_AGE = 900
# A sealed cookie far larger than ours is not ours: never opened.
MAX_COOKIE = 4096


def tokens_cookie(settings: Settings) -> str:
    return "__Host-ums_admin" if settings.secure_cookies else "ums_admin"


def pending_cookie(settings: Settings) -> str:
    return "__Host-ums_admin_signin" if settings.secure_cookies else "ums_admin_signin"


@dataclass
class ConsoleTokens:
    """What the console holds for a signed-in admin. ``expires_at``: epoch seconds."""

    access_token: str
    refresh_token: str | None
    expires_at: float
    user_id: str
    email: str

    def expiring(self, margin: float = 30.0) -> bool:
        return time.time() + margin >= self.expires_at


@dataclass
class PendingSignIn:
    state: str
    verifier: str
    next: str
    issued_at: float

    @property
    def challenge(self) -> str:
        digest = hashlib.sha256(self.verifier.encode()).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def new_pending(next_path: str) -> PendingSignIn:
    return PendingSignIn(
        state=secrets.token_urlsafe(24),
        verifier=secrets.token_urlsafe(48),
        next=next_path,
        issued_at=time.time(),
    )


def _open(sealer: Sealer, value: str | None, purpose: bytes) -> dict[str, object] | None:
    if not value or len(value) > MAX_COOKIE:
        return None
    try:
        data = json.loads(sealer.unseal(value, purpose))
    except (UnsealError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_tokens(request: Request, sealer: Sealer, settings: Settings) -> ConsoleTokens | None:
    data = _open(sealer, request.cookies.get(tokens_cookie(settings)), _TOKENS_PURPOSE)
    if data is None:
        return None
    try:
        return ConsoleTokens(**data)  # type: ignore[arg-type]
    except TypeError:
        return None


def read_pending(request: Request, sealer: Sealer, settings: Settings) -> PendingSignIn | None:
    data = _open(sealer, request.cookies.get(pending_cookie(settings)), _PENDING_PURPOSE)
    if data is None:
        return None
    try:
        pending = PendingSignIn(**data)  # type: ignore[arg-type]
    except TypeError:
        return None
    return pending if time.time() - pending.issued_at <= PENDING_MAX_AGE else None


def set_tokens(
    response: Response, sealer: Sealer, settings: Settings, tokens: ConsoleTokens
) -> None:
    """A browser-session cookie (no Max-Age): closing the browser forgets the console's tokens;
    the refresh token's own lifetime bounds a browser that stays open."""
    value = sealer.seal(json.dumps(asdict(tokens)).encode(), _TOKENS_PURPOSE)
    response.set_cookie(
        tokens_cookie(settings),
        value,
        httponly=True,
        samesite="strict",
        secure=settings.secure_cookies,
        path="/",
    )


def clear_tokens(response: Response, settings: Settings) -> None:
    response.delete_cookie(
        tokens_cookie(settings),
        httponly=True,
        samesite="strict",
        secure=settings.secure_cookies,
        path="/",
    )


def set_pending(
    response: Response, sealer: Sealer, settings: Settings, pending: PendingSignIn
) -> None:
    value = sealer.seal(json.dumps(asdict(pending)).encode(), _PENDING_PURPOSE)
    response.set_cookie(
        pending_cookie(settings),
        value,
        max_age=PENDING_MAX_AGE,
        httponly=True,
        samesite="lax",
        secure=settings.secure_cookies,
        path="/",
    )


def clear_pending(response: Response, settings: Settings) -> None:
    response.delete_cookie(
        pending_cookie(settings),
        httponly=True,
        samesite="lax",
        secure=settings.secure_cookies,
        path="/",
    )


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a console path only (no open redirect)."""
    if (
        value
        and len(value) <= 1000
        and value.startswith("/admin")
        and not value.startswith("//")
        and "\\" not in value
        and all(0x20 < ord(c) < 0x7F for c in value)
    ):
        return value
    return "/admin/users"
