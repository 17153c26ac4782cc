"""Logs an operator can use: JSON or text lines, a request id on every line and response, the
signed-in user on the lines of an authenticated request, one access line per request; and the
session-wide scan (tests/support/log_scan.py) that fails the run when a line holds a secret."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from src.api.dependencies import CurrentUser
from src.api.middleware import RequestIdMiddleware, accepted_request_id
from src.config.logging import (
    JsonFormatter,
    audit_line,
    configure_logging,
    make_formatter,
    request_id_var,
    resolve_format,
    user_id_var,
)
from src.config.settings import Settings
from tests.support.app import OPERATOR_TOKEN, PASSWORD, bearer, login, register, running_app
from tests.support.auth import IN_PROCESS_CLIENT_IP, QUICK_SETTINGS
from tests.support.log_scan import _SCAN, SecretScanHandler, find_secrets, pytest_sessionfinish
from tests.support.oidc import ADMIN_PASSWORD

SettingsFactory = Callable[..., Settings]


class _Lines(logging.Handler):
    """Every line of the ``src`` loggers, formatted as the service's own handler formats it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


def _service_handler() -> logging.Handler:
    return next(h for h in logging.getLogger("src").handlers if getattr(h, "_ums", False))


@pytest.fixture
def lines() -> Iterator[_Lines]:
    """Attached after the app is built (the format is chosen then): call ``.attach()``."""
    handler = _Lines()
    src = logging.getLogger("src")
    try:
        yield handler
    finally:
        src.removeHandler(handler)


def _attach(handler: _Lines) -> None:
    handler.setFormatter(_service_handler().formatter)
    logging.getLogger("src").addHandler(handler)


def _add_probe_routes(app: Any) -> None:
    """A route that logs while serving a signed-in user, and one that fails."""

    async def inside(principal: CurrentUser) -> dict[str, str]:
        logging.getLogger("src.test_logging").info("inside the request", extra={"thing": 7})
        return {"id": str(principal.id)}

    async def fails() -> None:
        raise RuntimeError("boom")

    app.add_api_route("/test-logging/inside", inside, methods=["GET"])
    app.add_api_route("/test-logging/fails", fails, methods=["GET"])


async def test_json_lines_carry_the_request_id_and_the_signed_in_user(
    make_settings: SettingsFactory, lines: _Lines
) -> None:
    async with running_app(make_settings(LOG_FORMAT="json")) as (app, client):
        assert isinstance(_service_handler().formatter, JsonFormatter)
        _add_probe_routes(app)
        user = await register(client)
        headers = bearer(await login(client, user["email"]))
        _attach(lines)
        response = await client.get(
            "/test-logging/inside", headers={**headers, "X-Request-ID": "trace-42"}
        )
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"] == "trace-42"
    entries = [json.loads(line) for line in lines.lines]  # every line is one JSON object
    inside = next(e for e in entries if e["message"] == "inside the request")
    assert inside["logger"] == "src.test_logging"
    assert inside["level"] == "INFO"
    assert inside["time"].endswith("Z")
    assert inside["request_id"] == "trace-42"
    assert inside["user_id"] == user["id"]
    assert "client_id" not in inside  # the service's own sign-in has none
    assert inside["thing"] == 7
    access = next(e for e in entries if e["logger"] == "src.access")
    assert access["message"] == "request"
    assert access["method"] == "GET"
    assert access["route"] == "/test-logging/inside"
    assert access["status"] == 200
    assert isinstance(access["duration_ms"], float)
    assert access["request_id"] == "trace-42"
    assert access["user_id"] == user["id"]
    # Nothing is left behind in the caller's context once the request is over.
    assert request_id_var.get() is None
    assert user_id_var.get() is None


async def test_the_access_line_names_the_route_template_not_the_path(
    make_settings: SettingsFactory, lines: _Lines
) -> None:
    async with running_app(make_settings(LOG_FORMAT="json")) as (_, client):
        _attach(lines)
        response = await client.get(
            "/api/v1/users/00000000-0000-0000-0000-000000000000",
            headers={"X-Request-ID": "abc"},
        )
    assert response.status_code == 401
    assert response.headers["X-Request-ID"] == "abc"
    access = [json.loads(line) for line in lines.lines if '"src.access"' in line]
    assert [(a["route"], a["status"]) for a in access] == [("/api/v1/users/{user_id}", 401)]


