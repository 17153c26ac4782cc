"""Domain functions for user accounts: create, change, delete, list.

Each function is one unit of work: it validates, changes rows, records the matching events in the
same transaction, commits, and only then reports success. Cache entries are dropped before the
commit (so the relay cannot publish the event while a stale entry is still served) and again after
it (so a read racing the commit cannot leave the old value behind).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from src.auth.context import Principal, Security
from src.auth.passwords import PasswordPolicyError, check_password_policy
from src.auth.secrets import hash_token, new_token
from src.config.settings import Settings, SettingsError
from src.db.models import OneTimeToken, User
from src.db.types import utcnow
from src.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    PreconditionFailed,
)
from src.events.outbox import EventType, record_event, record_notification
from src.users import repository
from src.users.emails import canonical_email, confusable_reason
from src.users.schemas import UserPublic

logger = logging.getLogger(__name__)

EMAIL_VERIFICATION = "email_verification"
PASSWORD_RESET = "password_reset"


def snapshot(user: User) -> dict[str, Any]:
    """The user as events and the cache carry it: public fields only, never the hash."""
    return UserPublic.model_validate(user).model_dump(mode="json")


def enforce_password_policy(password: str, email: str) -> None:
    try:
        check_password_policy(password, email)
    except PasswordPolicyError as exc:
        raise InvalidInput(
            str(exc), errors=[{"loc": ["body", "password"], "msg": str(exc)}]
        ) from None


async def commit_change(
    db: AsyncSession,
    sec: Security,
    user_ids: Sequence[uuid.UUID] = (),
    session_ids: Sequence[uuid.UUID] = (),
) -> None:
    """Flush, drop cache entries, commit, drop them again (see the module docstring)."""
    await db.flush()
    await sec.cache.invalidate(user_ids, session_ids)
    await db.commit()
    await sec.cache.invalidate(user_ids, session_ids)


EMAIL_CHANGE = "email_change"
EMAIL_UNDO = "email_undo"


def _lifetime(settings: Settings, purpose: str) -> timedelta:
    if purpose == PASSWORD_RESET:
        return timedelta(minutes=settings.PASSWORD_RESET_TOKEN_EXPIRE_MINUTES)
    if purpose == EMAIL_CHANGE:
        return timedelta(hours=settings.EMAIL_CHANGE_TOKEN_EXPIRE_HOURS)
    if purpose == EMAIL_UNDO:
        return timedelta(hours=settings.EMAIL_CHANGE_UNDO_EXPIRE_HOURS)
    return timedelta(hours=settings.EMAIL_VERIFICATION_TOKEN_EXPIRE_HOURS)


def issue_one_time_token(
    db: AsyncSession, sec: Security, user: User, purpose: str, email: str | None = None
) -> tuple[str, OneTimeToken]:
    """A fresh single-use token; only its hash is stored. ``email``: the address it is about."""
    token = new_token()
    now = utcnow()
    row = OneTimeToken(
        token_hash=hash_token(token),
        user_id=user.id,
        purpose=purpose,
        created_at=now,
        expires_at=now + _lifetime(sec.settings, purpose),
        email=email,
    )
    db.add(row)
    return token, row


def link(settings: Settings, path: str, token: str) -> str:
    """A link for a mail, built from configuration, never from the request's Host header."""
    return f"{settings.PUBLIC_BASE_URL.rstrip('/')}/{path}?token={token}"


async def send_one_time_link(
    db: AsyncSession,
    sec: Security,
    user: User,
    event_type: EventType,
    purpose: str,
    path: str,
    *,
    to: str | None = None,
    about: str | None = None,
    extra: dict[str, Any] | None = None,
    replace_earlier: bool = True,
) -> None:
    """Issue a token for ``purpose`` and record the notification that mails its link to ``to``
    (the account's address by default). Earlier links of that purpose stop working, unless
    ``replace_earlier`` is false."""
    if replace_earlier:
        await repository.spend_one_time_tokens(db, user.id, purpose, utcnow())
    token, row = issue_one_time_token(db, sec, user, purpose, email=about)
    record_notification(
        db,
        sec.settings,
        sec.sealer,
        event_type,
        user.id,
        {
            "user_id": user.id,
            # The recipient. No name: anyone can register with anyone's address, so a name is
            # attacker-chosen text as far as the mail is concerned.
            "email": to or user.email,
            **(extra or {}),
            "expires_at": row.expires_at,
        },
        secret={"token": token, "url": link(sec.settings, path, token)},
        secret_expires_at=row.expires_at,
    )


