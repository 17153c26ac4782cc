"""Tracing (docs/tracing.md): the real OpenTelemetry SDK, its spans caught in memory, against
real PostgreSQL, Redis and the tansu broker.

A traced app gets its span processor through ``app.state.span_processor``, the hook of the same
set-up function production uses (which exports over OTLP instead). Instrumentations patch
libraries for the whole process: every test that starts tracing ends it (the app's shut-down
undoes them), and ``untraced_afterwards`` checks that nothing is left for the other tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy
from aiokafka import AIOKafkaProducer
from asgi_lifespan import LifespanManager
from cloudevents.core.bindings.kafka import KafkaMessage, from_kafka
from cloudevents.core.formats.json import JSONFormat
from fastapi import FastAPI
from jsonschema import Draft202012Validator
from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from redis.asyncio import Redis
from sqlalchemy import select, text
from starlette.background import BackgroundTask
from wrapt import FunctionWrapper

import src
import src.services
from src.app.container import app_services
from src.app.wiring import StartupError
from src.config.settings import SettingsError
from src.db.models import OutboxEvent
from src.events.outbox import EventType
from src.main import create_app
from src.services.connections import get_redis_from_app
from src.services.tracing import TRACING_EXTRA, TracingUnavailableError, start_tracing
from src.services.tracing_sdk import service_resource
from tests.conftest import SettingsFactory
from tests.support.app import bearer, eventually, login, register, unique_email
from tests.support.auth import QUICK_SETTINGS
from tests.support.events import USER_EVENTS, Record, wait_for_records
from tests.support.migrations import migrate_to

API = "/api/v1"
ENVELOPE_SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "events" / "envelope.schema.json"
# Kafka on, so events travel outbox -> relay -> topic; cheap hashing; no audit consumer (its
# consumer group would only slow the run down).
TRACED = {
    **QUICK_SETTINGS,
    "KAFKA_ENABLED": True,
    "AUDIT_CONSUMER_ENABLED": False,
    "TRACING_ENABLED": True,
}
UNTRACED = {**TRACED, "TRACING_ENABLED": False}


# --- harness -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def app_with(
    settings_values: dict[str, Any], make_settings: SettingsFactory, exporter: InMemorySpanExporter
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """``running_app`` with spans going to ``exporter`` when the settings turn tracing on."""
    app = create_app(make_settings(**settings_values))
    app.state.span_processor = SimpleSpanProcessor(exporter)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client


def instrumented() -> list[str]:
    """The libraries patched for tracing right now."""
    instrumentors: dict[str, BaseInstrumentor] = {
        "redis": RedisInstrumentor(),
        "aiokafka": AIOKafkaInstrumentor(),
        "sqlalchemy": SQLAlchemyInstrumentor(),
    }
    return [name for name, i in instrumentors.items() if i.is_instrumented_by_opentelemetry]


def tracing_middleware(app: FastAPI) -> list[OpenTelemetryMiddleware]:
    """The OpenTelemetry middleware in the app's built middleware stack, if any."""
    found: list[OpenTelemetryMiddleware] = []
    layer = app.middleware_stack
    while layer is not None:
        if isinstance(layer, OpenTelemetryMiddleware):
            found.append(layer)
        layer = getattr(layer, "app", None)
    return found


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(autouse=True)
def untraced_afterwards() -> Iterator[None]:
    """Instrumentation is process-wide: a test must leave none behind for the others."""
    assert instrumented() == [], "an earlier test left tracing on"
    yield
    assert instrumented() == [], "tracing was not undone at shut-down"


def server_span(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = [s for s in spans if s.kind is SpanKind.SERVER and s.name == name]
    assert len(found) == 1, sorted(s.name for s in spans if s.kind is SpanKind.SERVER)
    return found[0]


def descends_from(
    span: ReadableSpan, ancestor: ReadableSpan, spans: tuple[ReadableSpan, ...]
) -> bool:
    """``span`` is ``ancestor``'s child, grandchild, ... in the same trace."""
    by_id = {s.context.span_id: s for s in spans if s.context.trace_id == ancestor.context.trace_id}
    current: ReadableSpan | None = span
    while current is not None and current.parent is not None:
        if current.parent.span_id == ancestor.context.span_id:
            return bool(current.context.trace_id == ancestor.context.trace_id)
        current = by_id.get(current.parent.span_id)
    return False


def trace_id_of(traceparent: str) -> int:
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, len(trace_id), len(span_id), len(flags)) == ("00", 32, 16, 2), traceparent
    return int(trace_id, 16)


