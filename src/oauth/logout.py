"""RP-initiated logout (OpenID Connect RP-Initiated Logout 1.0): who asks, and where to go after.

``post_logout_redirect_uri`` is followed only when it is registered, exactly, for the client the
request names (through ``client_id`` or the ``aud`` of ``id_token_hint``); otherwise the request
is refused on a page, never redirected (no open redirect).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from src.auth.context import Security
from src.auth.jwt import TokenError
from src.db.models import OAuthClient
from src.oauth.authorize import PageError, parse_query
from src.oauth.clients import get_client, post_logout_redirect_allowed

MAX_STATE = 1024


@dataclass(frozen=True)
class LogoutRequest:
    raw: str
    client: OAuthClient | None
    redirect_uri: str | None
    state: str | None
    # The verified claims of id_token_hint (signature and issuer; it may have expired).
    hint: dict[str, Any] | None


async def parse_logout_request(db: AsyncSession, sec: Security, raw: str) -> LogoutRequest:
    params: dict[str, str] = {}
    for name, value in parse_query(raw):
        if name in params:
            raise PageError(f"The sign-out request repeats {name}.")
        params[name] = value
    hint = None
    if params.get("id_token_hint"):
        try:
            hint = sec.tokens.decode_id_token_hint(params["id_token_hint"])
        except TokenError:
            raise PageError("The sign-out request carries an ID token we did not issue.") from None
    client_id = params.get("client_id") or None
    hinted = hint.get("aud") if hint else None
    if isinstance(hinted, list):
        hinted = hinted[0] if len(hinted) == 1 else None
    if client_id and hinted and client_id != hinted:
        raise PageError("The sign-out request names two different applications.")
    client_id = client_id or (hinted if isinstance(hinted, str) else None)
    client = await get_client(db, client_id) if client_id and len(client_id) <= 255 else None
    redirect_uri = params.get("post_logout_redirect_uri") or None
    if redirect_uri is not None:
        if client is None:
            raise PageError("A sign-out redirect needs the application (client_id or hint).")
        if not post_logout_redirect_allowed(client, redirect_uri):
            raise PageError("The sign-out redirect is not registered for this application.")
    state = params.get("state") or None
    if state is not None and len(state) > MAX_STATE:
        raise PageError("The sign-out request's state is too long.")
    return LogoutRequest(raw=raw, client=client, redirect_uri=redirect_uri, state=state, hint=hint)
