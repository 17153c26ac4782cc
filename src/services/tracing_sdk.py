"""The OpenTelemetry SDK side of tracing: imported only when ``TRACING_ENABLED`` (through
``src.services.tracing.start_tracing``), because everything it imports is the optional
``tracing`` extra.

What is traced:

- every request (FastAPI's instrumentation: one server span named after the route template,
  ``GET /api/v1/users/{user_id}``), probes of liveness and readiness left out;
- SQL statements, Redis commands and Kafka sends and receives, as children of whatever runs them;
- the relay's batches (``outbox publish``) and, in the trace of the request that recorded each
  event, a ``publish <type>`` span from the send to the broker's acknowledgement.

One tracer provider per process, handed to each instrumentation explicitly and not installed as
the global provider: FastAPI's own telemetry turns itself on when a global provider appears,
and would then trace every request twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes
from sqlalchemy.ext.asyncio import AsyncEngine

from src import __version__
from src.db.models import OutboxEvent

DEFAULT_SERVICE_NAME = "user-management-service"
# Kubernetes probes these every few seconds: a trace each would bury the requests worth reading.
# OTEL_PYTHON_FASTAPI_EXCLUDED_URLS (or OTEL_PYTHON_EXCLUDED_URLS) replaces the list.
_PROBES = "api/v1/health/live,api/v1/health/ready"
_EXCLUDED_URLS_VARIABLES = ("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", "OTEL_PYTHON_EXCLUDED_URLS")
# Span attributes that hold the request's query string, per semantic conventions version.
_WITH_QUERY = ("http.url", "url.full", "http.target")
# Headers whose values never reach a span, whatever the operator captures
# (OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_*): credentials, session cookies, and the
# places a one-time link's token or an authorization code travels (a redirect's Location, the
# Referer of a form posted from a reset page). Patterns, matched anywhere in the name.
SANITIZED_HEADERS = ("authorization", "cookie", "token", "secret", "location", "referer")
_SANITIZE_VARIABLE = "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS"
# Flushing the last spans at shut-down waits for the collector, at most this long.
SHUTDOWN_TIMEOUT = 5.0


class BackgroundClientSpansDropped(sampling.Sampler):
    """The sampler ``OTEL_TRACES_SAMPLER`` names, except that a database, Redis or Kafka client
    call outside any request or relay batch starts no trace.

    Those are the health probes, the reconnect supervisor's pings and the relay's idle polls:
    traces of one span each, several a second, burying the requests. The same calls made while
    serving a request are children of its span and follow its sampling decision."""

    def __init__(self, sampler: sampling.Sampler) -> None:
        self.sampler = sampler

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> sampling.SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if kind is SpanKind.CLIENT and not parent.is_valid:
            return sampling.SamplingResult(sampling.Decision.DROP)
        return self.sampler.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"BackgroundClientSpansDropped{{{self.sampler.get_description()}}}"


def service_resource() -> Resource:
    """What the SDK reads from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, with this service's
    name and version where they say nothing."""
    detected = Resource.create()
    ours: dict[str, str] = {}
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        ours[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    if SERVICE_VERSION not in detected.attributes:
        ours[SERVICE_VERSION] = __version__
    return detected.merge(Resource(ours))


def _hide_query(span: Span, scope: Mapping[str, Any]) -> None:
    """Keep the query string out of server spans: one-time links carry their token there
    (``/reset?token=...``), and so does RP-initiated logout (``id_token_hint``). The path and the
    route template say what was asked for."""
    if not scope.get("query_string") or not span.is_recording():
        return
    recorded: Mapping[str, Any] = getattr(span, "attributes", None) or {}
    for name in _WITH_QUERY:
        value = recorded.get(name)
        if isinstance(value, str) and "?" in value:
            span.set_attribute(name, value.split("?", 1)[0])
    if "url.query" in recorded:
        span.set_attribute("url.query", "REDACTED")


def _excluded_urls() -> str | None:
    """``None`` lets the instrumentation read the operator's list from the environment."""
    if any(os.environ.get(name) for name in _EXCLUDED_URLS_VARIABLES):
        return None
    return _PROBES


def _sanitized_headers() -> list[str]:
    """The operator's list of headers to redact plus ours: theirs adds to ours, never replaces
    it (the instrumentation would otherwise take either one or the other)."""
    theirs = [name.strip() for name in os.environ.get(_SANITIZE_VARIABLE, "").split(",")]
    return [*SANITIZED_HEADERS, *(name for name in theirs if name)]


def _origin(row: OutboxEvent) -> Context | None:
    """The context of the request that recorded ``row``, if it was traced."""
    if not row.trace_context:
        return None
    context = TraceContextTextMapPropagator().extract(row.trace_context)
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


