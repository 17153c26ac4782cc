"""SQL for users and their sessions and tokens: the only module that writes queries for them."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from src.db.models import OneTimeToken, RefreshToken, User, UserSession


async def get_user(db: AsyncSession, user_id: uuid.UUID) -> User | None:
    return await db.get(User, user_id)


async def get_user_by_email(db: AsyncSession, email: str) -> User | None:
    result = await db.execute(select(User).where(User.email == email))
    return result.scalar_one_or_none()


async def lock_active_admins(db: AsyncSession) -> int:
    """Count the active admins, locking their rows until the transaction ends.

    Two admins demoting (or deleting) themselves at once would otherwise both see the other one
    and both succeed, leaving none; with the lock the second waits, then counts again.
    """
    query = (
        select(User.id)
        .where(User.role == "admin", User.is_active)
        .order_by(User.id)  # one locking order for everyone: no deadlock between two demotions
        .with_for_update()
    )
    return len((await db.execute(query)).scalars().all())


def encode_cursor(user: User) -> str:
    raw = f"{user.created_at.isoformat()}|{user.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """Raise ValueError for anything that is not a cursor this service made."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, _, user_id = base64.urlsafe_b64decode(padded).decode().partition("|")
        after = datetime.fromisoformat(created), uuid.UUID(user_id)
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError("invalid cursor") from exc
    if after[0].tzinfo is None:  # ours always carry one; a naive time cannot be compared
        raise ValueError("invalid cursor")
    try:
        after[0].astimezone(UTC)  # compared in UTC: 9999-12-31T23:59-01:00 is no time there
    except OverflowError as exc:
        raise ValueError("invalid cursor") from exc
    return after


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def list_users(
    db: AsyncSession,
    *,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None = None,
    is_active: bool | None = None,
    role: str | None = None,
    q: str | None = None,
) -> Sequence[User]:
    """Keyset pagination on (created_at, id): stable under inserts, no OFFSET scans."""
    query = select(User).order_by(User.created_at, User.id).limit(limit)
    if after is not None:
        created_at, user_id = after
        query = query.where(
            or_(User.created_at > created_at, (User.created_at == created_at) & (User.id > user_id))
        )
    if is_active is not None:
        query = query.where(User.is_active.is_(is_active))
    if role is not None:
        query = query.where(User.role == role)
    if q:
        pattern = f"%{_escape_like(q.lower())}%"
        query = query.where(
            or_(
                User.email.like(pattern, escape="\\"),
                func.lower(User.full_name).like(pattern, escape="\\"),
            )
        )
    return (await db.execute(query)).scalars().all()


# --- sessions -------------------------------------------------------------------------------------


async def get_session(db: AsyncSession, session_id: uuid.UUID) -> UserSession | None:
    return await db.get(UserSession, session_id)


async def get_user_and_session(
    db: AsyncSession, user_id: uuid.UUID, session_id: uuid.UUID
) -> tuple[User, UserSession] | None:
    """The user and one of its sessions in one statement (what every cache miss needs)."""
    result = await db.execute(
        select(User, UserSession)
        .join(UserSession, UserSession.user_id == User.id)
        .where(User.id == user_id, UserSession.id == session_id)
    )
    row = result.one_or_none()
    return (row[0], row[1]) if row is not None else None


async def list_active_sessions(
    db: AsyncSession, user_id: uuid.UUID, now: datetime
) -> Sequence[UserSession]:
    query = (
        select(UserSession)
        .where(
            UserSession.user_id == user_id,
            UserSession.revoked_at.is_(None),
            UserSession.expires_at > now,
        )
        .order_by(UserSession.created_at.desc())
    )
    return (await db.execute(query)).scalars().all()


async def sign_in_history(
    db: AsyncSession, user_id: uuid.UUID, network: str, since: datetime
) -> tuple[bool, bool]:
    """(has the user ever signed in, did the password open a session from ``network`` since
    ``since`` that no security event has ended).

    Only a password sign-in counts — a refresh proves a token, not the password — and a session
    ended as stolen, revoked by the user or by a password change vouches for nothing.
    """
    vouching = UserSession.revoked_reason.is_(None) | (UserSession.revoked_reason == "logout")
    from_here = (
        (UserSession.sign_in_network == network) & (UserSession.created_at >= since) & vouching
    )
    query = select(
        select(UserSession.id).where(UserSession.user_id == user_id).exists(),
        select(UserSession.id).where(UserSession.user_id == user_id, from_here).exists(),
    )
    ever, recently = (await db.execute(query)).one()
    return bool(ever), bool(recently)


async def revoke_sessions(
    db: AsyncSession,
    user_id: uuid.UUID,
    now: datetime,
    reason: str,
    *,
    except_session: uuid.UUID | None = None,
) -> list[uuid.UUID]:
    """Revoke every live session of a user (but one, optionally); return the revoked ids."""
    query = (
        update(UserSession)
        .where(UserSession.user_id == user_id, UserSession.revoked_at.is_(None))
        .values(revoked_at=now, revoked_reason=reason)
        .returning(UserSession.id)
    )
    if except_session is not None:
        query = query.where(UserSession.id != except_session)
    result = await db.execute(query, execution_options={"synchronize_session": False})
    return list(result.scalars().all())


async def get_refresh_token(db: AsyncSession, token_hash: str) -> RefreshToken | None:
    return await db.get(RefreshToken, token_hash, with_for_update=True)


# --- one-time tokens ------------------------------------------------------------------------------


async def get_one_time_token(
    db: AsyncSession, token_hash: str, purpose: str
) -> OneTimeToken | None:
    query = (
        select(OneTimeToken)
        .where(OneTimeToken.token_hash == token_hash, OneTimeToken.purpose == purpose)
        .with_for_update()
    )
    return (await db.execute(query)).scalar_one_or_none()


async def email_taken(
    db: AsyncSession, email: str, now: datetime, *, by_other_than: uuid.UUID | None = None
) -> bool:
    """Whether ``email`` is an account's address — or was one until lately: an address an
    account moved away from stays reserved for it while its undo link lives, so nobody can
    register it and leave the owner's undo with nowhere to go."""
    reserved = select(OneTimeToken.token_hash).where(
        OneTimeToken.purpose == "email_undo",
        OneTimeToken.email == email,
        OneTimeToken.used_at.is_(None),
        OneTimeToken.expires_at > now,
    )
    if by_other_than is not None:
        reserved = reserved.where(OneTimeToken.user_id != by_other_than)
    query = select(select(User.id).where(User.email == email).exists() | reserved.exists())
    return bool((await db.execute(query)).scalar())


async def spend_one_time_tokens(
    db: AsyncSession,
    user_id: uuid.UUID,
    purpose: str,
    now: datetime,
    *,
    issued_since: datetime | None = None,
) -> None:
    """Mark every outstanding token of this purpose used (or only those issued since a time):
    only the newest link should ever work, and once one is used none of the others may be."""
    query = (
        update(OneTimeToken)
        .where(
            OneTimeToken.user_id == user_id,
            OneTimeToken.purpose == purpose,
            OneTimeToken.used_at.is_(None),
        )
        .values(used_at=now)
    )
    if issued_since is not None:
        query = query.where(OneTimeToken.created_at >= issued_since)
    await db.execute(query, execution_options={"synchronize_session": False})
