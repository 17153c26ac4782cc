"""ASGI middleware: what every request must pass before any route runs, and headers every
response carries.

``RequestGuardMiddleware`` refuses, before any work: request headers over a size (431), bodies
over a size (413, announced or streamed), and a NUL character anywhere in the path, the query, a
header or the body (400). PostgreSQL cannot store or compare NUL in text, so one reaching a query
used to be a 500 with a traceback; refusing it here covers every parameter of every operation,
present and future, in one place.

``OverloadMiddleware`` caps the requests one process serves at once: beyond the cap a request is
answered 503 with ``Retry-After`` before any work.

``SecurityHeadersMiddleware`` adds the headers OWASP recommends for an API to every response that
does not set its own: no sniffing, no referrer, no framing, a CSP that allows nothing (JSON needs
nothing), ``Cache-Control: no-store`` (answers are user-specific), and HSTS when the service is
served over https.

``RequestIdMiddleware`` gives every request an id (the client's ``X-Request-ID`` when it is
well-formed, a fresh one otherwise), makes it part of every log line written while serving it,
echoes it in the response's ``X-Request-ID``, and writes one access line per request at the end.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from src.api.errors import problem_response
from src.config.logging import client_id_var, request_id_var, user_id_var
from src.services.metrics import METRICS_PATH, HttpMetrics

logger = logging.getLogger(__name__)

# A JSON string escape for U+0000 not itself escaped: "\u0000", "\\\u0000", but not "\\u0000".
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_PERCENT_NUL = re.compile(rb"%00")


def _has_nul(raw: bytes, content_type: str) -> bool:
    if b"\x00" in raw:
        return True
    if "x-www-form-urlencoded" in content_type:
        return _PERCENT_NUL.search(raw) is not None
    # FastAPI reads a body as JSON with a JSON content type, and also with none at all.
    return _JSON_NUL.search(raw) is not None


class _TooLarge(Exception):
    pass


class RequestGuardMiddleware:
    """Header size (431), body size (413) and NUL characters (400), before the app sees any of it.

    The body is read in full before the app runs (it is at most ``max_body_bytes``), so a NUL in
    it is found before a route starts any work, and the app receives it unchanged.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_header_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
        if sum(len(name) + len(value) for name, value in headers) > self.max_header_bytes:
            await self._reject(scope, receive, send, 431, self._header_detail())
            return
        if self._announced_length(headers) > self.max_body_bytes:
            await self._reject(scope, receive, send, 413, self._body_detail())
            return
        if self._nul_outside_body(scope, headers):
            await self._reject(scope, receive, send, 400, _NUL_DETAIL)
            return
        content_types = [value for name, value in headers if name == b"content-type"]
        if len(content_types) > 1:
            # Parsers disagree on which one counts (the first, the last): refuse to guess.
            await self._reject(scope, receive, send, 400, "More than one Content-Type header.")
            return
        if not any(name == b"transfer-encoding" for name, _ in headers) and not any(
            name == b"content-length" and value.strip() not in (b"", b"0")
            for name, value in headers
        ):
            # No body announced, so HTTP/1.1 sends none (a GET, most of the traffic): nothing
            # to read ahead or check.
            await self.app(scope, receive, send)
            return
        try:
            body, final = await self._read_body(receive)
        except _TooLarge:
            await self._reject(scope, receive, send, 413, self._body_detail())
            return
        content_type = (content_types[0] if content_types else b"").decode("latin-1").lower()
        if _has_nul(body, content_type):
            await self._reject(scope, receive, send, 400, _NUL_DETAIL)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            if final is not None:
                return final
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _announces_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
        for name, value in headers:
            if name == b"transfer-encoding":
                return True
            if name == b"content-length" and value.strip() not in (b"", b"0"):
                return True
        return False

    @staticmethod
    def _announced_length(headers: Iterable[tuple[bytes, bytes]]) -> int:
        for name, value in headers:
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0

    @staticmethod
    def _nul_outside_body(scope: Scope, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        if "\x00" in scope.get("path", ""):
            return True
        query: bytes = scope.get("query_string", b"")
        if b"\x00" in query or _PERCENT_NUL.search(query):
            return True
        return any(b"\x00" in value for _, value in headers)

    async def _read_body(self, receive: Receive) -> tuple[bytes, Message | None]:
        """The whole body, and a disconnect message if one arrived instead of more body."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), message
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _header_detail(self) -> str:
        return f"The request headers are larger than {self.max_header_bytes} bytes in all."

    def _body_detail(self) -> str:
        return f"The request body is larger than {self.max_body_bytes} bytes."

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        response = problem_response(status, detail, instance=scope.get("path"))
        await response(scope, receive, send)


_NUL_DETAIL = "The request contains a NUL character, which no field accepts."


@dataclass
class Load:
    """What ``OverloadMiddleware`` counts (``app.state.load``): requests being served now, and
    requests refused since start-up."""

    in_flight: int = 0
    refused: int = 0


class OverloadMiddleware:
    """At most ``limit`` requests at once in this process; the rest get 503 at once.

    A process that admits everything under a flood serves everyone slowly: each request waits
    behind all the others for the event loop and the database pool, until clients time out and
    retry. Refusing the excess up front keeps the admitted requests fast and tells the others
    when to come back (``Retry-After``). A client that does not wait comes straight back, so a
    refusal must cost next to nothing: its answer is built once. It runs after the request guard
    has read the body, so only requests that have fully arrived count: a client sending bodies
    slowly holds its own connections, not the places of everyone else. Health probes are never
    refused: a busy process is alive, and must not be restarted for being busy.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        load: Load,
        exempt_prefix: str,
        log_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        metrics: HttpMetrics | None = None,
    ) -> None:
        self.app = app
        self.limit = limit
        self.load = load
        self.exempt_prefix = exempt_prefix
        self.metrics = metrics
        body = problem_response(503, "The service is busy; try again in a moment.").body
        self._start: Message = {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
            ],
        }
        self._body: Message = {"type": "http.response.body", "body": body}
        self._log_interval = log_interval
        self._clock = clock
        self._logged_at: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or self.limit <= 0
            or scope["path"].startswith(self.exempt_prefix)
            # Scraped when busy above all: a refused scrape is a gap just when it matters.
            or scope["path"] == METRICS_PATH
        ):
            await self.app(scope, receive, send)
            return
        load, metrics = self.load, self.metrics
        if load.in_flight >= self.limit:
            load.refused += 1
            if metrics is not None:
                metrics.refused()
            self._note_refusal()
            await send(self._start)
            await send(self._body)
            return
        load.in_flight += 1
        if metrics is not None:
            metrics.admitted()
        try:
            await self.app(scope, receive, send)
        finally:
            load.in_flight -= 1
            if metrics is not None:
                metrics.finished()

    def _note_refusal(self) -> None:
        # One line per interval, with the running total, rather than one per refused request.
        now = self._clock()
        if self._logged_at is None or now - self._logged_at >= self._log_interval:
            self._logged_at = now
            logger.warning(
                "Overloaded: %d requests refused with 503 since start-up "
                "(MAX_REQUESTS_IN_FLIGHT=%d reached)",
                self.load.refused,
                self.limit,
            )


