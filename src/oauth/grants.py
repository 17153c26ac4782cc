"""What the token, userinfo, revocation and introspection endpoints do, on plain values.

The password and refresh-token grants live in ``src.auth.service`` (they predate the provider);
this module adds the authorization code grant (with PKCE and replay detection), client
credentials, ID tokens, userinfo claims, revocation (RFC 7009) and introspection (RFC 7662).
Introspection reads the database, never the cache: a resource server asking it wants to know
*now* whether a session was ended.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from src.auth.context import Security
from src.auth.jwt import TokenError
from src.auth.service import ClientInfo, open_session, record_sign_in, token_response
from src.config.logging import audit_line
from src.db.models import AuthorizationCode, OAuthClient, User, UserSession
from src.db.types import utcnow
from src.errors import OAuthError
from src.oauth.authorize import verifier_matches
from src.oauth.clients import SCOPES, get_client, redirect_uri_allowed
from src.security.tokens import hash_token
from src.services import metrics
from src.users import repository
from src.users.schemas import TokenResponse
from src.users.service import commit_change

audit = logging.getLogger("src.auth.audit")

_BAD_CODE = "The authorization code is invalid, expired or already used."


def _grant_allowed(client: OAuthClient, grant_type: str) -> None:
    if grant_type not in client.grant_types:
        raise OAuthError("unauthorized_client", f"This client may not use {grant_type}.")


def requested_scopes(client: OAuthClient, scope: str | None, *, default: list[str]) -> list[str]:
    """The scopes a token grant asks for: all allowed to the client, or invalid_scope."""
    scopes = list(dict.fromkeys((scope or "").split())) or default
    refused = [s for s in scopes if s not in SCOPES or s not in client.scopes]
    if refused:
        raise OAuthError("invalid_scope", f"Scope not allowed for this client: {refused[0]}.")
    return scopes


# --- authorization code ---------------------------------------------------------------------------


async def exchange_code(
    db: AsyncSession,
    sec: Security,
    client: OAuthClient,
    code: str,
    redirect_uri: str | None,
    code_verifier: str | None,
    who: ClientInfo,
) -> TokenResponse:
    """RFC 6749 section 4.1.3 with RFC 7636: one use, this client, this redirect URI, this
    verifier. A code presented twice ends the session it was exchanged for (section 4.1.2)."""
    _grant_allowed(client, "authorization_code")
    row = await db.get(AuthorizationCode, hash_token(code), with_for_update=True)
    now = utcnow()
    if row is None:
        audit_line(audit, "code refused", client=client.client_id, ip=who.ip, reason="unknown")
        raise OAuthError("invalid_grant", _BAD_CODE)
    if row.used_at is not None:
        await _revoke_replayed(db, sec, row, client, who)
        raise OAuthError("invalid_grant", _BAD_CODE)
    if row.client_id != client.client_id:
        audit_line(
            audit,
            "code refused",
            level=logging.WARNING,
            client=client.client_id,
            ip=who.ip,
            reason="other_client",
        )
        raise OAuthError("invalid_grant", _BAD_CODE)
    if row.expires_at <= now:
        raise OAuthError("invalid_grant", _BAD_CODE)
    if redirect_uri != row.redirect_uri or not redirect_uri_allowed(client, row.redirect_uri):
        # Also refused when the URI was removed from the client since the code was issued.
        raise OAuthError("invalid_grant", "redirect_uri does not match the authorization request.")
    if not verifier_matches(code_verifier, row.code_challenge):
        audit_line(audit, "code refused", client=client.client_id, ip=who.ip, reason="pkce")
        raise OAuthError("invalid_grant", "The code_verifier does not match the code_challenge.")

    # Spent before anything else can fail, and only once even if two requests got this far
    # (SQLite has no row locks): the loser of the race is a replay.
    spent = await db.execute(
        update(AuthorizationCode)
        .where(AuthorizationCode.code_hash == row.code_hash, AuthorizationCode.used_at.is_(None))
        .values(used_at=now),
        execution_options={"synchronize_session": False},
    )
    if getattr(spent, "rowcount", 0) != 1:
        raise OAuthError("invalid_grant", _BAD_CODE)

    user = await repository.get_user(db, row.user_id)
    parent = await repository.get_session(db, row.browser_session_id)
    parent_live = parent is not None and parent.revoked_at is None and parent.expires_at > now
    if user is None or not user.is_active or not parent_live:
        await db.commit()  # the code stays spent
        raise OAuthError("invalid_grant", "The sign-in behind this code has ended.")

    session, refresh = await open_session(
        db,
        sec,
        user,
        who,
        client.client_id,
        amr=row.amr.split(),
        scope=row.scope,
        auth_time=row.auth_time,
        parent_id=row.browser_session_id,
    )
    row.session_id = session.id
    record_sign_in(db, sec, session, who, "authorization_code")
    await commit_change(db, sec)  # no user row changed: the user's cached copy stays
    audit_line(
        audit,
        "code exchanged",
        user=user.id,
        client=client.client_id,
        ip=who.ip,
        session=session.id,
    )
    # A third party stays signed in only if the user allowed it ("offline_access" on the
    # consent page); the company's own applications do whenever they may refresh.
    offline = "refresh_token" in client.grant_types and (
        client.first_party or "offline_access" in row.scope.split()
    )
    response = token_response(sec, user, session, refresh if offline else None)
    if "openid" in row.scope.split():
        response.id_token = id_token(sec, user, session, client.client_id, row.nonce)
    metrics.token_issued("authorization_code")
    return response


async def _revoke_replayed(
    db: AsyncSession, sec: Security, row: AuthorizationCode, client: OAuthClient, who: ClientInfo
) -> None:
    """RFC 6749 section 4.1.2: a replayed code should revoke what it was exchanged for."""
    if row.session_id is not None:
        session = await repository.get_session(db, row.session_id)
        if session is not None and session.revoked_at is None:
            session.revoked_at, session.revoked_reason = utcnow(), "code_replay"
            await commit_change(db, sec, session_ids=[session.id])
    audit_line(
        audit,
        "authorization code replay",
        level=logging.WARNING,
        client=client.client_id,
        ip=who.ip,
        session=row.session_id,
        session_revoked=True,
    )


def id_token(
    sec: Security, user: User, session: UserSession, client_id: str, nonce: str | None
) -> str:
    """OpenID Connect Core section 2, with the claims the granted scopes allow (section 5.4)."""
    scopes = set((session.scope or "").split())
    auth_time = session.auth_time or session.created_at
    claims: dict[str, Any] = {
        "sub": str(user.id),
        "aud": client_id,
        "azp": client_id,
        "auth_time": int(auth_time.timestamp()),
        "amr": (session.amr or "pwd").split(),
        # The provider's session (the browser sign-in), as RP-initiated logout knows it.
        "sid": str(session.parent_id or session.id),
    }
    if nonce is not None:
        claims["nonce"] = nonce
    claims.update(userinfo_claims(user, scopes))
    claims["sub"] = str(user.id)
    return sec.tokens.issue_id_token(claims)


def userinfo_claims(user: User | Any, scopes: set[str]) -> dict[str, Any]:
    """The claims the scopes allow: ``sub`` always, name with profile, email with email."""
    claims: dict[str, Any] = {"sub": str(user.id)}
    if "profile" in scopes:
        claims["name"] = user.full_name
        claims["updated_at"] = int(user.updated_at.timestamp())
    if "email" in scopes:
        claims["email"] = user.email
        claims["email_verified"] = bool(user.email_verified)
    return claims


# --- client credentials ---------------------------------------------------------------------------


def client_credentials(sec: Security, client: OAuthClient, scope: str | None) -> TokenResponse:
    """RFC 6749 section 4.4: a service account's token, for confidential clients only."""
    if client.client_type != "confidential":
        raise OAuthError("unauthorized_client", "Public clients cannot use client_credentials.")
    _grant_allowed(client, "client_credentials")
    # Scopes about a user mean nothing to a service account.
    allowed = [s for s in client.scopes if s not in ("openid", "offline_access")]
    scopes = requested_scopes(client, scope, default=allowed)
    if any(s in ("openid", "offline_access") for s in scopes):
        raise OAuthError("invalid_scope", "openid and offline_access need a user.")
    token, expires_in = sec.tokens.issue_client_token(client.client_id, " ".join(scopes))
    audit_line(audit, "client credentials issued", client=client.client_id)
    metrics.token_issued("client_credentials")
    return TokenResponse(access_token=token, expires_in=expires_in, scope=" ".join(scopes) or None)


