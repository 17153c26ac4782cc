"""Recording events: the one function every state change calls.

An event is an outbox row added to the caller's database session, so it commits (or rolls back)
with the change it describes. Nothing here talks to Kafka: a background relay publishes the rows.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic_core import to_jsonable_python
from sqlalchemy import event, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from src.config.settings import Settings
from src.db.models import OutboxEvent
from src.security.sealing import Sealer, UnsealError
from src.services.tracing import current_trace_context


class EventType(StrEnum):
    REGISTERED = "user.registered"
    UPDATED = "user.updated"
    EMAIL_VERIFIED = "user.email_verified"
    PASSWORD_CHANGED = "user.password_changed"
    ROLE_CHANGED = "user.role_changed"
    DEACTIVATED = "user.deactivated"
    ACTIVATED = "user.activated"
    DELETED = "user.deleted"
    # GDPR erasure (`user-service users erase`): after user.deleted; consumers erase what they
    # hold about the subject. Its data names no person: the id and the time only.
    ERASED = "user.erased"
    LOGGED_IN = "user.logged_in"
    LOGIN_FAILED = "user.login_failed"
    # Second factors (src.auth.mfa): authenticators and recovery codes; never a secret or a code.
    MFA_ENROLLED = "user.mfa_enrolled"
    MFA_REMOVED = "user.mfa_removed"
    MFA_FAILED = "user.mfa_failed"
    RECOVERY_CODES_REGENERATED = "user.recovery_codes_regenerated"
    RECOVERY_CODE_USED = "user.recovery_code_used"
    MFA_RESET = "user.mfa_reset"
    STEP_UP_FAILED = "user.step_up_failed"
    # An administrator ended one of the user's sessions (the admin API or console).
    SESSION_REVOKED = "user.session_revoked"
    # Notifications: what the courier mails (see NOTIFICATION_EVENTS).
    VERIFICATION_REQUESTED = "user.verification_requested"
    PASSWORD_RESET_REQUESTED = "user.password_reset_requested"
    EMAIL_CHANGE_REQUESTED = "user.email_change_requested"
    EMAIL_CHANGE_NOTICE = "user.email_change_notice"
    NEW_SIGN_IN = "user.new_sign_in"
    # OAuth clients (src.oauth.clients): the subject is the client's row id, not a user.
    CLIENT_CREATED = "client.created"
    CLIENT_UPDATED = "client.updated"
    CLIENT_DELETED = "client.deleted"
    CLIENT_SECRET_ROTATED = "client.secret_rotated"


# Messages for a person rather than facts for other services: they name the recipient
# (``data.email``) and some carry a one-time link, so they go to a topic of their own whose access
# can be restricted. The link travels sealed (``data.sealed``), never readable.
NOTIFICATION_EVENTS = frozenset(
    {
        EventType.VERIFICATION_REQUESTED,
        EventType.PASSWORD_RESET_REQUESTED,
        EventType.EMAIL_CHANGE_REQUESTED,
        EventType.EMAIL_CHANGE_NOTICE,
        EventType.NEW_SIGN_IN,
    }
)
_FORBIDDEN_KEYS = frozenset(
    {"password", "password_hash", "hashed_password", "refresh_token", "token", "url", "sealed"}
)


# Sessions carry the relay's wake-up signal in ``info`` (set on the sessionmaker at start-up).
OUTBOX_SIGNAL = "outbox_signal"
_DIRTY = "outbox_dirty"


@event.listens_for(Session, "after_commit")
def _wake_relay_after_commit(session: Session) -> None:
    """A commit that wrote events wakes the relay at once instead of at its next poll."""
    if session.info.pop(_DIRTY, False):
        signal = session.info.get(OUTBOX_SIGNAL)
        if isinstance(signal, asyncio.Event):
            signal.set()


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop(_DIRTY, None)


def topic_for(event_type: EventType, settings: Settings) -> str:
    if event_type in NOTIFICATION_EVENTS:
        return settings.KAFKA_NOTIFICATIONS_TOPIC
    return settings.KAFKA_USER_EVENTS_TOPIC


def record_event(
    db: AsyncSession,
    settings: Settings,
    event_type: EventType,
    user_id: uuid.UUID,
    data: dict[str, Any],
) -> OutboxEvent:
    """Add an event to the current transaction; it is published only if the transaction commits."""
    leaked = _FORBIDDEN_KEYS.intersection(data)
    if leaked:
        raise ValueError(f"event data must not carry secrets: {sorted(leaked)}")
    outbox_row = OutboxEvent(
        id=uuid.uuid4(),
        topic=topic_for(event_type, settings),
        type=str(event_type),
        aggregate_id=user_id,
        # JSON-safe now (UUIDs, datetimes as text), so the row is exactly what will be published.
        payload=to_jsonable_python(data),
        # The request's trace goes on with the event (its CloudEvent's traceparent).
        trace_context=current_trace_context() if settings.TRACING_ENABLED else None,
    )
    db.add(outbox_row)
    db.info[_DIRTY] = True
    return outbox_row


def record_notification(
    db: AsyncSession,
    settings: Settings,
    sealer: Sealer,
    event_type: EventType,
    user_id: uuid.UUID,
    data: dict[str, Any],
    *,
    secret: dict[str, str] | None = None,
    secret_expires_at: datetime | None = None,
) -> OutboxEvent:
    """Record a notification; ``secret`` (the one-time token and link) is stored sealed, bound to
    this event's id, and dropped once published, delivered or past ``secret_expires_at``."""
    if event_type not in NOTIFICATION_EVENTS:
        raise ValueError(f"{event_type} is not a notification")
    row = record_event(db, settings, event_type, user_id, data)
    if secret is not None:
        row.sealed = sealer.seal(json.dumps(secret).encode(), _associated_data(row.id))
        row.sealed_until = secret_expires_at
    return row


def open_secret(sealer: Sealer, event_id: uuid.UUID, sealed: str) -> dict[str, str]:
    """The secret of a notification (``UnsealError`` if it is not this event's)."""
    opened = json.loads(sealer.unseal(sealed, _associated_data(event_id)))
    if not isinstance(opened, dict):
        raise UnsealError("not a notification secret")
    return {str(key): str(value) for key, value in opened.items()}


def _associated_data(event_id: uuid.UUID) -> bytes:
    return f"ums-notification:{event_id}".encode()


async def purge_expired_secrets(db: AsyncSession, now: datetime) -> int:
    """Forget sealed secrets whose links have expired (nobody can use them any more)."""
    result = await db.execute(
        update(OutboxEvent)
        .where(OutboxEvent.sealed_until < now)
        .values(sealed=None, sealed_until=None),
        execution_options={"synchronize_session": False},
    )
    count: int = getattr(result, "rowcount", 0) or 0
    return count


async def outbox_backlog(db: AsyncSession) -> tuple[int, datetime | None]:
    """(number of unpublished events, creation time of the oldest one)."""
    query = select(func.count(), func.min(OutboxEvent.created_at)).where(
        OutboxEvent.published_at.is_(None)
    )
    count, oldest = (await db.execute(query)).one()
    if isinstance(oldest, str):  # SQLite aggregates lose the column type
        oldest = datetime.fromisoformat(oldest)
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    return int(count), oldest
