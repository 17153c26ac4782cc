"""Domain functions for user accounts: add, change, delete, list; and the links mailed to them.

Each function is one unit of work: it validates, changes rows, records the matching events in the
same transaction, commits, and only then reports success. Cache entries are dropped before the
commit (so the relay cannot publish the event while a stale entry is still served) and again after
it (so a read racing the commit cannot leave the old value behind).

Passwords are not this package's business: ``src.auth`` hashes them and hands over the hash.
What these functions need from the running service comes as an ``AccountDeps`` (settings, the
user cache, the sealer), so accounts never depend on authentication.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from src.config.settings import Settings
from src.db.models import OneTimeToken, User
from src.db.types import utcnow
from src.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    PreconditionFailed,
)
from src.events.outbox import EventType, record_event, record_notification
from src.security.sealing import Sealer
from src.security.tokens import hash_token, new_token
from src.users import repository
from src.users.cache import UserCache
from src.users.emails import confusable_reason
from src.users.schemas import UserCreate, UserPublic, UserUpdate, UserUpdateMe

logger = logging.getLogger(__name__)

EMAIL_VERIFICATION = "email_verification"
PASSWORD_RESET = "password_reset"
EMAIL_CHANGE = "email_change"
EMAIL_UNDO = "email_undo"


class AccountDeps(Protocol):
    """What account changes need from the running service (``src.auth.context.Security`` is one)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def cache(self) -> UserCache: ...

    @property
    def sealer(self) -> Sealer: ...


def snapshot(user: User) -> dict[str, Any]:
    """The user as events and the cache carry it: public fields only, never the hash."""
    return UserPublic.model_validate(user).model_dump(mode="json")


async def commit_change(
    db: AsyncSession,
    sec: AccountDeps,
    user_ids: Sequence[uuid.UUID] = (),
    session_ids: Sequence[uuid.UUID] = (),
) -> None:
    """Flush, drop cache entries, commit, drop them again (see the module docstring)."""
    await db.flush()
    await sec.cache.invalidate(user_ids, session_ids)
    await db.commit()
    await sec.cache.invalidate(user_ids, session_ids)


def _lifetime(settings: Settings, purpose: str) -> timedelta:
    if purpose == PASSWORD_RESET:
        return timedelta(minutes=settings.PASSWORD_RESET_TOKEN_EXPIRE_MINUTES)
    if purpose == EMAIL_CHANGE:
        return timedelta(hours=settings.EMAIL_CHANGE_TOKEN_EXPIRE_HOURS)
    if purpose == EMAIL_UNDO:
        return timedelta(hours=settings.EMAIL_CHANGE_UNDO_EXPIRE_HOURS)
    return timedelta(hours=settings.EMAIL_VERIFICATION_TOKEN_EXPIRE_HOURS)


