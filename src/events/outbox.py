"""Recording events: the one function every state change calls.

An event is an outbox row added to the caller's database session, so it commits (or rolls back)
with the change it describes. Nothing here talks to Kafka: a background relay publishes the rows.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any

from pydantic_core import to_jsonable_python
from sqlalchemy.ext.asyncio import AsyncSession

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
    event = OutboxEvent(
        id=uuid.uuid4(),
        topic=topic_for(event_type, settings),
        type=str(event_type),
        aggregate_id=user_id,
        # JSON-safe now (UUIDs, datetimes as text), so the row is exactly what will be published.
        payload=to_jsonable_python(data),
    )
    db.add(event)
    return event
