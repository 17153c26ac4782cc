"""Signing in with a password, and with a second factor when the account has one.

The password grant answers an account with a second factor with ``400 {"error":
"mfa_required", "mfa_token": ...}``; the client then completes the sign-in with the
``MFA_GRANT`` grant type, sending the token and a code. This extension is not an IETF standard
(Auth0 and others have similar ones): the password grant itself has no place for a second step,
and first-party clients that still use it (a command-line tool, a legacy app) need one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.auth import mfa
from src.auth.challenge import amr_for, issue_ticket, open_ticket
from src.auth.context import Security
from src.auth.service import ClientInfo, changed_users, check_password, complete_sign_in
from src.config.logging import audit_line
from src.errors import OAuthError
from src.services import metrics
from src.users import repository
from src.users.schemas import TokenResponse
from src.users.service import commit_change

audit = logging.getLogger("src.auth.audit")

# The follow-up grant type of the password grant's mfa_required answer (see README).
MFA_GRANT = "urn:user-management-service:grant-type:mfa"
# The audience of tickets for the service's own API (a password grant without a client).
OWN_API = "own-api"

Defer = Callable[[Callable[[], Awaitable[None]]], None]


async def password_grant(
    db: AsyncSession,
    sec: Security,
    username: str,
    password: str,
    who: ClientInfo,
    client_id: str | None,
    *,
    sessions: async_sessionmaker[AsyncSession],
    defer: Defer,
    scope: str | None = None,
) -> TokenResponse:
    user = await check_password(db, sec, username, password, who, sessions=sessions, defer=defer)
    enrol_first = await mfa.missing_required_factor(db, sec.settings, user)
    second_step = not enrol_first and await mfa.has_second_factor(db, user.id)
    if enrol_first or second_step:
        # The sign-in stops here for now: keep what the password check did (a rehash).
        await commit_change(db, sec, changed_users(db, user))
    if enrol_first:
        metrics.login("mfa_enrollment_required")
        audit_line(audit, "login needs an enrolment first", user=user.id, ip=who.ip)
        raise OAuthError(
            "mfa_enrollment_required",
            "This account must have a second factor: sign in on the hosted pages to set one up.",
        )
    if second_step:
        ticket = issue_ticket(sec, user.id, client_id or OWN_API, scope)
        audit_line(audit, "login needs a second factor", user=user.id, ip=who.ip)
        raise OAuthError(
            "mfa_required",
            f"A second factor is required: use grant_type={MFA_GRANT} with this mfa_token.",
            extra={"mfa_token": ticket},
        )
    tokens = await complete_sign_in(db, sec, user, who, client_id, amr=["pwd"], scope=scope)
    metrics.token_issued("password")
    return tokens


async def second_factor_grant(
    db: AsyncSession,
    sec: Security,
    mfa_token: str,
    code: str,
    who: ClientInfo,
    client_id: str | None,
    *,
    sessions: async_sessionmaker[AsyncSession],
    defer: Defer,
) -> TokenResponse:
    """Complete a password grant with a TOTP or recovery code (the ``MFA_GRANT`` grant)."""
    ticket = open_ticket(sec, mfa_token, client_id or OWN_API)
    if ticket is None:
        raise OAuthError("invalid_grant", "The mfa_token is invalid or expired.")
    user = await repository.get_user(db, ticket.user_id)
    if user is None or not user.is_active:
        raise OAuthError("invalid_grant", "The mfa_token is invalid or expired.")
    try:
        method = await mfa.verify_second_factor(
            db, sec, user, code, who, sessions=sessions, defer=defer
        )
    except mfa.SecondFactorRefused:
        metrics.login("mfa_failed")
        audit_line(audit, "second factor refused", user=user.id, ip=who.ip)
        raise OAuthError("invalid_grant", "The code is not valid.") from None
    tokens = await complete_sign_in(
        db, sec, user, who, client_id, amr=amr_for(method), scope=ticket.scope
    )
    metrics.token_issued("mfa")
    return tokens