class OpenTelemetryTracing:
    """Tracing as this process runs it (``src.services.tracing.Tracing``): the provider, and what
    it instrumented (undone, and the last spans flushed, by ``shutdown``).

    Instrumentations patch libraries for the whole process (Redis, aiokafka and SQLAlchemy
    classes): one per process, as a server or relay process has."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer(__name__, __version__)
        self._app: FastAPI | None = None
        self._instrumented: list[BaseInstrumentor] = []

    @classmethod
    def start(
        cls, app: FastAPI | None, processor: SpanProcessor | None = None
    ) -> OpenTelemetryTracing:
        """A provider whose spans go to ``processor`` (by default OTLP over HTTP, batched), and
        the app (when given), Redis and Kafka instrumented."""
        provider = TracerProvider(
            # The SDK's reading of OTEL_TRACES_SAMPLER (parentbased_always_on by default).
            sampler=BackgroundClientSpansDropped(sampling._get_from_env_or_default()),
            resource=service_resource(),
            # Shut down by ``shutdown`` (bounded), not at interpreter exit.
            shutdown_on_exit=False,
        )
        provider.add_span_processor(processor or BatchSpanProcessor(OTLPSpanExporter()))
        tracing = cls(provider)
        if app is not None:
            tracing._instrument_app(app)
        tracing._instrument(RedisInstrumentor())
        tracing._instrument(AIOKafkaInstrumentor())
        return tracing

    def _instrument(self, instrumentor: BaseInstrumentor, **options: Any) -> None:
        # Instrumentors are process-wide singletons: undo at shut-down only what this one did.
        if instrumentor.is_instrumented_by_opentelemetry:
            return
        instrumentor.instrument(tracer_provider=self.provider, **options)
        self._instrumented.append(instrumentor)

    def _instrument_app(self, app: FastAPI) -> None:
        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=self.provider,
            server_request_hook=_hide_query,
            excluded_urls=_excluded_urls(),
            http_capture_headers_sanitize_fields=_sanitized_headers(),
            # A span per ASGI message read or written: noise in every trace.
            exclude_spans=["receive", "send"],
        )
        if app.middleware_stack is not None:
            # Start-up runs inside the app, whose middleware is already built: build it again,
            # with the tracing middleware outermost. No request has been served yet.
            app.middleware_stack = app.build_middleware_stack()
        self._app = app

    def instrument_engine(self, engine: AsyncEngine) -> None:
        """SQL statements of ``engine`` become spans (the statement with its placeholders;
        parameters are never recorded)."""
        self._instrument(
            SQLAlchemyInstrumentor(),
            engine=engine.sync_engine,
            # It declares SQLAlchemy < 2.1, and would otherwise refuse 2.1 without a word; the
            # engine events it listens to are unchanged (tests/test_tracing.py checks the spans).
            skip_dep_check=True,
        )

    @contextlib.contextmanager
    def publishing(self, rows: Sequence[OutboxEvent]) -> Iterator[None]:
        """Spans for one batch the relay sends: ``outbox publish`` for the batch (current while it
        is sent, so the Kafka client's spans are its children, and linked to every event's
        origin), and in each traced event's own trace a ``publish <type>`` span, linked back to
        the batch, ending when the broker has acknowledged it."""
        origins = [(row, _origin(row)) for row in rows]
        links = [
            Link(trace.get_current_span(origin).get_span_context())
            for _, origin in origins
            if origin is not None
        ]
        with self.tracer.start_as_current_span(
            "outbox publish",
            links=links,
            attributes={"messaging.system": "kafka", "messaging.batch.message_count": len(rows)},
        ) as batch:
            to_batch = [Link(batch.get_span_context())]
            spans = [
                self.tracer.start_span(
                    f"publish {row.type}",
                    context=origin,
                    kind=SpanKind.PRODUCER,
                    links=to_batch,
                    attributes={
                        "messaging.system": "kafka",
                        "messaging.destination.name": row.topic,
                        "messaging.message.id": str(row.id),
                        "cloudevents.event_id": str(row.id),
                        "cloudevents.event_type": row.type,
                    },
                )
                for row, origin in origins
                if origin is not None
            ]
            try:
                yield
            except BaseException as exc:
                for span in spans:
                    span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
                raise
            finally:
                for span in spans:
                    span.end()

    def uninstrument(self) -> None:
        """Undo every instrumentation: the libraries are as they were before ``start``."""
        if self._app is not None:
            FastAPIInstrumentor.uninstrument_app(self._app)
            self._app = None
        while self._instrumented:
            self._instrumented.pop().uninstrument()

    async def shutdown(self) -> None:
        """Uninstrument, then flush the spans still queued: in a thread of its own, waited for at
        most ``SHUTDOWN_TIMEOUT`` seconds, so a silent collector never holds up shut-down (what
        it has not taken by then is lost)."""
        self.uninstrument()
        flusher = threading.Thread(
            target=self.provider.shutdown, name="tracing-shutdown", daemon=True
        )
        flusher.start()
        await asyncio.to_thread(flusher.join, SHUTDOWN_TIMEOUT)