async def published_record(kafka_bootstrap: str, subject: str, event_type: str) -> Record:
    records = await wait_for_records(
        kafka_bootstrap,
        USER_EVENTS,
        lambda found: any(_is(r, subject, event_type) for r in found),
        timeout=30,
    )
    return next(r for r in records if _is(r, subject, event_type))


def _is(record: Record, subject: str, event_type: str) -> bool:
    return record.event.get("subject") == subject and record.event.get("type") == event_type


# --- requests, SQL, Redis ------------------------------------------------------------------------


async def test_a_request_is_a_server_span_named_by_its_route_with_sql_and_redis_below_it(
    make_settings: SettingsFactory, exporter: InMemorySpanExporter
) -> None:
    async with app_with(TRACED, make_settings, exporter) as (app, client):
        assert len(tracing_middleware(app)) == 1
        user = await register(client)
        exporter.clear()
        auth = bearer(await login(client, user["email"]))
        spans = exporter.get_finished_spans()
        signing_in = server_span(spans, f"POST {API}/auth/login")
        assert signing_in.attributes is not None
        assert signing_in.attributes["http.route"] == f"{API}/auth/login"
        assert signing_in.attributes["http.status_code"] == 200
        # Signing in asks PostgreSQL (the account, the new session) and Redis (the login guard).
        below = [s for s in spans if descends_from(s, signing_in, spans)]
        systems = {
            (s.attributes or {}).get("db.system") for s in below if s.kind is SpanKind.CLIENT
        }
        assert {"postgresql", "redis"} <= systems, [s.name for s in below]
        statements = [str((s.attributes or {}).get("db.statement", "")) for s in below]
        assert any(statement.startswith("SELECT") for statement in statements)
        # Redis commands and SQL keep their values out: "EVALSHA ? ? ...", placeholders.
        assert user["email"] not in json.dumps([dict(s.attributes or {}) for s in spans])

        # The route template names the span, never the path with its id.
        exporter.clear()
        reply = await client.get(f"{API}/users/{user['id']}", headers=auth)
        assert reply.status_code == 200, reply.text
        spans = exporter.get_finished_spans()
        reading = server_span(spans, f"GET {API}/users/{{user_id}}")
        assert (reading.attributes or {})["http.route"] == f"{API}/users/{{user_id}}"
        assert not any(user["id"] in s.name for s in spans)

        # Probes are not traced, and neither are database or Redis calls outside any request
        # (the supervisor's pings, the relay's polls): they would be traces of their own.
        exporter.clear()
        assert (await client.get(f"{API}/health/live")).status_code == 200
        assert (await client.get(f"{API}/health/ready")).status_code == 200
        async with app_services(app).sessionmaker() as db:
            assert await db.scalar(text("SELECT 1")) == 1
        redis = get_redis_from_app(app)
        assert redis is not None and await redis.ping()
        spans = exporter.get_finished_spans()
        # (The relay may publish the sign-in's event meanwhile: in that event's trace.)
        assert not any(s.name.startswith(f"GET {API}/health") for s in spans)
        assert [s.name for s in spans if s.kind is SpanKind.CLIENT and s.parent is None] == []
        # The same calls within a span are traced.
        with app.state.tracing.tracer.start_as_current_span("job"):
            await redis.ping()
        job = next(s for s in exporter.get_finished_spans() if s.name == "job")
        assert any(
            s.name == "PING" and s.parent == job.context for s in exporter.get_finished_spans()
        )