def security_headers(hsts: bool) -> list[tuple[str, str]]:
    """What every response carries unless it sets its own (OWASP's advice for an API)."""
    headers = [
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("X-Frame-Options", "DENY"),
        ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
        ("Cache-Control", "no-store"),
    ]
    if hsts:
        headers.append(("Strict-Transport-Security", "max-age=31536000"))
    return headers


class SecurityHeadersMiddleware:
    """Add the default security headers to every HTTP response that does not set its own."""

    def __init__(self, app: ASGIApp, hsts: bool) -> None:
        self.app = app
        # As ASGI carries them (lower-case bytes), encoded once rather than on every response.
        self.defaults = [(n.lower().encode(), v.encode()) for n, v in security_headers(hsts)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers.extend(item for item in self.defaults if item[0] not in present)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


# What a client may choose as its request id: enough for a UUID, a trace id or a load balancer's
# id, and nothing that could forge a second log line or field (no spaces, quotes or controls).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
access_logger = logging.getLogger("src.access")


def accepted_request_id(raw: bytes | None) -> str:
    """The client's ``X-Request-ID`` when well-formed, else a fresh one (a uuid4, in hex)."""
    if raw is not None:
        text = raw.decode("latin-1")
        if _REQUEST_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex


def route_template(scope: Scope, path: str) -> str:
    """The template of the route that served ``path`` (``/api/v1/users/{user_id}``), else
    ``path`` itself (no route matched: a 404, or a refusal before routing)."""
    return matched_template(scope, path) or path


def matched_template(scope: Scope, path: str) -> str | None:
    """The template of the route that served ``path``, or ``None`` when no route did.

    FastAPI's ``scope["route"]`` is the route as its router declared it, without the prefix the
    router was included under; the prefix is what precedes the part of the path the route's
    pattern matches (tried at the first few slashes only, so a long path costs little).
    """
    route = scope.get("route")
    template = getattr(route, "path", None)
    pattern = getattr(route, "path_regex", None)
    if not isinstance(template, str) or not isinstance(pattern, re.Pattern):
        return None
    start = 0
    for _ in range(_MAX_PREFIX_SEGMENTS):
        if pattern.match(path[start:]):
            return path[:start] + template
        start = path.find("/", start + 1)
        if start < 0:
            break
    return None


_MAX_PREFIX_SEGMENTS = 8


class RequestIdMiddleware:
    """An id for every request, in its log lines and its ``X-Request-ID``; one access line each.

    Outermost, so that a refused request (413, 431, 503) carries the id too, and the access line
    times the whole of it. The client's id is kept when well-formed, so a request can be followed
    from a gateway that already set one; a malformed one is replaced rather than refused (the id
    is for us, and a bad one must not cost the client its answer). Lines for ``quiet_paths``
    (health probes and scrapes, every few seconds from an orchestrator) are written at DEBUG, not
    INFO, unless refused for want of credentials (401, 403): a caller guessing the metrics token
    must show.
    The same route, status and duration feed the request metrics when ``metrics`` is given.
    """

    def __init__(
        self,
        app: ASGIApp,
        quiet_paths: Collection[str] = (),
        metrics: HttpMetrics | None = None,
    ) -> None:
        self.app = app
        self.quiet_paths = frozenset(quiet_paths)
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for n, v in scope.get("headers", ()) if n == b"x-request-id"), None)
        request_id = accepted_request_id(given)
        header = (b"x-request-id", request_id.encode())
        status = 500  # what the client gets if the app fails before answering
        started = time.perf_counter()
        tokens = (
            request_id_var.set(request_id),
            # Set by authentication (src.api.dependencies); none until then, whatever came before.
            user_id_var.set(None),
            client_id_var.set(None),
        )

        async def with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"]
                # A copy: some answers (the overload 503) are one message object, built once.
                message = {**message, "headers": [*headers, header]}
            await send(message)

        try:
            await self.app(scope, receive, with_id)
        finally:
            elapsed = time.perf_counter() - started
            path: str = scope.get("path", "")
            level = (
                logging.DEBUG
                if path in self.quiet_paths and status not in (401, 403)
                else logging.INFO
            )
            logged = access_logger.isEnabledFor(level)
            # Nothing more to do on the hot path when neither wants it (LOG_LEVEL=WARNING).
            if logged or self.metrics is not None:
                method: str = scope.get("method", "")
                template = matched_template(scope, path)
                if self.metrics is not None:
                    self.metrics.observe(method, template, status, elapsed)
                if logged:
                    access_logger.log(
                        level,
                        "request",
                        extra={
                            "method": method,
                            # The template (/api/v1/users/{user_id}): lines group by operation,
                            # and an id in a path is not written out for every request.
                            "route": template or path,
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 1),
                        },
                    )
            client_id_var.reset(tokens[2])
            user_id_var.reset(tokens[1])
            request_id_var.reset(tokens[0])