# --- revocation and introspection -----------------------------------------------------------------


async def revoke(db: AsyncSession, sec: Security, client: OAuthClient, token: str) -> None:
    """RFC 7009: end the session behind a refresh or access token of this client. Tokens that
    are unknown, already dead or another client's are ignored (the answer is 200 either way)."""
    session = await _session_of(db, sec, token)
    if session is None or session.client_id != client.client_id or session.revoked_at:
        return
    session.revoked_at, session.revoked_reason = utcnow(), "revoked_by_client"
    await commit_change(db, sec, session_ids=[session.id])
    audit_line(
        audit, "token revoked", user=session.user_id, client=client.client_id, session=session.id
    )


async def _session_of(db: AsyncSession, sec: Security, token: str) -> UserSession | None:
    row = await repository.get_refresh_token(db, hash_token(token))
    if row is not None:
        return await repository.get_session(db, row.session_id)
    try:
        claims = sec.tokens.decode(token)
        return await repository.get_session(db, uuid.UUID(claims.sid))
    except (TokenError, ValueError):
        return None


_INACTIVE: dict[str, Any] = {"active": False}


async def introspect(
    db: AsyncSession, sec: Security, caller: OAuthClient, token: str
) -> dict[str, Any]:
    """RFC 7662 section 2.2, from the database: a logged-out session, a deactivated user or a
    changed password (which ends sessions) shows as inactive at once.

    A client sees its own tokens only; a first-party confidential client (the company's own API
    gateway or resource server) sees every token. Anything else is ``{"active": false}``, as
    section 2.2 allows, so a client learns nothing about another's users."""
    answer = await _introspect(db, sec, token)
    if not answer.get("active"):
        return _INACTIVE
    if not caller.first_party and answer.get("client_id") != caller.client_id:
        return _INACTIVE
    scopes = answer.get("scope")
    # The address is the user's to share: only with the email scope (or the service's own API).
    if scopes is not None and "email" not in scopes.split():
        answer.pop("username", None)
    return answer


