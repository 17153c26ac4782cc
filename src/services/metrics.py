"""Prometheus metrics: every family the service exports, and how they are exposed.

Every family is defined here, once per process, so the code that moves one only imports this
module (it sits low in the layers: events, auth, oauth and api all may). docs/metrics.md lists
them with their labels and meaning.

Label values are always from small fixed sets (a route template, a method, a status, an outcome,
a dependency name), never something a caller chooses (an email, a user or client id, an address,
a raw path): each distinct value is a series Prometheus keeps forever.

Several server processes (uvicorn ``--workers``) each count their own requests. With
``PROMETHEUS_MULTIPROC_DIR`` set (to an empty directory, before the processes start),
prometheus_client keeps every value in a memory-mapped file there, and a scrape of any process
reads all the files: counters and histograms are summed over the processes, and each gauge is
merged as its ``multiprocess_mode`` says. Values read from the database at scrape time (the
outbox backlog) are computed by the process that answers the scrape and added once, never
summed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from src.config.settings import Settings

logger = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
# The classic text format (0.0.4), which every Prometheus version and scraper reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The directory of multi-process mode, or ``None`` when each process counts alone."""
    return os.environ.get(MULTIPROCESS_ENV) or None


_dir = multiprocess_dir()
if _dir is not None:
    # Created if missing (the values below open their files at once); emptying it is the job of
    # whatever starts the processes, before they start: files left by an earlier run would be
    # counted again.
    os.makedirs(_dir, exist_ok=True)

# --- HTTP -----------------------------------------------------------------------------------------

# The label of a request no route matched (a 404, or a refusal before routing): one series for
# all of them, whatever path was asked for.
UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

HTTP_REQUESTS = Counter(
    "ums_http_requests_total",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "ums_http_request_duration_seconds",
    "Time from receiving a request to the end of its answer, by method and route template.",
    ["method", "route"],
)
HTTP_IN_FLIGHT = Gauge(
    "ums_http_requests_in_flight",
    "Requests being served now (counted by the overload cap; health and metrics excluded).",
    multiprocess_mode="livesum",
)
HTTP_OVERLOAD_REJECTIONS = Counter(
    "ums_http_overload_rejections_total",
    "Requests answered 503 at once because MAX_REQUESTS_IN_FLIGHT were already being served.",
)


