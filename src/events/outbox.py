"""Recording events: the one function every state change calls.

An event is an outbox row added to the caller's database session, so it commits (or rolls back)
with the change it describes. Nothing here talks to Kafka: a background relay publishes the rows.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic_core import to_jsonable_python
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from src.config.settings import Settings
from src.db.models import OutboxEvent


class EventType(StrEnum):
    REGISTERED = "user.registered"
    UPDATED = "user.updated"
    EMAIL_VERIFIED = "user.email_verified"
    PASSWORD_CHANGED = "user.password_changed"
    ROLE_CHANGED = "user.role_changed"
    DEACTIVATED = "user.deactivated"
    ACTIVATED = "user.activated"
    DELETED = "user.deleted"
    LOGGED_IN = "user.logged_in"
    LOGIN_FAILED = "user.login_failed"
    VERIFICATION_REQUESTED = "user.verification_requested"
    PASSWORD_RESET_REQUESTED = "user.password_reset_requested"


# These carry a one-time token for the mail sender, so they go to a topic of their own whose
# access can be restricted; no other event carries a secret.
NOTIFICATION_EVENTS = frozenset(
    {EventType.VERIFICATION_REQUESTED, EventType.PASSWORD_RESET_REQUESTED}
)
_FORBIDDEN_KEYS = frozenset({"password", "password_hash", "hashed_password", "refresh_token"})


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
    if "token" in data and event_type not in NOTIFICATION_EVENTS:
        raise ValueError("only notification events may carry a token")
    outbox_row = OutboxEvent(
        id=uuid.uuid4(),
        topic=topic_for(event_type, settings),
        type=str(event_type),
        aggregate_id=user_id,
        # JSON-safe now (UUIDs, datetimes as text), so the row is exactly what will be published.
        payload=to_jsonable_python(data),
    )
    db.add(outbox_row)
    db.info[_DIRTY] = True
    return outbox_row


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
