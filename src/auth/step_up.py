"""Step-up authentication (RFC 9470): sensitive changes need a recent, strong sign-in.

"Recent" is at most ``STEP_UP_MAX_AGE_SECONDS`` since the user last proved who they are in this
session (``auth_time``, carried in the access token). "Strong" is the strongest the user has: a
second factor (``mfa`` in ``amr``) once one is enrolled, the password otherwise. A stolen access
token alone then cannot change the password, the email or the factors, nor act as an admin, once
the sign-in behind it is a few minutes old. ``reauthenticate`` brings a session up to date.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.auth import mfa
from src.auth.challenge import amr_for
from src.auth.context import Principal, Security
from src.auth.service import ClientInfo, record_event_apart, token_response, verify_password
from src.config.logging import audit_line
from src.db.models import User, UserSession
from src.db.types import utcnow
from src.errors import DomainError, StepUpRequired
from src.events.outbox import EventType
from src.services import metrics
from src.users import repository
from src.users.schemas import TokenResponse
from src.users.service import commit_change

audit = logging.getLogger("src.auth.audit")


class StepUpFailed(DomainError):
    """A re-authentication with a wrong password (400); the caller records the event."""

    def __init__(self, user_id: uuid.UUID, session_id: uuid.UUID, reason: str) -> None:
        super().__init__("The password is not correct.")
        self.user_id, self.session_id, self.reason = user_id, session_id, reason


async def record_failure(
    sessions: async_sessionmaker[AsyncSession],
    sec: Security,
    user_id: uuid.UUID,
    session_id: uuid.UUID,
    reason: str,
) -> None:
    """``user.step_up_failed``, in a transaction of its own: the refused request rolls back."""
    data = {"id": user_id, "session_id": session_id, "reason": reason}
    await record_event_apart(sessions, sec, EventType.STEP_UP_FAILED, user_id, data)


def _age(principal: Principal, now: datetime) -> float | None:
    if principal.auth_time is None:
        return None
    return (now - datetime.fromtimestamp(principal.auth_time, UTC)).total_seconds()


async def require_recent_authentication(
    db: AsyncSession, sec: Security, principal: Principal, now: datetime | None = None
) -> None:
    """StepUpRequired (401, ``insufficient_user_authentication``) unless recent and strong."""
    max_age = sec.settings.STEP_UP_MAX_AGE_SECONDS
    age = _age(principal, now or utcnow())
    fresh = age is not None and age <= max_age
    strong = "mfa" in principal.amr or not await mfa.has_second_factor(db, principal.id)
    if not (fresh and strong):
        reason = "too_old" if not fresh else "second_factor_needed"
        audit_line(
            audit,
            "step-up required",
            user=principal.id,
            session=principal.session_id,
            reason=reason,
        )
        raise StepUpRequired(max_age, reason)


async def reauthenticate(
    db: AsyncSession,
    sec: Security,
    principal: Principal,
    password: str,
    code: str | None,
    client: ClientInfo,
    *,
    sessions: async_sessionmaker[AsyncSession] | None = None,
    defer: mfa.Defer | None = None,
) -> TokenResponse:
    """Prove it is still the user (password, and a second factor if enrolled): the session's
    ``auth_time`` becomes now, and a new access token says so."""
    user = await repository.get_user(db, principal.id)
    session = await repository.get_session(db, principal.session_id)
    if user is None or session is None:
        raise DomainError("The session has ended.")
    await refresh_authentication(
        db, sec, user, session, password, code, client, sessions=sessions, defer=defer
    )
    metrics.token_issued("step_up")
    return token_response(sec, user, session, None)


async def refresh_authentication(
    db: AsyncSession,
    sec: Security,
    user: User,
    session: UserSession,
    password: str,
    code: str | None,
    client: ClientInfo,
    *,
    sessions: async_sessionmaker[AsyncSession] | None = None,
    defer: mfa.Defer | None = None,
) -> None:
    """Check the password (and the second factor, when enrolled) and record on the session that
    the user authenticated now, and how (an API session or a browser's alike). Committed."""
    if not await verify_password(db, sec, user, password, client):
        if sessions is not None:
            await record_failure(sessions, sec, user.id, session.id, "wrong_password")
        raise StepUpFailed(user.id, session.id, "wrong_password")
    amr = ["pwd"]
    if await mfa.has_second_factor(db, user.id):
        if not code:
            raise DomainError("Enter the code from your authenticator app, or a recovery code.")
        method = await mfa.verify_second_factor(
            db, sec, user, code, client, sessions=sessions, defer=defer
        )
        amr = amr_for(method)
    session.auth_time, session.amr = utcnow(), " ".join(amr)
    await commit_change(db, sec, session_ids=[session.id])
    audit_line(audit, "re-authenticated", user=user.id, session=session.id)


def is_recent(sec: Security, session: UserSession, now: datetime | None = None) -> bool:
    """Whether a session's last authentication is recent enough for a sensitive change (the
    strength is the caller's to check: it needs the database)."""
    auth_time = session.auth_time or session.created_at
    age = ((now or utcnow()) - auth_time).total_seconds()
    return age <= sec.settings.STEP_UP_MAX_AGE_SECONDS


async def session_is_strong_enough(db: AsyncSession, sec: Security, session: UserSession) -> bool:
    """Recent, and with the second factor when the user has one: what a hosted page checks
    before a sensitive change (an access token carries the same facts; see above)."""
    if not is_recent(sec, session):
        return False
    return "mfa" in (session.amr or "").split() or not await mfa.has_second_factor(
        db, session.user_id
    )