class HttpMetrics:
    """What the request middleware records per request, with the per-request cost kept small:
    the labelled children are looked up once per (method, route, status) and remembered, so a
    request costs two dictionary lookups and two increments."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """``route``: the template of the route that served the request, ``None`` if none did."""
        if method not in _METHODS:
            method = "other"
        key = (method, route or UNMATCHED, status)
        children = self._children.get(key)
        if children is None:
            children = (
                HTTP_REQUESTS.labels(key[0], key[1], str(status)),
                HTTP_DURATION.labels(key[0], key[1]),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    @staticmethod
    def admitted() -> None:
        HTTP_IN_FLIGHT.inc()

    @staticmethod
    def finished() -> None:
        HTTP_IN_FLIGHT.dec()

    @staticmethod
    def refused() -> None:
        HTTP_OVERLOAD_REJECTIONS.inc()


def http_metrics(settings: Settings) -> HttpMetrics | None:
    """The request recorder when metrics are on; ``None`` (nothing recorded) when they are off."""
    return HttpMetrics() if settings.METRICS != "off" else None


# --- dependencies ---------------------------------------------------------------------------------

DEPENDENCY_UP = Gauge(
    "ums_dependency_up",
    "1 when the dependency answered its latest check, 0 when it did not (Redis and Kafka: the "
    "reconnect supervisor's probe; the database: the latest live health check).",
    ["dependency"],
    # Up only if every process can reach it.
    multiprocess_mode="livemin",
)
DEPENDENCY_CHECK_DURATION = Histogram(
    "ums_dependency_check_duration_seconds",
    "Time of a live check of a dependency (supervisor probes and health checks), by outcome.",
    ["dependency", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


def dependency_checked(dependency: str, up: bool, seconds: float | None = None) -> None:
    """Record one check of ``dependency`` (database, redis, kafka, smtp)."""
    DEPENDENCY_UP.labels(dependency).set(1 if up else 0)
    if seconds is not None:
        DEPENDENCY_CHECK_DURATION.labels(dependency, "up" if up else "down").observe(seconds)


# --- outbox relay and audit consumer --------------------------------------------------------------

RELAY_PUBLISHED = Counter(
    "ums_relay_published_events_total",
    "Outbox events the broker acknowledged and the relay marked published.",
)
RELAY_FAILED = Counter(
    "ums_relay_failed_events_total",
    "Outbox events in batches whose send failed (they stay pending and are sent again).",
)
RELAY_RETRIED = Counter(
    "ums_relay_retried_events_total",
    "Outbox events published after at least one failed attempt.",
)
RELAY_LATENCY = Histogram(
    "ums_relay_publish_latency_seconds",
    "Time from recording an event (its transaction) to the broker's acknowledgement.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0),
)
AUDIT_LAG = Gauge(
    "ums_audit_consumer_lag_records",
    "Records of the user-events topic not yet stored by the audit consumer (high watermark "
    "minus next offset, over the partitions this process is assigned).",
    multiprocess_mode="livesum",
)
AUDIT_STORED = Counter(
    "ums_audit_events_stored_total",
    "Events the audit consumer stored (duplicates left out).",
)

# --- sign-in --------------------------------------------------------------------------------------

# The outcomes of ``ums_logins_total``: a closed set, so a label value never comes from a caller.
LOGIN_OUTCOMES = (
    "success",
    "bad_password",
    "unknown_user",
    "inactive",
    "rate_limited",
    "mfa_required",
    "mfa_enrollment_required",
    "mfa_failed",
)
LOGINS = Counter(
    "ums_logins_total",
    "Password sign-in attempts (password grant and hosted sign-in page) by outcome.",
    ["outcome"],
)
LOGIN_LOCKOUTS = Counter(
    "ums_login_lockouts_total",
    "Wrong passwords that locked the client address out of the account "
    "(LOCKOUT_FAILURE_THRESHOLD reached).",
)
LIMITER_FALLBACK = Gauge(
    "ums_rate_limiter_fallback",
    "1 while a limiter decides in process memory because Redis is unavailable, else 0.",
    ["limiter"],
    multiprocess_mode="livemax",
)
LIMITER_FALLBACK_DECISIONS = Counter(
    "ums_rate_limiter_fallback_decisions_total",
    "Limiter decisions taken in process memory because Redis was unavailable.",
    ["limiter"],
)
PASSWORD_HASH_QUEUE = Gauge(
    "ums_password_hash_queue_depth",
    "argon2 hashes and verifications waiting for a hashing thread.",
    multiprocess_mode="livesum",
)
TOKENS_ISSUED = Counter(
    "ums_tokens_issued_total",
    "Access tokens issued, by grant type.",
    ["grant_type"],
)
# The grant types of ``ums_tokens_issued_total``.
GRANT_TYPES = (
    "password",
    "mfa",
    "refresh_token",
    "authorization_code",
    "client_credentials",
    "step_up",
)


def login(outcome: str) -> None:
    """Count one sign-in attempt; ``outcome`` is one of ``LOGIN_OUTCOMES``."""
    LOGINS.labels(outcome if outcome in LOGIN_OUTCOMES else "other").inc()


def token_issued(grant_type: str) -> None:
    """Count one access token; ``grant_type`` is one of ``GRANT_TYPES``."""
    TOKENS_ISSUED.labels(grant_type if grant_type in GRANT_TYPES else "other").inc()


def _zero_series() -> None:
    # A counter that has never moved is absent, and ``rate()`` over an absent series is nothing
    # rather than 0: start the known series at 0 so alerts and dashboards see them from the start.
    for outcome in LOGIN_OUTCOMES:
        LOGINS.labels(outcome)
    for grant_type in GRANT_TYPES:
        TOKENS_ISSUED.labels(grant_type)
    for limiter in ("login", "throttle"):
        LIMITER_FALLBACK_DECISIONS.labels(limiter)
        LIMITER_FALLBACK.labels(limiter)


_zero_series()


# --- exposure -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxBacklog:
    """Unpublished outbox events and the age of the oldest, read at scrape time."""

    pending: int
    oldest_age_seconds: float


class _Backlog(Collector):
    """The outbox gauges of one scrape: read from the database by the process answering it, so
    they are never summed over processes."""

    def __init__(self, backlog: OutboxBacklog | None) -> None:
        self.backlog = backlog

    def collect(self) -> Iterable[GaugeMetricFamily]:
        ok = GaugeMetricFamily(
            "ums_outbox_backlog_query_success",
            "1 when this scrape could read the outbox backlog from the database, else 0.",
            value=0 if self.backlog is None else 1,
        )
        yield ok
        if self.backlog is None:
            return
        yield GaugeMetricFamily(
            "ums_outbox_pending_events",
            "Outbox events not yet published to Kafka.",
            value=self.backlog.pending,
        )
        yield GaugeMetricFamily(
            "ums_outbox_oldest_pending_age_seconds",
            "Age of the oldest unpublished outbox event (0 when none waits).",
            value=self.backlog.oldest_age_seconds,
        )


BacklogReader = Callable[[], Awaitable[OutboxBacklog]]


async def read_backlog(reader: BacklogReader | None, timeout: float) -> OutboxBacklog | None:
    """The backlog within ``timeout``, or ``None``: a slow database must not hang a scrape."""
    if reader is None:
        return None
    try:
        async with asyncio.timeout(timeout):
            return await reader()
    except Exception:  # reported as ums_outbox_backlog_query_success 0
        logger.debug("outbox backlog not read for a scrape", exc_info=True)
        return None


def exposition(backlog: OutboxBacklog | None) -> bytes:
    """The text of one scrape: every process's values (all of them in multi-process mode), then
    the backlog read for this scrape."""
    if multiprocess_dir() is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        values = generate_latest(registry)
    else:
        values = generate_latest(REGISTRY)
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(_Backlog(backlog))
    return values + generate_latest(scrape)


def authorized(settings: Settings, authorization: str | None) -> bool:
    """Whether a request may read the metrics: always with METRICS=open; with METRICS=token
    only with ``Authorization: Bearer <METRICS_TOKEN>`` (compared in constant time)."""
    if settings.METRICS == "open":
        return True
    expected = settings.METRICS_TOKEN
    if settings.METRICS != "token" or expected is None or not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(
        token.strip().encode("utf-8", "surrogatepass"), expected.get_secret_value().encode()
    )


# What a request without the right bearer gets (RFC 6750); the body is application/problem+json.
CHALLENGE = 'Bearer realm="metrics"'
UNAUTHORIZED_DETAIL = "The metrics need the bearer token METRICS_TOKEN."


def check_setup(settings: Settings) -> None:
    """Warn when several processes would each report only their own share."""
    if settings.METRICS != "off" and settings.WEB_CONCURRENCY > 1 and multiprocess_dir() is None:
        logger.warning(
            "WEB_CONCURRENCY=%d without %s: each scrape reports one process only; "
            "see docs/metrics.md",
            settings.WEB_CONCURRENCY,
            MULTIPROCESS_ENV,
        )


def process_exiting() -> None:
    """Drop this process's live gauges (in-flight requests, queue depths, ...) from the shared
    directory at shut-down: the processes still running no longer add them up. Counters stay,
    so totals do not fall when a process is replaced."""
    directory = multiprocess_dir()
    if directory is not None:
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]


# --- a listener of its own (METRICS_PORT) ---------------------------------------------------------

_MAX_REQUEST_HEAD = 16384
_READ_TIMEOUT = 5.0
# Connections served at once; any beyond are closed at once, unanswered. Each holds a file
# descriptor for up to _READ_TIMEOUT: without a bound, a caller opening connections faster than
# they time out would take every descriptor of the process, and with them the main port, the
# database and Redis. A scraper needs one.
MAX_CONNECTIONS = 32
# How long an answer may take to be sent: a client that never reads it is let go after this,
# not held (its connection counted against MAX_CONNECTIONS) for ever.
_WRITE_TIMEOUT = 10.0


def _problem(status: int, title: str, detail: str) -> bytes:
    problem = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return json.dumps(problem).encode()


async def _answer(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    settings: Settings,
    backlog: BacklogReader | None,
) -> None:
    try:
        async with asyncio.timeout(_READ_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        writer.close()
        return
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    target = rest.partition(" ")[0].partition("?")[0]
    authorization = next(
        (
            value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
            if name.strip().lower() == "authorization"
        ),
        None,
    )
    headers: list[tuple[str, str]] = [("Cache-Control", "no-store")]
    if target != METRICS_PATH:
        status, reason = 404, "Not Found"
        body = _problem(404, reason, "Only /metrics is served here.")
        headers.append(("Content-Type", "application/problem+json"))
    elif method not in ("GET", "HEAD"):
        status, reason = 405, "Method Not Allowed"
        body = _problem(405, reason, "Use GET.")
        headers += [("Content-Type", "application/problem+json"), ("Allow", "GET, HEAD")]
    elif not authorized(settings, authorization):
        status, reason = 401, "Unauthorized"
        # As the main port's access line does for a refused scrape: someone guessing shows.
        peer = writer.get_extra_info("peername") or ("unknown",)
        logger.info("metrics request refused with 401: no valid bearer token (from %s)", peer[0])
        body = _problem(401, reason, UNAUTHORIZED_DETAIL)
        headers += [("Content-Type", "application/problem+json"), ("WWW-Authenticate", CHALLENGE)]
    else:
        status, reason = 200, "OK"
        body = exposition(await read_backlog(backlog, settings.HEALTH_CHECK_TIMEOUT))
        headers.append(("Content-Type", CONTENT_TYPE))
    headers += [("Content-Length", str(len(body))), ("Connection", "close")]
    text = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    # Drained to the last byte (high-water mark 0), so nothing is left to send after close().
    writer.transport.set_write_buffer_limits(high=0)
    writer.write(text.encode("latin-1") + b"\r\n" + (b"" if method == "HEAD" else body))
    try:
        async with asyncio.timeout(_WRITE_TIMEOUT):
            await writer.drain()
    except (TimeoutError, OSError):
        writer.transport.abort()
        return
    writer.close()


async def start_metrics_server(
    settings: Settings, backlog: BacklogReader | None
) -> asyncio.Server | None:
    """Serve /metrics on METRICS_HOST:METRICS_PORT, one request per connection.

    Deliberately tiny (a request line and headers, no body, no keep-alive, at most
    ``MAX_CONNECTIONS`` at once): Prometheus asks for one page every few seconds. With several
    server processes only one can hold the port; the others leave it to that one (in
    multi-process mode it reports for all of them), and one of them takes it over when that
    process is replaced. ``None`` when the port is taken.
    """

    serving = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal serving
        if serving >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        serving += 1
        try:
            await _answer(reader, writer, settings, backlog)
        except Exception:  # one bad scrape must not end the listener
            logger.debug("metrics request failed", exc_info=True)
            writer.close()
        finally:
            serving -= 1

    try:
        server = await asyncio.start_server(
            handle, settings.METRICS_HOST, settings.METRICS_PORT, limit=_MAX_REQUEST_HEAD
        )
    except OSError as exc:
        if multiprocess_dir() is None:
            logger.warning(
                "Metrics port %s:%d unavailable (%s); metrics not served by this process",
                settings.METRICS_HOST,
                settings.METRICS_PORT,
                exc.strerror or type(exc).__name__,
            )
        else:
            logger.info("Metrics port %d served by another process", settings.METRICS_PORT)
        return None
    logger.info("Metrics served on %s:%d", settings.METRICS_HOST, settings.METRICS_PORT)
    return server