async def test_the_query_string_never_reaches_a_span(
    make_settings: SettingsFactory, exporter: InMemorySpanExporter
) -> None:
    secret = f"one-time-{uuid.uuid4().hex}"
    async with app_with(TRACED, make_settings, exporter) as (_, client):
        reply = await client.get(f"/account/reset-password?token={secret}")
        assert reply.status_code == 200
        spans = exporter.get_finished_spans()
        page = server_span(spans, "GET /account/reset-password")
        assert (page.attributes or {}).get("http.target") == "/account/reset-password"
        assert secret not in json.dumps([dict(s.attributes or {}) for s in spans])


# --- events carry the trace ----------------------------------------------------------------------


async def test_an_event_carries_its_requests_trace_to_kafka(
    make_settings: SettingsFactory, exporter: InMemorySpanExporter, kafka_bootstrap: str
) -> None:
    async with app_with(TRACED, make_settings, exporter) as (app, client):
        user = await register(client)
        registering = server_span(exporter.get_finished_spans(), f"POST {API}/auth/register")
        record = await published_record(kafka_bootstrap, user["id"], str(EventType.REGISTERED))

        # The CloudEvent's distributed tracing extension names the request's trace, and the
        # envelope is still what its schema says.
        event = record.event
        assert trace_id_of(event["traceparent"]) == registering.context.trace_id
        assert "tracestate" not in event  # nobody set one
        schema = json.loads(ENVELOPE_SCHEMA.read_text())
        assert list(Draft202012Validator(schema).iter_errors(event)) == []
        async with app_services(app).sessionmaker() as db:
            row = await db.scalar(
                select(OutboxEvent).where(OutboxEvent.id == uuid.UUID(event["id"]))
            )
        assert row is not None and row.trace_context == {"traceparent": event["traceparent"]}
        # A consumer continues the trace as docs/tracing.md shows.
        carrier = {key: event[key] for key in ("traceparent", "tracestate") if key in event}
        context = TraceContextTextMapPropagator().extract(carrier)
        consumer = TracerProvider(shutdown_on_exit=False).get_tracer("a consumer")
        with consumer.start_as_current_span("handle", context=context) as handling:
            assert handling.get_span_context().trace_id == registering.context.trace_id

        # In the request's trace, the publication of its event: request -> commit -> publish.
        def publish_span() -> ReadableSpan | None:
            found = [
                s
                for s in exporter.get_finished_spans()
                if s.name == "publish user.registered"
                and (s.attributes or {}).get("cloudevents.event_id") == event["id"]
            ]
            return found[0] if found else None

        publishing = await eventually(publish_span)
        assert publishing.kind is SpanKind.PRODUCER
        assert publishing.context.trace_id == registering.context.trace_id
        assert publishing.parent is not None
        assert f"{publishing.parent.span_id:016x}" == event["traceparent"].split("-")[2]
        # The relay's batch links to it, and the Kafka client's send is the batch's child: the
        # message's own traceparent header names that hop (the CloudEvent keeps the origin).
        (batch_link,) = publishing.links
        batch = next(
            s
            for s in exporter.get_finished_spans()
            if s.context.span_id == batch_link.context.span_id
        )
        assert batch.name == "outbox publish"
        assert any(link.context.trace_id == registering.context.trace_id for link in batch.links)
        header = dict(record.headers)["traceparent"].decode()
        assert trace_id_of(header) == batch.context.trace_id
        # Still structured mode for a CloudEvents SDK, the extension an attribute like the rest.
        message = KafkaMessage(headers=dict(record.headers), key=record.key, value=record.value)
        parsed = from_kafka(message, JSONFormat())
        assert parsed.get_extension("traceparent") == event["traceparent"]
        assert parsed.get_data() == event["data"]


async def test_without_tracing_no_middleware_no_patching_and_no_traceparent(
    make_settings: SettingsFactory, exporter: InMemorySpanExporter, kafka_bootstrap: str
) -> None:
    # A span of someone else's is current while the request runs: only the setting decides.
    elsewhere = TracerProvider(shutdown_on_exit=False)
    elsewhere.add_span_processor(SimpleSpanProcessor(exporter))
    async with app_with(UNTRACED, make_settings, exporter) as (app, client):
        assert app.state.tracing is None
        assert tracing_middleware(app) == []
        assert instrumented() == []
        with elsewhere.get_tracer("test").start_as_current_span("outside"):
            user = await register(client, unique_email("untraced"))
        record = await published_record(kafka_bootstrap, user["id"], str(EventType.REGISTERED))
        assert "traceparent" not in record.event and "tracestate" not in record.event
        assert [s.name for s in exporter.get_finished_spans()] == ["outside"]
        async with app_services(app).sessionmaker() as db:
            row = await db.scalar(
                select(OutboxEvent).where(OutboxEvent.id == uuid.UUID(record.event_id))
            )
        assert row is not None and row.trace_context is None