@pytest.mark.parametrize(
    "given",
    ["x" * 129, "has space", 'quote"d', "new\nline", "tab\there", "é", "a/b", "a=b"],
)
def test_a_malformed_request_id_is_replaced(given: str) -> None:
    generated = accepted_request_id(given.encode("utf-8"))
    assert generated != given
    assert len(generated) == 32 and int(generated, 16) >= 0


@pytest.mark.parametrize("given", ["a", "x" * 128, "0af7651916cd43dd8448eb211c80319c", "a.b:c_d-e"])
def test_a_well_formed_request_id_is_kept(given: str) -> None:
    assert accepted_request_id(given.encode()) == given


def test_without_a_request_id_one_is_generated_each_time() -> None:
    assert accepted_request_id(None) != accepted_request_id(None)
    assert accepted_request_id(b"") != ""


async def test_malformed_ids_are_replaced_on_the_wire_and_error_answers_carry_one(
    make_settings: SettingsFactory, lines: _Lines
) -> None:
    async with running_app(make_settings(LOG_FORMAT="json", MAX_REQUEST_BODY_BYTES=1024)) as (
        app,
        client,
    ):
        _add_probe_routes(app)
        _attach(lines)
        for bad in ("x" * 129, "two words", "nul\x00here"):
            response = await client.get("/api/v1/health/live", headers={"X-Request-ID": bad})
            # A NUL is refused by the request guard (400); the answer still carries an id.
            assert response.status_code in (200, 400)
            echoed = response.headers["X-Request-ID"]
            assert echoed != bad and len(echoed) == 32
        too_big = await client.post("/api/v1/auth/register", content=b"{" + b" " * 4096 + b"}")
        assert too_big.status_code == 413
        assert len(too_big.headers["X-Request-ID"]) == 32
        failed = await client.get("/test-logging/fails", headers={"X-Request-ID": "fail-1"})
        assert failed.status_code == 500
        assert failed.headers["X-Request-ID"] == "fail-1"
    entries = [json.loads(line) for line in lines.lines]
    error = next(e for e in entries if e["level"] == "ERROR")
    assert error["request_id"] == "fail-1"
    assert error["exc_type"] == "RuntimeError"
    assert "boom" in error["traceback"]
    access = next(e for e in entries if e["logger"] == "src.access" and e["status"] == 500)
    assert access["request_id"] == "fail-1"
    # Health probes are logged at DEBUG, below the configured INFO: no line for them.
    assert not any(e.get("route", "").startswith("/api/v1/health") for e in entries)


async def test_health_probes_are_logged_at_debug(
    make_settings: SettingsFactory, lines: _Lines
) -> None:
    async with running_app(make_settings(LOG_FORMAT="json", LOG_LEVEL="DEBUG")) as (_, client):
        _attach(lines)
        await client.get("/api/v1/health/live")
        await client.get("/api/v1/health/ready")
    probes = [r for r in lines.records if r.name == "src.access"]
    assert [r.levelno for r in probes] == [logging.DEBUG, logging.DEBUG]


async def test_a_503_built_once_gets_the_id_without_being_changed() -> None:
    shared: Message = {"type": "http.response.start", "status": 503, "headers": [(b"a", b"b")]}

    async def refusing(scope: Scope, receive: Receive, send: Send) -> None:
        await send(shared)
        await send({"type": "http.response.body", "body": b""})

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [(b"x-request-id", b"r1")]}
    await RequestIdMiddleware(refusing)(scope, receive, send)
    assert (b"x-request-id", b"r1") in sent[0]["headers"]
    assert shared["headers"] == [(b"a", b"b")]


async def test_text_format_in_development(make_settings: SettingsFactory, lines: _Lines) -> None:
    async with running_app(make_settings(ENVIRONMENT="development")) as (app, client):
        assert not isinstance(_service_handler().formatter, JsonFormatter)
        _add_probe_routes(app)
        user = await register(client)
        headers = bearer(await login(client, user["email"]))
        _attach(lines)
        await client.get("/test-logging/inside", headers={**headers, "X-Request-ID": "t-1"})
    inside = next(line for line in lines.lines if "inside the request" in line)
    assert " INFO src.test_logging: inside the request request_id=t-1 " in inside
    assert f"user_id={user['id']}" in inside
    assert "thing=7" in inside
    access = next(line for line in lines.lines if "src.access" in line)
    assert "route=/test-logging/inside" in access and "status=200" in access