def issue_one_time_token(
    db: AsyncSession, sec: AccountDeps, user: User, purpose: str, email: str | None = None
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
    sec: AccountDeps,
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


async def record_verification_request(db: AsyncSession, sec: AccountDeps, user: User) -> None:
    """Issue a verification link for the user's current address; earlier links stop working."""
    await send_one_time_link(
        db, sec, user, EventType.VERIFICATION_REQUESTED, EMAIL_VERIFICATION, "account/verify-email"
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


async def ensure_email_free(db: AsyncSession, settings: Settings, email: str) -> None:
    """The cheap checks before an account is made (and its password hashed): a look-alike
    address (when refused), an address taken or reserved."""
    ensure_address_allowed(settings, email)
    if await repository.email_taken(db, email, utcnow()):
        raise Conflict("An account with this email already exists.")


async def add_user(
    db: AsyncSession,
    sec: AccountDeps,
    body: UserCreate,
    password_hash: str,
    *,
    actor_id: uuid.UUID | None = None,
) -> User:
    """Store a new account (``body`` as validated, its password already hashed) and announce it."""
    now = utcnow()
    fields = body.model_dump(exclude={"password"})
    user = User(
        id=uuid.uuid4(), password_hash=password_hash, created_at=now, updated_at=now, **fields
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
    if not user.email_verified:
        await record_verification_request(db, sec, user)
    await db.commit()
    logger.info("user created: user=%s role=%s actor=%s", user.id, user.role, actor_id or user.id)
    return user


async def get_user(db: AsyncSession, user_id: uuid.UUID) -> User:
    user = await repository.get_user(db, user_id)
    if user is None:
        raise NotFound("No such user.")
    return user


# Which event a change records, per writable field and new value; a change of several fields
# records each of their events once, in this order. tests/test_users.py holds every writable
# field of UserUpdate to this table, so a new field cannot change silently.
EVENT_ORDER = (
    EventType.UPDATED,
    EventType.ROLE_CHANGED,
    EventType.EMAIL_VERIFIED,
    EventType.ACTIVATED,
    EventType.DEACTIVATED,
)


def event_for(field: str, value: Any) -> EventType:
    if field == "role":
        return EventType.ROLE_CHANGED
    if field == "email_verified" and value is True:
        return EventType.EMAIL_VERIFIED
    if field == "is_active":
        return EventType.ACTIVATED if value else EventType.DEACTIVATED
    return EventType.UPDATED  # email, full_name, email_verified set back to false


async def update_user(
    db: AsyncSession,
    sec: AccountDeps,
    user_id: uuid.UUID,
    body: UserUpdate | UserUpdateMe,
    *,
    actor_id: uuid.UUID | None,
    expected_version: int | None = None,
) -> User:
    """Apply the fields sent in ``body`` (already limited to what the caller may change).

    ``actor_id`` None: an operator at the command line (``user-service create-admin``).
    """
    user = await get_user(db, user_id)
    if expected_version is not None and user.version != expected_version:
        raise PreconditionFailed(
            f"The user has changed (version {user.version}); fetch it again and retry."
        )
    sent = body.model_dump(exclude_unset=True)
    changes = {k: v for k, v in sent.items() if getattr(user, k) != v}
    if not changes:
        return user
    if "email" in changes:
        if actor_id == user.id:
            # A stolen access token must not be enough to move the account to another address.
            raise InvalidInput(
                "Change your own email with POST /api/v1/users/me/email: it needs your current "
                "password and takes effect once the new address confirms it.",
                errors=[{"loc": ["body", "email"], "msg": "use POST /api/v1/users/me/email"}],
            )
        await ensure_email_free(db, sec.settings, changes["email"])
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

    after = snapshot(user)
    meta = {"actor_id": actor_id, "changes": sorted(changes)}
    recorded = {event_for(field, value) for field, value in changes.items()}
    for event_type in (e for e in EVENT_ORDER if e in recorded):
        extra: dict[str, Any] = {}
        if event_type is EventType.ROLE_CHANGED:
            extra["previous_role"] = before["role"]
        if event_type is EventType.UPDATED and "email" in changes:
            extra["previous_email"] = before["email"]
        record_event(db, sec.settings, event_type, user.id, {**after, **meta, **extra})
    if "email" in changes and not user.email_verified:
        await record_verification_request(db, sec, user)
    revoked: list[uuid.UUID] = []
    if EventType.DEACTIVATED in recorded:
        # A disabled account must not keep working through tokens it already holds.
        revoked = await repository.revoke_sessions(db, user.id, utcnow(), "deactivated")
    await commit_change(db, sec, [user.id], revoked)
    logger.info("user updated: user=%s fields=%s actor=%s", user.id, sorted(changes), actor_id)
    return user


async def ensure_not_last_admin(db: AsyncSession) -> None:
    if await repository.lock_active_admins(db) <= 1:
        raise Conflict("This is the last active admin; promote another admin first.")


async def delete_user(
    db: AsyncSession, sec: AccountDeps, user_id: uuid.UUID, actor_id: uuid.UUID | None
) -> None:
    """``actor_id`` None: an operator at the command line (``user-service users erase``)."""
    user = await get_user(db, user_id)
    if user.role == "admin" and user.is_active:
        await ensure_not_last_admin(db)
    sessions = await repository.revoke_sessions(db, user.id, utcnow(), "deleted")
    record_event(
        db,
        sec.settings,
        EventType.DELETED,
        user.id,
        {"id": user.id, "actor_id": actor_id, "deleted_at": utcnow()},
    )
    await db.delete(user)
    try:
        await commit_change(db, sec, [user.id], sessions)
    except StaleDataError:
        # Deleted by another request meanwhile (it held the row): this one changed nothing.
        await db.rollback()
        raise NotFound("No such user.") from None
    logger.info("user deleted: user=%s actor=%s", user_id, actor_id)


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
