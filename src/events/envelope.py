"""CloudEvents 1.0 structured-mode JSON envelopes for outbox rows."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from src.db.models import OutboxEvent
from src.services.tracing import TRACE_CONTEXT_KEYS

SPEC_VERSION = "1.0"


class CloudEvent(BaseModel):
    """What consumers receive as the message value (key = the user id)."""

    model_config = ConfigDict(extra="allow")

    specversion: str = SPEC_VERSION
    id: uuid.UUID
    source: str
    type: str
    subject: str | None = None
    time: datetime
    datacontenttype: str = "application/json"
    data: dict[str, Any] = Field(default_factory=dict)


def envelope_for(row: OutboxEvent, source: str) -> CloudEvent:
    # The CloudEvents distributed tracing extension (traceparent, tracestate): there when the
    # event was recorded in a traced request, absent (not null) otherwise.
    tracing = {
        key: value for key, value in (row.trace_context or {}).items() if key in TRACE_CONTEXT_KEYS
    }
    return CloudEvent(
        id=row.id,
        source=source,
        type=row.type,
        subject=str(row.aggregate_id),
        time=row.created_at,
        data=row.payload,
        **tracing,
    )