async def record_verification_request(db: AsyncSession, sec: Security, user: User) -> None:
    """Issue a verification link for the user's current address; earlier links stop working."""
    await send_one_time_link(
        db, sec, user, EventType.VERIFICATION_REQUESTED, EMAIL_VERIFICATION, "verify-email"
    )


def ensure_address_allowed(settings: Settings, email: str) -> None:
    """Refuse look-alike addresses for new accounts and changed addresses, when so configured."""
    if not settings.EMAIL_REFUSE_CONFUSABLE:
        return
    reason = confusable_reason(email)
    if reason is not None:
        raise InvalidInput(
            f"This email address is not accepted: {reason}.",
            errors=[{"loc": ["body", "email"], "msg": f"not accepted: {reason}"}],
        )


async def create_user(
    db: AsyncSession,
    sec: Security,
    *,
    email: str,
    password: str,
    full_name: str | None = None,
    role: str = "user",
    is_active: bool = True,
    email_verified: bool = False,
    actor_id: uuid.UUID | None = None,
) -> User:
    ensure_address_allowed(sec.settings, email)
    enforce_password_policy(password, email)
    if await repository.email_taken(db, email, utcnow()):
        raise Conflict("An account with this email already exists.")
    now = utcnow()
    user = User(
        id=uuid.uuid4(),
        email=email,
        full_name=full_name,
        password_hash=await sec.hasher.hash(password),
        role=role,
        is_active=is_active,
        email_verified=email_verified,
        created_at=now,
        updated_at=now,
    )
    db.add(user)
    try:
        await db.flush()
    except IntegrityError:
        # Two registrations of one address raced; the database's unique index decided.
        await db.rollback()
        raise Conflict("An account with this email already exists.") from None
    record_event(
        db, sec.settings, EventType.REGISTERED, user.id, {**snapshot(user), "actor_id": actor_id}
    )
    if not email_verified:
        await record_verification_request(db, sec, user)
    await db.commit()
    logger.info("user created: user=%s role=%s actor=%s", user.id, role, actor_id or user.id)
    return user


async def get_user(db: AsyncSession, user_id: uuid.UUID) -> User:
    user = await repository.get_user(db, user_id)
    if user is None:
        raise NotFound("No such user.")
    return user


async def update_user(
    db: AsyncSession,
    sec: Security,
    user_id: uuid.UUID,
    changes: dict[str, Any],
    *,
    actor: Principal,
    expected_version: int | None = None,
) -> User:
    """Apply ``changes`` (already limited to what the caller may change) to a user."""
    user = await get_user(db, user_id)
    if expected_version is not None and user.version != expected_version:
        raise PreconditionFailed(
            f"The user has changed (version {user.version}); fetch it again and retry."
        )
    changes = {k: v for k, v in changes.items() if getattr(user, k) != v}
    if not changes:
        return user
    if "email" in changes:
        if actor.id == user.id:
            # A stolen access token must not be enough to move the account to another address.
            raise InvalidInput(
                "Change your own email with POST /api/v1/users/me/email: it needs your current "
                "password and takes effect once the new address confirms it.",
                errors=[{"loc": ["body", "email"], "msg": "use POST /api/v1/users/me/email"}],
            )
        ensure_address_allowed(sec.settings, changes["email"])
        if await repository.email_taken(db, changes["email"], utcnow()):
            raise Conflict("An account with this email already exists.")
        changes.setdefault("email_verified", False)
    demoted = changes.get("role", "admin") != "admin" or changes.get("is_active", True) is False
    if user.role == "admin" and user.is_active and demoted:
        await ensure_not_last_admin(db)

    before = snapshot(user)
    for field, value in changes.items():
        setattr(user, field, value)
    user.updated_at = utcnow()
    try:
        await db.flush()
    except StaleDataError:
        await db.rollback()
        if expected_version is None:
            raise Conflict("The user was changed concurrently; fetch it again.") from None
        raise PreconditionFailed("The user was changed concurrently; fetch it again.") from None
    except IntegrityError:
        await db.rollback()
        raise Conflict("An account with this email already exists.") from None

    revoked: list[uuid.UUID] = []
    after = snapshot(user)
    meta = {"actor_id": actor.id, "changes": sorted(changes)}
    if {"email", "full_name"} & changes.keys():
        record_event(db, sec.settings, EventType.UPDATED, user.id, {**after, **meta})
        if "email" in changes and not user.email_verified:
            await record_verification_request(db, sec, user)
    if "role" in changes:
        record_event(
            db,
            sec.settings,
            EventType.ROLE_CHANGED,
            user.id,
            {**after, **meta, "previous_role": before["role"]},
        )
    if changes.get("email_verified") is True:
        record_event(db, sec.settings, EventType.EMAIL_VERIFIED, user.id, {**after, **meta})
    if "is_active" in changes:
        if user.is_active:
            record_event(db, sec.settings, EventType.ACTIVATED, user.id, {**after, **meta})
        else:
            # A disabled account must not keep working through tokens it already holds.
            revoked = await repository.revoke_sessions(db, user.id, utcnow(), "deactivated")
            record_event(db, sec.settings, EventType.DEACTIVATED, user.id, {**after, **meta})
    await commit_change(db, sec, [user.id], revoked)
    logger.info("user updated: user=%s fields=%s actor=%s", user.id, sorted(changes), actor.id)
    return user


