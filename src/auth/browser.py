"""The provider's own sign-in: a browser session carried by a cookie on the hosted pages.

It is a row in ``sessions`` like any other (``kind="browser"``), so it is listed with the user's
other sessions, ended by logout-all, a password change or a deactivation, and checked against
the database on every use. The cookie holds a random secret; only its hash is stored.
Sessions an application obtained through it (authorization code flow) name it as their parent:
signing out here ends them too.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from src.auth.context import Security
from src.config.settings import Settings
from src.db.models import User, UserSession
from src.db.types import utcnow
from src.security.sealing import UnsealError
from src.security.tokens import hash_token
from src.users.service import commit_change

# 43 characters from new_token(); anything much longer is not ours and is not even hashed.
MAX_COOKIE_LENGTH = 128


def cookie_name(settings: Settings) -> str:
    """``__Host-`` binds the cookie to this exact origin (Secure, path /, no Domain) where it
    can: browsers refuse that prefix on plain http, so development uses a plain name."""
    return "__Host-ums_session" if settings.secure_cookies else "ums_session"


@dataclass(frozen=True)
class BrowserSignIn:
    session: UserSession
    user: User


async def current_browser_session(db: AsyncSession, cookie: str | None) -> BrowserSignIn | None:
    """The live browser session a cookie names, with its (active) user; None otherwise."""
    if not cookie or len(cookie) > MAX_COOKIE_LENGTH:
        return None
    session = (
        await db.execute(
            select(UserSession).where(
                UserSession.cookie_hash == hash_token(cookie), UserSession.kind == "browser"
            )
        )
    ).scalar_one_or_none()
    if session is None or session.revoked_at is not None or session.expires_at <= utcnow():
        return None
    user = await db.get(User, session.user_id)
    if user is None or not user.is_active:
        return None
    return BrowserSignIn(session=session, user=user)


async def end_browser_session(
    db: AsyncSession, sec: Security, session_id: uuid.UUID, reason: str = "logout"
) -> list[uuid.UUID]:
    """End a browser session and every session an application obtained through it."""
    result = await db.execute(
        update(UserSession)
        .where(
            or_(UserSession.id == session_id, UserSession.parent_id == session_id),
            UserSession.revoked_at.is_(None),
        )
        .values(revoked_at=utcnow(), revoked_reason=reason)
        .returning(UserSession.id),
        execution_options={"synchronize_session": False},
    )
    ended = list(result.scalars().all())
    await commit_change(db, sec, session_ids=ended)
    return ended


# --- the known-device cookie ----------------------------------------------------------------------
# A browser that signed in to an account on the hosted pages keeps a sealed note of it. It is not
# a credential (it signs nobody in); it tells the login guard that this browser is the owner's,
# so failures elsewhere never slow the owner down, wherever they sign in from next.

_DEVICE_PURPOSE = b"known-device"
MAX_DEVICE_COOKIE = 512


def device_cookie_name(settings: Settings) -> str:
    return "__Host-ums_device" if settings.secure_cookies else "ums_device"


def device_note(sec: Security, user_id: uuid.UUID, now: datetime | None = None) -> str:
    issued = int((now or utcnow()).timestamp())
    body = json.dumps({"u": str(user_id), "t": issued}).encode()
    return sec.sealer.seal(body, _DEVICE_PURPOSE)


def device_owner(
    sec: Security, cookie: str | None, now: datetime | None = None
) -> uuid.UUID | None:
    """The account a known-device cookie names, if it is ours and younger than
    LOGIN_KNOWN_ADDRESS_DAYS; None otherwise."""
    if not cookie or len(cookie) > MAX_DEVICE_COOKIE:
        return None
    try:
        body = json.loads(sec.sealer.unseal(cookie, _DEVICE_PURPOSE))
        owner, issued = uuid.UUID(body["u"]), int(body["t"])
    except (UnsealError, ValueError, KeyError, TypeError):
        return None
    oldest = (now or utcnow()) - timedelta(days=sec.settings.LOGIN_KNOWN_ADDRESS_DAYS)
    return owner if issued >= int(oldest.timestamp()) else None
