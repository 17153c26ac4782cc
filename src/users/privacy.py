"""GDPR: what is stored about a person (access, article 15) and erasing it (article 17).

``export_user`` gathers every row about a user into one JSON-ready document, leaving out what
would only help an attacker: password and token hashes, TOTP secrets, passkey public keys, sealed
links. ``erase_user`` deletes the account through the usual path (``delete_user``: sessions end,
the cache forgets them, ``user.deleted`` is recorded), replaces the personal data left in the rows
that outlive the account (outbox, audit trail, mail deliveries; the rows stay, so counts and order
survive), and records ``user.erased`` so the other services erase their copies too. It is one
transaction: either all of it happens or none, so a failed erasure can simply be run again.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_jsonable_python
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from src.db.models import (
    AuditEvent,
    MailDelivery,
    MfaFactor,
    OAuthConsent,
    OneTimeToken,
    OutboxEvent,
    RecoveryCode,
    User,
    UserSession,
)
from src.db.types import utcnow
from src.errors import NotFound
from src.events.erasure import ERASED_TEXT, personal_values, scrub, searched
from src.events.outbox import EventType, record_event
from src.users import repository
from src.users.emails import canonical_email
from src.users.service import AccountDeps, delete_user, snapshot


class NoSuchUser(NotFound):
    """No account has that address (never had one, or it was erased already)."""

    def __init__(self) -> None:
        super().__init__("No such user.")


async def find_user(db: AsyncSession, email: str, *, lock: bool = False) -> User:
    """The account of ``email``; with ``lock``, its row locked until the transaction ends."""
    address = canonical_email(email)
    if address is None:
        raise NoSuchUser()
    if lock:
        user = await db.scalar(select(User).where(User.email == address).with_for_update())
    else:
        user = await repository.get_user_by_email(db, address)
    if user is None:
        raise NoSuchUser()
    return user


# --- access ---------------------------------------------------------------------------------------


async def export_user(db: AsyncSession, email: str) -> dict[str, Any]:
    """Everything stored about the account of ``email``, as a JSON-ready document."""
    user = await find_user(db, email)
    uid = user.id
    sessions = await db.scalars(
        select(UserSession).where(UserSession.user_id == uid).order_by(UserSession.created_at)
    )
    factors = list(
        await db.scalars(
            select(MfaFactor).where(MfaFactor.user_id == uid).order_by(MfaFactor.created_at)
        )
    )
    codes = await db.scalars(
        select(RecoveryCode).where(RecoveryCode.user_id == uid).order_by(RecoveryCode.created_at)
    )
    consents = await db.scalars(
        select(OAuthConsent).where(OAuthConsent.user_id == uid).order_by(OAuthConsent.granted_at)
    )
    links = await db.scalars(
        select(OneTimeToken).where(OneTimeToken.user_id == uid).order_by(OneTimeToken.created_at)
    )
    document: dict[str, Any] = {
        "exported_at": utcnow(),
        "user": snapshot(user),
        "sessions": [_session(row) for row in sessions],
        "second_factors": [_factor(row) for row in factors if row.kind != "webauthn"],
        "passkeys": [_passkey(row) for row in factors if row.kind == "webauthn"],
        "recovery_codes": [{"created_at": c.created_at, "used_at": c.used_at} for c in codes],
        "consents": [
            {"client_id": c.client_id, "scope": c.scope, "granted_at": c.granted_at}
            for c in consents
        ],
        "one_time_links": [
            {
                "purpose": link.purpose,
                "email": link.email,
                "created_at": link.created_at,
                "expires_at": link.expires_at,
                "used_at": link.used_at,
            }
            for link in links
        ],
        # OAuth clients belong to the service, not to a user: there is nothing to list.
        "oauth_clients": [],
        "audit_events": [_audit(row) for row in await _audit_rows(db, uid)],
        "outbox_events": [_outbox(row) for row in await _outbox_rows(db, uid)],
        "mail_deliveries": [_delivery(row) for row in await _delivery_rows(db, uid)],
    }
    exported: dict[str, Any] = to_jsonable_python(document)
    return exported


def _session(row: UserSession) -> dict[str, Any]:
    # Never the cookie hash, nor the refresh token hashes (another table, left out on purpose).
    return {
        "id": row.id,
        "kind": row.kind,
        "client_id": row.client_id,
        "scope": row.scope,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
        "revoked_reason": row.revoked_reason,
        "ip_address": row.ip_address,
        "user_agent": row.user_agent,
        "sign_in_network": row.sign_in_network,
        "auth_time": row.auth_time,
        "amr": row.amr,
    }


def _factor(row: MfaFactor) -> dict[str, Any]:
    # Never the (sealed) TOTP secret nor the last accepted time step.
    return {
        "id": row.id,
        "kind": row.kind,
        "name": row.name,
        "created_at": row.created_at,
        "confirmed_at": row.confirmed_at,
        "last_used_at": row.last_used_at,
    }


def _passkey(row: MfaFactor) -> dict[str, Any]:
    # The transports are hints the browser gave; the public key and the credential id are key
    # material the person has no use for and that would only help to track the authenticator.
    return {**_factor(row), "transports": row.transports or []}


async def _audit_rows(db: AsyncSession, uid: uuid.UUID) -> list[AuditEvent]:
    query = select(AuditEvent).where(AuditEvent.user_id == uid).order_by(AuditEvent.position)
    return list(await db.scalars(query))


async def _outbox_rows(db: AsyncSession, uid: uuid.UUID) -> list[OutboxEvent]:
    query = select(OutboxEvent).where(OutboxEvent.aggregate_id == uid)
    return list(await db.scalars(query.order_by(OutboxEvent.position)))


async def _delivery_rows(db: AsyncSession, uid: uuid.UUID) -> list[MailDelivery]:
    query = select(MailDelivery).where(MailDelivery.user_id == uid)
    return list(await db.scalars(query.order_by(MailDelivery.created_at)))


def _audit(row: AuditEvent) -> dict[str, Any]:
    return {"event_id": row.event_id, "type": row.type, "time": row.time, "data": row.data}


def _outbox(row: OutboxEvent) -> dict[str, Any]:
    # The payload never holds a secret (record_event refuses them); the sealed link is left out.
    return {
        "event_id": row.id,
        "type": row.type,
        "topic": row.topic,
        "created_at": row.created_at,
        "published_at": row.published_at,
        "data": row.payload,
    }


def _delivery(row: MailDelivery) -> dict[str, Any]:
    return {
        "event_id": row.event_id,
        "type": row.type,
        "status": row.status,
        "attempts": row.attempts,
        "created_at": row.created_at,
        "finished_at": row.finished_at,
        "last_error": row.last_error,
        "data": row.data,
    }


# --- erasure --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Erasure:
    """What an erasure did: the account's id and how many kept rows it scrubbed."""

    user_id: uuid.UUID
    outbox_rows: int
    audit_rows: int
    mail_deliveries: int