def test_auto_is_json_in_production_and_text_elsewhere() -> None:
    assert resolve_format("auto", production=True) == "json"
    assert resolve_format("auto", production=False) == "text"
    assert resolve_format("text", production=True) == "text"
    assert resolve_format("json", production=False) == "json"
    previous = _service_handler().formatter if _has_service_handler() else None
    try:
        configure_logging("INFO", 10.0, "auto", production=True)
        assert isinstance(_service_handler().formatter, JsonFormatter)
        configure_logging("INFO", 10.0, "auto", production=False)
        assert not isinstance(_service_handler().formatter, JsonFormatter)
    finally:
        _service_handler().setFormatter(previous or make_formatter("text"))


def _has_service_handler() -> bool:
    return any(getattr(h, "_ums", False) for h in logging.getLogger("src").handlers)


def _record(level: int, msg: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("src.x", level, __file__, 1, msg, None, exc_info)


def test_json_traceback_only_at_error() -> None:
    try:
        raise ValueError("detail")
    except ValueError as error:
        caught = error
    formatter = JsonFormatter()
    warning = json.loads(formatter.format(_record(logging.WARNING, "w", caught)))
    assert warning["exc_type"] == "ValueError" and "traceback" not in warning
    at_error = json.loads(formatter.format(_record(logging.ERROR, "e", caught)))
    assert at_error["exc_type"] == "ValueError" and "ValueError: detail" in at_error["traceback"]


# --- the secret scan ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        f"login failed for a@example.com with {PASSWORD}",
        f"first admin password {ADMIN_PASSWORD}",
        f"health token {OPERATOR_TOKEN}",
        "headers: Authorization: Bearer abc",
        "token Bearer eyJhbGciOi",
        "jwt eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjM0In0.sig",
        "row {'password_hash': 'x'}",
        "hash $argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
    ],
)
def test_the_scan_finds_a_planted_secret(line: str) -> None:
    assert find_secrets(line)
    scan = SecretScanHandler()
    # Handed to the scan directly: logged for real, it would reach the session's own scan.
    scan.handle(logging.LogRecord("src.planted", logging.WARNING, __file__, 1, "%s", (line,), None))
    report = scan.report()
    assert report is not None
    assert "'src.planted'" in report and "WARNING" in report
    # The report names what it found without repeating it.
    for secret in (PASSWORD, ADMIN_PASSWORD, OPERATOR_TOKEN, "eyJhbGciOi", "$argon2id$v"):
        assert secret not in report


def test_the_scan_passes_clean_lines_and_ignores_other_loggers() -> None:
    scan = SecretScanHandler()
    scan.handle(_record(logging.INFO, "authorization refused: user=1 GET /x reason=not_admin"))
    other = logging.LogRecord("httpx", logging.INFO, __file__, 1, PASSWORD, None, None)
    scan.handle(other)
    assert scan.report() is None
    assert scan.scanned == 1


def test_a_finding_fails_the_session() -> None:
    scan = SecretScanHandler()
    scan.handle(_record(logging.INFO, f"oops {PASSWORD}"))
    session: Any = SimpleNamespace(config=SimpleNamespace(stash={_SCAN: scan}), exitstatus=0)
    pytest_sessionfinish(session, 0)
    assert session.exitstatus == pytest.ExitCode.TESTS_FAILED
    clean: Any = SimpleNamespace(
        config=SimpleNamespace(stash={_SCAN: SecretScanHandler()}), exitstatus=0
    )
    pytest_sessionfinish(clean, 0)
    assert clean.exitstatus == 0


# --- audit lines as structured fields (issue 12) --------------------------------------------------

_WRONG_PASSWORD = "not-the-password-for-the-audit-line-test"


