"""The audit trail across users, for administrators: every event the audit consumer read back
from Kafka, newest first, filtered by type, user and time (``/users/{id}/events`` is one user's,
oldest first)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from src.api.dependencies import AdminUser, SessionDep
from src.api.errors import PROBLEM, Responses
from src.errors import InvalidInput
from src.events.audit import search_events
from src.users.schemas import UserEvent

router = APIRouter(prefix="/events", tags=["events"])


def _errors(*statuses: int) -> Responses:
    return dict.fromkeys(statuses, PROBLEM)


class AuditEventPublic(UserEvent):
    """An event of the trail, with the user it is about (null for a client's events)."""

    user_id: uuid.UUID | None


class EventsPage(BaseModel):
    items: list[AuditEventPublic]
    next_cursor: str | None


@router.get("", response_model=EventsPage, responses=_errors(401, 403, 422))
async def list_events(
    _admin: AdminUser,
    db: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
    type: Annotated[
        str | None, Query(min_length=1, max_length=64, description="e.g. user.deactivated")
    ] = None,
    user_id: uuid.UUID | None = None,
    since: Annotated[datetime | None, Query(description="Events at or after (RFC 3339).")] = None,
    until: Annotated[datetime | None, Query(description="Events before (RFC 3339).")] = None,
) -> EventsPage:
    """Newest first; keyset-paginated: pass ``next_cursor`` back as ``cursor``."""
    if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
        raise InvalidInput("The cursor is not valid; start again without one.")
    for name, moment in (("since", since), ("until", until)):
        if moment is None:
            continue
        if moment.tzinfo is None:
            raise InvalidInput(
                f"{name} needs a time zone offset (e.g. 2026-01-31T12:00:00Z).",
                errors=[{"loc": ["query", name], "msg": "a time zone offset is required"}],
            )
        try:
            # The database compares in UTC: 9999-12-31T23:59-01:00 is no date there.
            moment.astimezone(UTC)
        except OverflowError:
            raise InvalidInput(
                f"{name} is outside the years 1 to 9999 once in UTC.",
                errors=[{"loc": ["query", name], "msg": "out of range in UTC"}],
            ) from None
    events, last = await search_events(
        db,
        limit=limit,
        before=int(cursor) if cursor else None,
        event_type=type,
        user_id=user_id,
        since=since,
        until=until,
    )
    return EventsPage(
        items=[AuditEventPublic.model_validate(e) for e in events],
        next_cursor=str(last) if last is not None else None,
    )