async def _introspect(db: AsyncSession, sec: Security, token: str) -> dict[str, Any]:
    now = utcnow()
    refresh = await repository.get_refresh_token(db, hash_token(token))
    if refresh is not None:
        session = await repository.get_session(db, refresh.session_id)
        if refresh.used_at is not None or session is None:
            return _INACTIVE
        user = await _live_user(db, session)
        if user is None:
            return _INACTIVE
        return {
            "active": True,
            "token_type": "refresh_token",
            "client_id": session.client_id,
            "scope": session.scope,
            "sub": str(user.id),
            "username": user.email,
            "exp": int(session.expires_at.timestamp()),
            "iat": int(refresh.issued_at.timestamp()),
            "iss": sec.settings.issuer,
            "sid": str(session.id),
        }
    try:
        claims = sec.tokens.decode(token)
    except TokenError:
        return await _introspect_client_token(db, sec, token)
    try:
        session = await repository.get_session(db, uuid.UUID(claims.sid))
    except ValueError:
        return _INACTIVE
    if session is None or str(session.user_id) != claims.sub or session.expires_at <= now:
        return _INACTIVE
    user = await _live_user(db, session)
    if user is None:
        return _INACTIVE
    return {
        "active": True,
        "token_type": "Bearer",
        "client_id": claims.client_id,
        "scope": claims.scope,
        "sub": claims.sub,
        "username": user.email,
        "exp": claims.exp,
        "iat": claims.iat,
        "iss": claims.iss,
        "aud": claims.aud,
        "jti": claims.jti,
        "sid": claims.sid,
    }


async def _introspect_client_token(db: AsyncSession, sec: Security, token: str) -> dict[str, Any]:
    try:
        claims = sec.tokens.decode_client_token(token)
    except TokenError:
        return _INACTIVE
    # A deleted client's tokens die with it.
    if await get_client(db, claims.client_id) is None:
        return _INACTIVE
    return {
        "active": True,
        "token_type": "Bearer",
        "client_id": claims.client_id,
        "scope": claims.scope,
        "sub": claims.sub,
        "exp": claims.exp,
        "iat": claims.iat,
        "iss": sec.settings.JWT_ISSUER or sec.settings.issuer,
        "aud": sec.settings.JWT_AUDIENCE,
        "jti": claims.jti,
    }


async def _live_user(db: AsyncSession, session: UserSession) -> User | None:
    if session.revoked_at is not None or session.expires_at <= utcnow():
        return None
    user = await repository.get_user(db, session.user_id)
    return user if user is not None and user.is_active else None
