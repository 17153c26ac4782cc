"""OpenTelemetry tracing, off unless ``TRACING_ENABLED`` (docs/tracing.md).

This module is what the rest of the service calls, and it imports no OpenTelemetry code until
tracing is switched on: the SDK, the exporter and the instrumentations are an optional extra
(``pip install 'user-management-service[tracing]'``), and a service without them must start,
serve and record events exactly as before. The SDK side lives in ``src.services.tracing_sdk``,
imported only by ``start_tracing`` when tracing is on.

With tracing off nothing here costs a request anything: no middleware is added, no library is
patched, and ``record_event`` does not even look for a trace context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from functools import cache
from typing import TYPE_CHECKING, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from src.config.settings import Settings, SettingsError
from src.db.models import OutboxEvent

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "TRACE_CONTEXT_KEYS",
    "TRACING_EXTRA",
    "Tracing",
    "TracingUnavailableError",
    "current_trace_context",
    "publish_spans",
    "start_tracing",
]

TRACING_EXTRA = "user-management-service[tracing]"
# What the CloudEvents distributed tracing extension carries: W3C Trace Context, whatever
# propagators OTEL_PROPAGATORS picks for HTTP.
TRACE_CONTEXT_KEYS = ("traceparent", "tracestate")


class Tracing(Protocol):
    """Tracing as a process runs it (``src.services.tracing_sdk.OpenTelemetryTracing``)."""

    def instrument_engine(self, engine: AsyncEngine) -> None:
        """Trace the SQL statements of ``engine``."""

    def publishing(self, rows: Sequence[OutboxEvent]) -> AbstractContextManager[None]:
        """The spans of one relay batch, around its send."""

    async def shutdown(self) -> None:
        """Undo the instrumentation and flush the last spans."""


class TracingUnavailableError(SettingsError):
    """``TRACING_ENABLED=true`` without the tracing extra installed.

    A configuration error like an invalid setting: a process that meets it outside the app's
    start-up (``python -m src.events.relay``) exits with this one line, no traceback."""


def start_tracing(
    settings: Settings, app: FastAPI | None = None, processor: SpanProcessor | None = None
) -> Tracing | None:
    """Set tracing up when ``TRACING_ENABLED``: a tracer provider, the app's server spans (when
    given an app), Redis and Kafka spans. ``None`` when tracing is off.

    Spans go to ``processor``, by default a batching OTLP/HTTP exporter configured by the
    ``OTEL_*`` variables. Tests hand in their own: as ``processor`` or, for an app started through
    its lifespan, as ``app.state.span_processor`` set before start-up.
    """
    if not settings.TRACING_ENABLED:
        return None
    try:
        from src.services import tracing_sdk
    except ImportError as exc:
        missing = exc.name or str(exc)
        raise TracingUnavailableError(
            f"TRACING_ENABLED=true needs the tracing extra ({missing} is not installed): "
            f"pip install '{TRACING_EXTRA}'"
        ) from None
    if processor is None and app is not None:
        processor = getattr(app.state, "span_processor", None)
    return tracing_sdk.OpenTelemetryTracing.start(app, processor)


@cache
def _propagator() -> TraceContextTextMapPropagator:
    # The OpenTelemetry API comes with FastAPI itself: present with or without the extra.
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def current_trace_context() -> dict[str, str] | None:
    """The W3C ``traceparent`` (and ``tracestate``, if any) of the span running now; ``None``
    outside any span (a background job, a command-line tool)."""
    carrier: dict[str, str] = {}
    _propagator().inject(carrier)
    context = {key: carrier[key] for key in TRACE_CONTEXT_KEYS if key in carrier}
    return context or None


def publish_spans(
    tracing: Tracing | None, rows: Sequence[OutboxEvent]
) -> AbstractContextManager[None]:
    """Around the relay's send of a batch: its spans when tracing is on, nothing otherwise."""
    if tracing is None:
        return contextlib.nullcontext()
    return tracing.publishing(rows)