async def erase_user(engine: AsyncEngine, deps: AccountDeps, email: str) -> Erasure:
    """Delete the account of ``email`` and scrub the personal data of the rows about it, in one
    transaction; ``NoSuchUser`` if there is none (also when it was erased already).

    ``delete_user`` commits its own unit of work. Bound to a connection whose transaction is ours
    (``join_transaction_mode="create_savepoint"``), its commit only releases a savepoint, so the
    deletion, the scrubbing and ``user.erased`` commit together: a failure half-way leaves the
    account as it was, and the erasure can be run again.
    """
    async with engine.connect() as connection, connection.begin():
        db = AsyncSession(
            bind=connection,
            join_transaction_mode="create_savepoint",
            expire_on_commit=False,
            autoflush=False,
        )
        try:
            # Locked: a second erasure of the same account at the same time waits here, then
            # finds no account, instead of deleting nothing and recording the events again.
            user = await find_user(db, email, lock=True)
            uid = user.id
            sessions = list(
                await db.scalars(select(UserSession.id).where(UserSession.user_id == uid))
            )
            personal = await _personal_text(db, user)
            await delete_user(db, deps, uid, actor_id=None)
            erasure = Erasure(
                uid,
                outbox_rows=_scrub_rows(await _outbox_rows(db, uid), "payload", personal),
                audit_rows=_scrub_rows(await _audit_rows(db, uid), "data", personal),
                mail_deliveries=_scrub_deliveries(await _delivery_rows(db, uid), personal),
            )
            for row in await _outbox_rows(db, uid):
                # A link that was never published goes too: its mail names nobody now.
                row.sealed, row.sealed_until = None, None
            record_event(
                db, deps.settings, EventType.ERASED, uid, {"id": uid, "erased_at": utcnow()}
            )
            await db.commit()
        finally:
            await db.close()
    # Until the commit above, a read could have put the account back in the cache.
    await deps.cache.invalidate([uid], sessions)
    return erasure


async def _personal_text(db: AsyncSession, user: User) -> list[str]:
    """Every address, name, IP address and user agent the rows about ``user`` may repeat."""
    found: set[str] = {user.email}
    if user.full_name:
        found.add(user.full_name)
    addresses = await db.scalars(select(OneTimeToken.email).where(OneTimeToken.user_id == user.id))
    found.update(address for address in addresses if address)
    for ip, agent in (
        await db.execute(
            select(UserSession.ip_address, UserSession.user_agent).where(
                UserSession.user_id == user.id
            )
        )
    ).all():
        found.update(value for value in (ip, agent) if value)
    documents: list[Any] = [row.payload for row in await _outbox_rows(db, user.id)]
    documents += [row.data for row in await _audit_rows(db, user.id)]
    documents += [row.data for row in await _delivery_rows(db, user.id)]
    for document in documents:
        found.update(personal_values(document))
    return searched(found)


def _scrub_rows(
    rows: list[OutboxEvent] | list[AuditEvent], column: str, personal: list[str]
) -> int:
    for row in rows:
        # A new object, so the JSON column is seen as changed.
        setattr(row, column, scrub(getattr(row, column), personal))
    return len(rows)


# Why a mail waiting for its next attempt is given up (``skipped``, as the courier says).
ERASED_RECIPIENT = "not sent: the recipient was erased"


def _scrub_deliveries(rows: list[MailDelivery], personal: list[str]) -> int:
    now = utcnow()
    for row in rows:
        if row.data is not None:
            row.data = scrub(row.data, personal)
        if row.last_error:
            row.last_error = _redact(row.last_error, personal)
        row.sealed = None
        if row.status == "pending":
            # Its address is gone: the courier must not try it again.
            row.status, row.next_attempt_at, row.finished_at = "skipped", None, now
            row.last_error = ERASED_RECIPIENT
    return len(rows)


def _redact(text: str, personal: list[str]) -> str:
    """Free text (an SMTP server's answer) with each personal item cut out, the rest kept."""
    for item in personal:
        text = re.sub(re.escape(item), ERASED_TEXT, text, flags=re.IGNORECASE)
    return text