def patched() -> list[str]:
    """The libraries whose functions an instrumentation has replaced, now."""
    wrapped = {
        "redis": vars(Redis)["execute_command"],
        "aiokafka": vars(AIOKafkaProducer)["send"],
        "sqlalchemy": sqlalchemy.create_engine,
    }
    found = [name for name, function in wrapped.items() if isinstance(function, FunctionWrapper)]
    if hasattr(BackgroundTask, "_otel_original_call"):
        found.append("background tasks")
    return found


async def test_shut_down_undoes_every_instrumentation(
    make_settings: SettingsFactory, exporter: InMemorySpanExporter
) -> None:
    assert patched() == []
    async with app_with(TRACED, make_settings, exporter) as (app, _):
        assert sorted(instrumented()) == ["aiokafka", "redis", "sqlalchemy"]
        assert sorted(patched()) == ["aiokafka", "background tasks", "redis", "sqlalchemy"]
        stack = app.middleware_stack
    assert instrumented() == [] and patched() == []
    assert tracing_middleware(app) == [] and app.middleware_stack is not stack


# --- the default exporter: OTLP over HTTP -------------------------------------------------------


class Collector:
    """An OTLP/HTTP trace receiver: keeps every export request it is sent."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.requests.append(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def spans(self) -> list[tuple[dict[str, str], str, int]]:
        """(resource attributes, span name, trace id) of every span received."""
        found = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    found += [
                        (resource, span.name, int.from_bytes(span.trace_id, "big"))
                        for span in scope_spans.spans
                    ]
        return found


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    receiver = Collector()
    receiver.thread.start()
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_HEADERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


async def test_spans_are_exported_over_otlp_and_flushed_at_shut_down(
    make_settings: SettingsFactory, collector: Collector
) -> None:
    app = create_app(make_settings(**TRACED))  # no span processor handed in: the real exporter
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await register(client)
    # Batched, so sent at the latest when shut-down flushes them.
    exported = collector.spans()
    assert f"POST {API}/auth/register" in {name for _, name, _ in exported}
    resource = exported[0][0]
    assert resource["service.name"] == "user-management-service"
    assert resource["service.version"] == src.__version__


async def test_the_relay_run_apart_traces_each_publication_in_its_requests_trace(
    make_settings: SettingsFactory,
    exporter: InMemorySpanExporter,
    collector: Collector,
    kafka_bootstrap: str,
    database_url: str,
    jwt_key_file: Path,
    tmp_path: Path,
) -> None:
    # The API records (traced) and publishes nothing: Kafka is off in it.
    async with app_with({**TRACED, "KAFKA_ENABLED": False}, make_settings, exporter) as (_, client):
        user = await register(client)
    registering = server_span(exporter.get_finished_spans(), f"POST {API}/auth/register")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "REDIS_"))}
    env.update(
        ENVIRONMENT="test",
        DATABASE_URL=database_url,
        DATA_DIR=str(tmp_path / "data"),
        JWT_PRIVATE_KEY_FILE=str(jwt_key_file),
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        KAFKA_ENABLE_IDEMPOTENCE="false",
        OUTBOX_POLL_INTERVAL="0.2",
        TRACING_ENABLED="true",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",  # export within a moment, not every 5 s
    )
    log = tmp_path / "relay.log"
    with log.open("ab") as output:
        relay = subprocess.Popen(
            [sys.executable, "-m", "src.events.relay"],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            stdout=output,
            stderr=output,
        )
    try:

        def published() -> bool:
            assert relay.poll() is None, log.read_text()
            return any(
                name == "publish user.registered" and trace_id == registering.context.trace_id
                for _, name, trace_id in collector.spans()
            )

        await eventually(published, timeout=30, interval=0.2)
        record = await published_record(kafka_bootstrap, user["id"], str(EventType.REGISTERED))
        assert trace_id_of(record.event["traceparent"]) == registering.context.trace_id
    finally:
        relay.terminate()
        returncode = await asyncio.to_thread(relay.wait, 15)
    assert returncode == 0, log.read_text()


def test_the_service_name_and_attributes_come_from_the_otel_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "users-eu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging")
    attributes = service_resource().attributes
    assert attributes["service.name"] == "users-eu"
    assert attributes["deployment.environment"] == "staging"
    assert attributes["service.version"] == src.__version__


# --- the extra missing ---------------------------------------------------------------------------


@pytest.fixture
def without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the tracing extra were not installed: importing the SDK fails (a ``None`` entry in
    ``sys.modules`` makes ``import`` raise ModuleNotFoundError), and the module that needs it has
    to be imported afresh."""
    for name in list(sys.modules):
        if name == "opentelemetry.sdk" or name.startswith("opentelemetry.sdk."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)
    monkeypatch.delitem(sys.modules, "src.services.tracing_sdk", raising=False)
    monkeypatch.delattr(src.services, "tracing_sdk", raising=False)