async def _fail_login(client: httpx.AsyncClient, email: str, request_id: str) -> None:
    response = await client.post(
        "/api/v1/auth/login",
        data={"grant_type": "password", "username": email, "password": _WRONG_PASSWORD},
        headers={"X-Request-ID": request_id},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_grant"


def _no_password_in(lines: list[str]) -> None:
    for line in lines:
        assert _WRONG_PASSWORD not in line and PASSWORD not in line, line


async def test_a_failed_login_is_one_json_audit_line_of_separate_fields(
    make_settings: SettingsFactory, lines: _Lines
) -> None:
    settings = make_settings(
        LOG_FORMAT="json", LOCKOUT_FAILURE_THRESHOLD=2, LOCKOUT_WAIT_INCREMENT_SECONDS=60,
        **QUICK_SETTINGS,
    )  # fmt: skip
    async with running_app(settings) as (_, client):
        user = await register(client)
        _attach(lines)
        await _fail_login(client, user["email"], "audit-json-1")
        await _fail_login(client, user["email"], "audit-json-2")
    entries = [json.loads(line) for line in lines.lines]
    audit = [e for e in entries if e["logger"] == "src.auth.audit"]
    first, second = audit  # one line per failed login, nothing else on the audit logger
    assert set(first) == {
        "time", "level", "logger", "message", "request_id", "audit", "user", "ip", "reason"
    }  # fmt: skip
    assert first["level"] == "INFO"
    assert first["message"] == "login failed" and first["audit"] == "login_failed"
    assert first["user"] == user["id"]
    assert first["ip"] == IN_PROCESS_CLIENT_IP
    assert first["reason"] == "invalid_credentials"
    assert first["request_id"] == "audit-json-1"
    # The conditional part: the second failure reaches the threshold and locks the address out.
    assert second["request_id"] == "audit-json-2"
    assert second["reason"] == "invalid_credentials" and second["locked_for_seconds"] == 60
    _no_password_in(lines.lines)


async def test_a_failed_login_in_the_text_format_reads_as_key_value_pairs(
    make_settings: SettingsFactory, lines: _Lines
) -> None:
    async with running_app(make_settings(LOG_FORMAT="text", **QUICK_SETTINGS)) as (_, client):
        user = await register(client)
        _attach(lines)
        await _fail_login(client, user["email"], "audit-text")
    audit = [line for line in lines.lines if " src.auth.audit: " in line]
    assert len(audit) == 1, audit
    assert audit[0].endswith(
        " INFO src.auth.audit: login failed request_id=audit-text audit=login_failed"
        f" user={user['id']} ip={IN_PROCESS_CLIENT_IP} reason=invalid_credentials"
    ), audit[0]
    _no_password_in(lines.lines)


def test_an_audit_line_points_at_its_caller_and_writes_ids_as_text() -> None:
    kept = _Lines()
    audit = logging.getLogger("src.auth.audit")
    audit.addHandler(kept)
    factor = uuid.uuid4()
    try:
        audit_line(audit, "factor removed", level=logging.WARNING, factor=factor, left=2, gone=None)
    finally:
        audit.removeHandler(kept)
    (record,) = kept.records
    assert (record.levelno, record.getMessage()) == (logging.WARNING, "factor removed")
    assert record.pathname == __file__
    assert record.funcName == "test_an_audit_line_points_at_its_caller_and_writes_ids_as_text"
    assert vars(record)["audit"] == "factor_removed"
    assert vars(record)["factor"] == str(factor) and vars(record)["left"] == 2
    assert "gone" not in vars(record)  # None: the conditional part is left out


@pytest.mark.parametrize(
    "name", ["name", "msg", "args", "module", "levelname", "message", "asctime", "audit",
             "request_id", "user_id", "client_id", "taskName"],
)  # fmt: skip
def test_an_audit_field_cannot_take_a_reserved_name(name: str) -> None:
    fields: dict[str, Any] = {name: "x"}
    with pytest.raises(ValueError, match=name):
        audit_line(logging.getLogger("src.auth.audit"), "anything", **fields)


def test_every_audit_line_goes_through_the_structured_helper() -> None:
    """A prose line (``audit.info("x: user=%s", ...)``) would have no fields to filter on."""
    src = Path(__file__).resolve().parent.parent / "src"
    prose = re.compile(r"\baudit\.(debug|info|warning|error|exception|critical|log)\(")
    found = [
        f"{path.relative_to(src.parent)}:{number}"
        for path in sorted(src.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if prose.search(line)
    ]
    assert found == [], found