async def ensure_not_last_admin(db: AsyncSession) -> None:
    if await repository.lock_active_admins(db) <= 1:
        raise Conflict("This is the last active admin; promote another admin first.")


async def set_password(
    db: AsyncSession,
    sec: Security,
    user: User,
    password: str,
    *,
    reason: str,
    keep_session: uuid.UUID | None = None,
) -> None:
    user.password_hash = await sec.hasher.hash(password)
    user.updated_at = utcnow()
    revoked = await repository.revoke_sessions(
        db, user.id, utcnow(), f"password_{reason}", except_session=keep_session
    )
    record_event(
        db,
        sec.settings,
        EventType.PASSWORD_CHANGED,
        user.id,
        {"id": user.id, "reason": reason, "sessions_revoked": len(revoked)},
    )
    await commit_change(db, sec, [user.id], revoked)
    logger.info("password %s: user=%s sessions_revoked=%d", reason, user.id, len(revoked))


async def delete_user(
    db: AsyncSession, sec: Security, user_id: uuid.UUID, actor: Principal
) -> None:
    user = await get_user(db, user_id)
    if user.role == "admin" and user.is_active:
        await ensure_not_last_admin(db)
    sessions = await repository.revoke_sessions(db, user.id, utcnow(), "deleted")
    record_event(
        db,
        sec.settings,
        EventType.DELETED,
        user.id,
        {"id": user.id, "actor_id": actor.id, "deleted_at": utcnow()},
    )
    await db.delete(user)
    await commit_change(db, sec, [user.id], sessions)
    logger.info("user deleted: user=%s actor=%s", user_id, actor.id)


async def list_users(
    db: AsyncSession,
    *,
    limit: int,
    cursor: str | None,
    is_active: bool | None,
    role: str | None,
    q: str | None,
) -> tuple[Sequence[User], str | None]:
    try:
        after = repository.decode_cursor(cursor) if cursor else None
    except ValueError:
        raise InvalidInput("The cursor is not valid; start again without one.") from None
    users = await repository.list_users(
        db, limit=limit + 1, after=after, is_active=is_active, role=role, q=q
    )
    page = users[:limit]
    next_cursor = repository.encode_cursor(page[-1]) if len(users) > limit else None
    return page, next_cursor


async def ensure_first_admin(db: AsyncSession, sec: Security) -> None:
    """Create FIRST_ADMIN_EMAIL as an admin when no such account exists (idempotent)."""
    settings = sec.settings
    if not settings.FIRST_ADMIN_EMAIL or settings.FIRST_ADMIN_PASSWORD is None:
        return
    email = canonical_email(settings.FIRST_ADMIN_EMAIL)
    if email is None:
        raise SettingsError("Invalid configuration: FIRST_ADMIN_EMAIL: not a valid email address")
    if await repository.get_user_by_email(db, email) is not None:
        return
    try:
        await create_user(
            db,
            sec,
            email=email,
            password=settings.FIRST_ADMIN_PASSWORD.get_secret_value(),
            role="admin",
            email_verified=True,
        )
    except Conflict:
        return  # another instance created it first
    except InvalidInput as exc:  # a weak password, a look-alike address
        raise SettingsError(f"Invalid configuration: FIRST_ADMIN_*: {exc.detail}") from None