def test_tracing_on_without_the_extra_says_which_extra_to_install(
    make_settings: SettingsFactory, without_the_extra: None
) -> None:
    with pytest.raises(TracingUnavailableError) as caught:
        start_tracing(make_settings(TRACING_ENABLED=True))
    message = str(caught.value)
    assert f"pip install '{TRACING_EXTRA}'" in message and "opentelemetry.sdk" in message
    # A configuration error: a process exits with that line, no traceback.
    assert isinstance(caught.value, SettingsError)
    assert start_tracing(make_settings(TRACING_ENABLED=False)) is None


async def test_the_app_refuses_to_start_with_tracing_on_and_no_extra(
    make_settings: SettingsFactory, without_the_extra: None
) -> None:
    app = create_app(make_settings(TRACING_ENABLED=True))
    with pytest.raises(StartupError, match=r"pip install 'user-management-service\[tracing\]'"):
        async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
            pass
    assert tracing_middleware(app) == []


# --- the migration -------------------------------------------------------------------------------


async def _columns(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'outbox'"
    )
    return {row["column_name"] for row in rows}


async def _insert(conn: asyncpg.Connection, **extra: str) -> uuid.UUID:
    event_id = uuid.uuid4()
    names = "".join(f", {name}" for name in extra)
    values = "".join(f", ${i + 4}::jsonb" for i in range(len(extra)))
    await conn.execute(
        f"INSERT INTO outbox (id, topic, type, aggregate_id, payload, created_at, attempts{names})"
        f" VALUES ($1, 'user-events', $2, $3, '{{}}'::jsonb, now(), 0{values})",
        event_id,
        "user.updated",
        uuid.uuid4(),
        *extra.values(),
    )
    return event_id


async def test_the_trace_context_column_migrates_up_and_down(empty_database: str) -> None:
    await migrate_to(empty_database, "0006")
    conn = await asyncpg.connect(empty_database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        assert "trace_context" not in await _columns(conn)
        before = await _insert(conn)
        await migrate_to(empty_database, "0007")
        assert "trace_context" in await _columns(conn)
        # Older rows have none; a new one keeps what it is given.
        assert await conn.fetchval("SELECT trace_context FROM outbox WHERE id = $1", before) is None
        context = {"traceparent": f"00-{'a' * 32}-{'b' * 16}-01"}
        after = await _insert(conn, trace_context=json.dumps(context))
        stored = await conn.fetchval("SELECT trace_context FROM outbox WHERE id = $1", after)
        assert json.loads(stored) == context

        await migrate_to(empty_database, "0006", down=True)
        assert "trace_context" not in await _columns(conn)
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 2  # the events stay
        await migrate_to(empty_database, "head")
        assert "trace_context" in await _columns(conn)
    finally:
        await conn.close()
