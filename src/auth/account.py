"""Changes that need a fresh proof of identity: the password, the email address, deleting the
account.

An access token proves a session, not a person: a stolen one must not be enough to take the
account over (change the address, then reset the password through it) or to destroy it. Each of
these asks for the current password again, checked under the login guard's limits. An email
change takes effect only once the new address confirms a link, and the old address is told, with
a link that undoes the change for ``EMAIL_CHANGE_UNDO_EXPIRE_HOURS`` (Keycloak's update-email
flow, plus the undo).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from src.auth.context import Principal, Security
from src.auth.passwords import enforce_password_policy, unusable_password
from src.auth.service import ClientInfo, create_account, set_password, verify_password
from src.config.logging import audit_line
from src.config.settings import SettingsError
from src.db.models import OneTimeToken, User
from src.db.types import utcnow
from src.errors import Conflict, DomainError, InvalidInput, TooManyRequests
from src.events.outbox import EventType, record_event
from src.security.tokens import hash_token
from src.users import repository
from src.users import service as user_service
from src.users.emails import canonical_email
from src.users.schemas import UserCreate
from src.users.service import (
    EMAIL_CHANGE,
    EMAIL_UNDO,
    EMAIL_VERIFICATION,
    PASSWORD_RESET,
    commit_change,
    ensure_address_allowed,
    send_one_time_link,
    snapshot,
)

logger = logging.getLogger(__name__)
audit = logging.getLogger("src.auth.audit")

_WRONG_PASSWORD = "The current password is not correct."
_BAD_TOKEN = "The token is invalid, expired or already used."


async def _reauthenticate(
    db: AsyncSession, sec: Security, principal: Principal, password: str, client: ClientInfo
) -> User:
    user = await user_service.get_user(db, principal.id)
    if not await verify_password(db, sec, user, password, client):
        raise DomainError(_WRONG_PASSWORD)
    return user


async def change_password(
    db: AsyncSession,
    sec: Security,
    principal: Principal,
    current: str,
    new: str,
    client: ClientInfo,
) -> None:
    """Needs the current password; ends every other session of the user."""
    user = await _reauthenticate(db, sec, principal, current, client)
    enforce_password_policy(new, user.email)
    await set_password(db, sec, user, new, keep_session=principal.session_id, reason="changed")


async def request_email_change(
    db: AsyncSession,
    sec: Security,
    principal: Principal,
    new_email: str,
    current_password: str,
    client: ClientInfo,
) -> None:
    """Mail a confirmation link to the new address; nothing changes until it is followed."""
    if new_email == principal.user.email:
        raise InvalidInput(
            "That is already the account's address.",
            errors=[{"loc": ["body", "new_email"], "msg": "unchanged"}],
        )
    ensure_address_allowed(sec.settings, new_email)
    user = await _reauthenticate(db, sec, principal, current_password, client)
    # Throttled before the answer can say "taken": otherwise this would be a fast, unthrottled
    # way to ask which addresses have accounts (registration is throttled the same way).
    wait = await sec.throttle.hit("email_change", client.ip, new_email)
    if wait is not None:
        raise TooManyRequests(wait)
    if await repository.email_taken(db, new_email, utcnow(), by_other_than=user.id):
        raise Conflict("An account with this email already exists.")
    await send_one_time_link(
        db,
        sec,
        user,
        EventType.EMAIL_CHANGE_REQUESTED,
        EMAIL_CHANGE,
        "account/confirm-email-change",
        to=new_email,
        about=new_email,
    )
    await db.commit()
    audit_line(audit, "email change requested", user=user.id, ip=client.ip)


async def _spend(db: AsyncSession, token: str, purpose: str) -> tuple[OneTimeToken, User]:
    """The token's row and user; the token and every other link of its purpose are spent —
    except, for undo links, those issued before it (see ``undo_email_change``)."""
    row = await repository.get_one_time_token(db, hash_token(token), purpose)
    now = utcnow()
    if row is None or row.used_at is not None or row.expires_at <= now or not row.email:
        raise DomainError(_BAD_TOKEN)
    user = await repository.get_user(db, row.user_id)
    if user is None or not user.is_active:
        raise DomainError(_BAD_TOKEN)
    since = row.created_at if purpose == EMAIL_UNDO else None
    await repository.spend_one_time_tokens(db, user.id, purpose, now, issued_since=since)
    return row, user


async def _move_to(
    db: AsyncSession,
    sec: Security,
    user: User,
    email: str,
    *,
    void: tuple[str, ...],
    **details: Any,
) -> str:
    """Give the user ``email``, verified (a link mailed there was just followed), void the links
    of the ``void`` purposes mailed before, and record the change; return the previous address."""
    previous, was_verified = user.email, user.email_verified
    for purpose in void:
        await repository.spend_one_time_tokens(db, user.id, purpose, utcnow())
    if previous == email:
        return previous
    if await repository.email_taken(db, email, utcnow(), by_other_than=user.id):
        raise Conflict("An account with this email already exists.")
    user.email, user.email_verified, user.updated_at = email, True, utcnow()
    try:
        await db.flush()
    except IntegrityError:
        await db.rollback()
        raise Conflict("An account with this email already exists.") from None
    meta = {"actor_id": user.id, "changes": ["email", "email_verified"], **details}
    record_event(
        db,
        sec.settings,
        EventType.UPDATED,
        user.id,
        {**snapshot(user), **meta, "previous_email": previous},
    )
    if not was_verified:
        record_event(db, sec.settings, EventType.EMAIL_VERIFIED, user.id, snapshot(user))
    return previous


async def confirm_email_change(db: AsyncSession, sec: Security, token: str) -> User:
    """The new address confirmed: switch to it, and offer the old address an undo link."""
    row, user = await _spend(db, token, EMAIL_CHANGE)
    new_email = str(row.email)
    # Links mailed to the old address must not keep working for the account.
    old_email = await _move_to(db, sec, user, new_email, void=(PASSWORD_RESET, EMAIL_VERIFICATION))
    await send_one_time_link(
        db,
        sec,
        user,
        EventType.EMAIL_CHANGE_NOTICE,
        EMAIL_UNDO,
        "account/undo-email-change",
        to=old_email,
        about=old_email,
        extra={"new_email": new_email},
        # Every address the account had keeps its own way back: a second change must not
        # void the first owner's undo link.
        replace_earlier=False,
    )
    await commit_change(db, sec, [user.id])
    audit_line(audit, "email changed", user=user.id)
    return user


async def undo_email_change(db: AsyncSession, sec: Security, token: str) -> None:
    """The old address says the change was not wanted: take the address back, end every session,
    make the password unusable and mail a reset link there (whoever made the change knew the
    password: it must not let them back in).

    Undo links issued before this one stay valid: after A -> B -> C, the link that went to B
    (perhaps an attacker's) can take the account back to B, but A's link still takes it to A.
    The oldest address always has the last word until its link expires.
    """
    row, user = await _spend(db, token, EMAIL_UNDO)
    # Whoever made the change knew the password: it stops working, and only the reset link
    # mailed below (to the restored address) lets anyone in again.
    user.password_hash = unusable_password()
    revoked = await repository.revoke_sessions(db, user.id, utcnow(), "email_change_undone")
    record_event(
        db,
        sec.settings,
        EventType.PASSWORD_CHANGED,
        user.id,
        {"id": user.id, "reason": "email_change_undone", "sessions_revoked": len(revoked)},
    )
    await _move_to(
        db,
        sec,
        user,
        str(row.email),
        void=(EMAIL_CHANGE, PASSWORD_RESET, EMAIL_VERIFICATION),
        sessions_revoked=len(revoked),
    )
    await send_one_time_link(
        db, sec, user, EventType.PASSWORD_RESET_REQUESTED, PASSWORD_RESET, "account/reset-password"
    )
    await commit_change(db, sec, [user.id], revoked)
    audit_line(
        audit,
        "email change undone",
        level=logging.WARNING,
        user=user.id,
        sessions_revoked=len(revoked),
    )


async def delete_own_account(
    db: AsyncSession,
    sec: Security,
    principal: Principal,
    current_password: str,
    client: ClientInfo,
) -> None:
    await _reauthenticate(db, sec, principal, current_password, client)
    await user_service.delete_user(db, sec, principal.id, principal.id)


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
    body = UserCreate(
        email=email,
        password=settings.FIRST_ADMIN_PASSWORD.get_secret_value(),
        role="admin",
        email_verified=True,
    )
    try:
        await create_account(db, sec, body)
    except Conflict:
        return  # another instance created it first
    except InvalidInput as exc:  # a weak password, a look-alike address
        raise SettingsError(f"Invalid configuration: FIRST_ADMIN_*: {exc.detail}") from None
