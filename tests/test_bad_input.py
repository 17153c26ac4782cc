"""Bad input into every parameter of every operation: NUL characters, huge numbers, Unicode
digits, over-long values and wrong JSON types.

The operations and their parameters are read from the app's own OpenAPI document — path, query
and header parameters, the fields of JSON and form bodies — plus what every operation reads
without declaring it: the Authorization header (a bearer token, or the token endpoint's HTTP Basic
client credentials) and the client's address and user agent. A route added tomorrow is attacked
without anyone editing this file. Each request makes exactly one parameter bad and keeps every
other one valid (the target user's id, a real session id, a fresh email address), so the bad value
is what the service has to deal with; a 422 that names any other parameter fails the test.

What must hold for every answer:

- never a 5xx, and no ERROR record or traceback in the log: PostgreSQL cannot store NUL in text,
  Python refuses to turn 5,000 digits into an int, "²".isdigit() is true but int("²") fails;
- a 4xx for a value the parameter's schema does not accept, and a 2xx only where the value is
  legitimately acceptable (a full name of "²", a search for "٣");
- errors as ``application/problem+json``, except the OAuth2 token endpoint's own, which are
  RFC 6749 ``{"error": ...}`` JSON;
- exactly 400 for a NUL and 431 for headers over ``MAX_REQUEST_HEADER_BYTES``: the request guard
  (src/api/middleware.py) answers those before any route runs;
- nothing changes: the admin, the user and the target read the same afterwards, apart from what an
  accepted PATCH set (a full name "²" is a change a client may ask for), and their sessions work.

The request guard's own limits get their own cases (a 100 KB Authorization, If-Match of 5,000
digits, bodies that are not a JSON object), and a sign-in behind a trusted proxy must work whatever
10,000 characters its forwarded-for headers hold.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlencode

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from redis.asyncio import Redis

from src.api.errors import PROBLEM_JSON
from src.config.settings import Settings
from tests.support.app import PASSWORD, login, signed_in, unique_email
from tests.support.auth import (
    API,
    PUBLIC_FIELDS,
    QUICK_SETTINGS,
    forget_in_process_login_attempts,
    session_of,
)
from tests.support.users import (
    admin_creates,
    fetch,
)

AdminApp = tuple[FastAPI, httpx.AsyncClient, dict[str, str]]

SETTINGS: dict[str, Any] = {
    **QUICK_SETTINGS,
    # Hundreds of requests here carry a wrong password (see WRONG_PASSWORD): the lock-out per
    # (account, address) would answer 429 to the rest, and to the valid sign-ins at the end.
    "LOCKOUT_FAILURE_THRESHOLD": 100_000,
    # The in-process client connects from 127.0.0.1: trusting it as a proxy makes the service
    # parse X-Forwarded-For and Forwarded, instead of ignoring them.
    "TRUSTED_PROXIES": "127.0.0.1",
    # 20 requests at a time on a loaded 2-core CI machine may wait for a pooled connection longer
    # than the default 2 s; a 503 from that would be the test's doing, not the input's.
    "DATABASE_POOL_TIMEOUT": 30.0,
}
CONCURRENCY = 20
MAX_HEADER_BYTES = 16384  # the default MAX_REQUEST_HEADER_BYTES, checked against the app's


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**SETTINGS, **overrides})

    return factory


@pytest_asyncio.fixture(autouse=True)
async def _forget_login_attempts(redis_client: Redis) -> AsyncIterator[None]:
    # Hundreds of password checks from the in-process address must not push a later test (with
    # the default limits) over the shared Redis's per-address window.
    yield
    await forget_in_process_login_attempts(redis_client)


# --- the operations, from the OpenAPI document ----------------------------------------------------

Location = Literal["path", "query", "header", "auth", "json", "form"]

# Headers every operation reads without declaring them (src/api/dependencies.get_client_info):
# the client's address, from a trusted proxy (TRUSTED_PROXIES above), and its user agent.
CLIENT_HEADERS = ("X-Forwarded-For", "Forwarded", "User-Agent")


@dataclass(frozen=True)
class Param:
    location: Location
    name: str
    schema: dict[str, Any] = field(hash=False)
    required: bool = False
    description: str = ""

    @property
    def emailish(self) -> bool:
        """An email address travels here (the token endpoint's ``username`` is one)."""
        words = f"{self.name} {self.description}".lower().replace("_", " ")
        return self.schema.get("format") == "email" or "email" in words


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    params: tuple[Param, ...]
    secured: bool
    body_required: bool
    statuses: frozenset[str]  # the answers it documents

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"

    def of(self, location: Location) -> list[Param]:
        return [p for p in self.params if p.location == location]

    @property
    def destroys(self) -> bool:
        """Whether a valid request deletes or ends something: a DELETE, or a POST whose only
        input is the caller's session (logout, logout-all)."""
        declared = [p for p in self.params if p.location != "auth" and p.name not in CLIENT_HEADERS]
        return self.method == "DELETE" or (self.method == "POST" and not declared)

    @property
    def one_at_a_time(self) -> bool:
        """Whether requests to it must not overlap: concurrent PATCHes race for the account's
        version (optimistic locking), and all but one would get a 412 before their value reached
        the database; health checks (documented 503) answer 503 when a dependency does not answer
        within a second, and 20 requests at once on a slow machine must not make it late."""
        return self.method == "PATCH" or "503" in self.statuses


def _resolve(doc: dict[str, Any], node: Any) -> Any:
    """The node with every ``$ref`` into components replaced by what it names."""
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].removeprefix("#/components/schemas/")
            return _resolve(doc, doc["components"]["schemas"][name])
        return {key: _resolve(doc, value) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(doc, item) for item in node]
    return node


def _object_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The object of a body schema, which may also allow null (``anyOf: [object, null]``)."""
    for branch in schema.get("anyOf", [schema]):
        if "properties" in branch:
            found: dict[str, Any] = branch
            return found
    return {"properties": {}}


def _body_params(doc: dict[str, Any], body: dict[str, Any]) -> list[Param]:
    params = []
    kinds: tuple[tuple[str, Location], ...] = (
        ("application/json", "json"),
        ("application/x-www-form-urlencoded", "form"),
    )
    for media, location in kinds:
        if media not in body.get("content", {}):
            continue
        schema = _object_schema(_resolve(doc, body["content"][media].get("schema", {})))
        required = set(schema.get("required", []))
        params += [
            Param(location, name, prop, name in required, prop.get("description", ""))
            for name, prop in schema["properties"].items()
        ]
    return params


def operations(doc: dict[str, Any]) -> list[Operation]:
    found = []
    for path, item in doc["paths"].items():
        for method, spec in item.items():
            secured = bool(spec.get("security", doc.get("security")))
            params = [
                Param(
                    p["in"],
                    p["name"],
                    _resolve(doc, p.get("schema", {})),
                    bool(p.get("required")),
                    p.get("description", ""),
                )
                for p in spec.get("parameters", [])
            ]
            # Credentials are an input of every operation: a bearer token for secured ones, HTTP
            # Basic client credentials at the token endpoint (RFC 6749 section 2.3.1; not in the
            # document), and whatever a client sends anywhere else.
            params.append(Param("auth", "Authorization", {"type": "string"}, secured))
            declared = {p.name.lower() for p in params}
            params += [
                Param("header", name, {"type": "string"})
                for name in CLIENT_HEADERS
                if name.lower() not in declared
            ]
            body = spec.get("requestBody", {})
            params += _body_params(doc, body)
            found.append(
                Operation(
                    method=method.upper(),
                    path=path,
                    params=tuple(params),
                    secured=secured,
                    body_required=bool(body.get("required")),
                    statuses=frozenset(str(status) for status in spec.get("responses", {})),
                )
            )
    return found


OAUTH_ENDPOINTS = frozenset({"/oauth2/token", "/oauth2/revoke", "/oauth2/introspect"})


def token_endpoints(doc: dict[str, Any]) -> set[str]:
    """The OAuth2 endpoints of the document (their errors are RFC 6749, not RFC 9457): the token
    URL its security scheme declares, and the provider's token, revocation and introspection
    endpoints."""
    urls = {path for path in doc.get("paths", {}) if path in OAUTH_ENDPOINTS}
    for scheme in doc.get("components", {}).get("securitySchemes", {}).values():
        for flow in scheme.get("flows", {}).values():
            if "tokenUrl" in flow:
                urls.add(flow["tokenUrl"])
    return urls


# --- the bad values -------------------------------------------------------------------------------

NUL = "a\x00b"
NUL_EMAIL = "x\x00@example.com"
LONG = "x" * 20_000  # a 20,000-character JSON body stays well under MAX_REQUEST_BODY_BYTES (64 KiB)
LONG_EMAIL = "a" * 5000 + "@example.com"
FIVE_THOUSAND_DIGITS = "9" * 5000
HUGE_INTEGERS: tuple[tuple[str, str], ...] = (
    ("5,000 digits", FIVE_THOUSAND_DIGITS),  # beyond int()'s 4,300-digit limit
    ("10**30", str(10**30)),
    ("-10**30", str(-(10**30))),
    ("20 nines", "99999999999999999999"),  # beyond BIGINT
)
UNICODE_DIGITS: tuple[tuple[str, str], ...] = (
    ("superscript two", "²"),  # "²".isdigit() is true, int("²") raises
    ("Arabic-Indic three", "٣"),  # int("٣") == 3
)
# An IPv6 address may carry a zone ("fe80::1%eth0"), and nothing bounds its length.
ZONED_IPV6 = "fe80::1%" + "a" * 5000


@dataclass(frozen=True)
class Bad:
    """One bad value: ``value`` is what the service receives (text for path, query, header and
    form; a JSON value in a JSON body), ``raw`` its JSON text (5,000 digits have no json.dumps)."""

    label: str
    value: Any
    raw: str

    @property
    def has_nul(self) -> bool:
        return isinstance(self.value, str) and "\x00" in self.value


def _text(label: str, value: str) -> Bad:
    return Bad(label, value, json.dumps(value))


def bad_values(param: Param) -> list[Bad]:
    """The bad values for one parameter, by where it travels and what it holds."""
    if param.location == "auth":
        return _credentials()
    values = [_text("NUL", NUL)]
    if param.emailish:
        values.append(_text("NUL in an email", NUL_EMAIL))
    values += [_text(f"{label} as text", digits) for label, digits in HUGE_INTEGERS]
    values += [_text(label, digit) for label, digit in UNICODE_DIGITS]
    values.append(_text("20,000 characters", LONG))
    if param.emailish:
        values.append(_text("an over-long email", LONG_EMAIL))
    if "forwarded" in param.name.lower():
        values += [
            _text("IPv6 with a 5,000-character zone", ZONED_IPV6),
            _text("IPv6 with a 5,000-character zone and a port", f"[{ZONED_IPV6}]:443"),
            _text("for= IPv6 with a 5,000-character zone", f'for="[{ZONED_IPV6}]:443"'),
        ]
    if param.location != "json":
        return values
    # A JSON body can also carry the numbers as numbers, and values of the wrong type.
    values.append(Bad("5,000 digits as a number", 10**5000 - 1, FIVE_THOUSAND_DIGITS))
    values += [Bad(f"{label} as a number", int(text), text) for label, text in HUGE_INTEGERS[1:]]
    values += [
        Bad("a list", ["a"], '["a"]'),
        Bad("an object", {"a": "b"}, '{"a": "b"}'),
        Bad("null", None, "null"),
    ]
    if not _json_accepts(param.schema, True):  # true is no bad value for a boolean
        values.append(Bad("true", True, "true"))
    return values


def _credentials() -> list[Bad]:
    """Bad values for the Authorization header: each as a bearer token, as HTTP Basic
    credentials, and base64-encoded as a Basic client id (where the request guard cannot see a
    NUL: the token endpoint must refuse it itself)."""
    texts = [("NUL", NUL), *HUGE_INTEGERS, *UNICODE_DIGITS, ("20,000 characters", LONG)]
    values = []
    for label, text in texts:
        encoded = base64.b64encode(f"{text}:secret".encode()).decode()
        values += [
            _text(f"Bearer {label}", f"Bearer {text}"),
            _text(f"Basic {label}", f"Basic {text}"),
            _text(f"Basic, base64 of {label}", f"Basic {encoded}"),
        ]
    return values


# Bodies that are no JSON object at all, for every operation that takes one.
WHOLE_BODIES: tuple[tuple[str, bytes], ...] = (
    ("a list", b"[]"),
    ("a string", b'"a"'),
    ("5,000 digits", FIVE_THOUSAND_DIGITS.encode()),
    ("true", b"true"),
    ("30,000 nested lists", b"[" * 30_000 + b"]" * 30_000),
    ("not UTF-8", b'{"a": "\xff\xfe"}'),
    ("not JSON", b"{"),
)


# --- what a schema accepts ------------------------------------------------------------------------

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_INTEGER = re.compile(r"-?[0-9]{1,4000}")  # ASCII digits only: what OpenAPI means by an integer
_BOOLEAN_WORDS = {"0", "off", "f", "false", "n", "no", "1", "on", "t", "true", "y", "yes"}


def _string_accepts(schema: dict[str, Any], value: str) -> bool:
    if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        return False
    if schema.get("format") == "email":
        return _EMAIL.fullmatch(value) is not None
    if schema.get("format") == "uuid":
        try:
            uuid.UUID(value)
        except ValueError:
            return False
    return True


def _in_range(schema: dict[str, Any], number: int) -> bool:
    return bool(schema.get("minimum", number) <= number <= schema.get("maximum", number))


def _json_accepts(schema: dict[str, Any], value: Any) -> bool:
    """Whether a JSON value satisfies a (resolved) schema: the subset this document uses."""
    if "anyOf" in schema:
        return any(_json_accepts(branch, value) for branch in schema["anyOf"])
    if "enum" in schema:
        return isinstance(value, str) and value in schema["enum"]
    kind = schema.get("type")
    if kind == "string":
        return isinstance(value, str) and _string_accepts(schema, value)
    if kind == "integer":
        return type(value) is int and _in_range(schema, value)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    return kind is None


def _text_accepts(schema: dict[str, Any], value: str) -> bool:
    """Whether a path, query, header or form value (text) satisfies a schema."""
    if "anyOf" in schema:
        return any(_text_accepts(branch, value) for branch in schema["anyOf"])
    if "enum" in schema:
        return value in [str(item) for item in schema["enum"]]
    kind = schema.get("type")
    if kind == "integer":
        return _INTEGER.fullmatch(value) is not None and _in_range(schema, int(value))
    if kind == "boolean":
        return value.lower() in _BOOLEAN_WORDS
    if kind == "string":
        return _string_accepts(schema, value)
    return kind is None


def accepts(param: Param, bad: Bad) -> bool:
    if param.location == "json":
        return _json_accepts(param.schema, bad.value)
    return _text_accepts(param.schema, bad.value)


# --- valid values for everything that is not attacked ---------------------------------------------

# A well-formed password that is never the caller's, wherever an operation wants proof of identity
# (the token endpoint's password, ``current_password``). With the real one, a bad value in a
# sibling that happens to be acceptable ("99999999999999999999" is a valid new password) would
# really change the password or sign in; with this one the request ends at the check.
WRONG_PASSWORD = "not the password of anyone here"


@dataclass
class Account:
    id: str
    email: str
    headers: dict[str, str]


@dataclass
class World:
    admin: Account
    user: Account
    target: Account
    spare_session: str  # another session of the user: a real id for {session_id}
    client_id: str  # a registered OAuth client: a real id for {client_id}
    factor_id: str  # an authenticator enrolment of the user: a real id for {factor_id}

    def caller(self, op: Operation) -> Account | None:
        """Nobody for open operations; the user for its own account (``/me``); else the admin."""
        if not op.secured:
            return None
        return self.user if "me" in op.path.split("/") else self.admin

    def path_value(self, op: Operation, name: str) -> str:
        if name == "user_id":
            return self.target.id
        if name == "session_id":
            return self.spare_session
        if name == "client_id":
            return self.client_id
        if name == "factor_id":
            return self.factor_id
        pytest.fail(f"{op.label}: no valid value known for path parameter {{{name}}}; add one")


# Optional in the schema, yet needed for the request to be valid: a client with the default grant
# (authorization_code) must register a redirect URI.
SENT_WHEN_OPTIONAL = frozenset({"redirect_uris"})


def _valid_json(param: Param) -> Any:
    """A valid value for a parameter that is not attacked."""
    if param.name == "current_password":
        return WRONG_PASSWORD
    if "password" in param.name:
        return f"a fresh passphrase {uuid.uuid4().hex}"
    if param.schema.get("format") == "email":
        return unique_email("bad-input")
    if param.name == "token":
        return f"no-such-token-{uuid.uuid4().hex}"
    if param.name == "redirect_uris":
        return ["https://app.example.com/callback"]
    branches: list[dict[str, Any]] = param.schema.get("anyOf", [param.schema])
    schema = next((b for b in branches if b.get("type") != "null"), {})
    if "enum" in schema:
        return schema["enum"][0]
    if schema.get("type") == "boolean":
        return False
    if schema.get("type") == "integer":
        return schema.get("minimum", 1)
    return "x" * max(1, schema.get("minLength", 1))


def _valid_text(param: Param) -> str:
    value = _valid_json(param)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _form(op: Operation, world: World, attacked: str | None) -> dict[str, str]:
    names = {p.name for p in op.of("form")}
    if {"grant_type", "username", "password", "refresh_token"} <= names:
        # An OAuth2 token endpoint: every field is optional in the schema, RFC 6749 says which
        # ones each grant needs. A refresh token is read by its own grant only.
        if attacked == "refresh_token":
            return {"grant_type": "refresh_token"}
        return {"grant_type": "password", "username": world.user.email, "password": WRONG_PASSWORD}
    return {p.name: _valid_text(p) for p in op.of("form") if p.required}


# --- requests and what their answers must be ------------------------------------------------------

# nul: exactly 400; headers too large: exactly 431; stale: exactly 412; refused: a 4xx;
# either: a 2xx or a 4xx.
Expect = Literal["nul", "headers too large", "stale", "refused", "either"]


@dataclass
class Case:
    op: Operation
    param: Param | None  # the bad one (None: the request is bad as a whole)
    what: str  # what is bad, for the failure message
    url: str
    query: dict[str, str]
    headers: dict[str, bytes]
    content: bytes | None
    expect: Expect


def build_case(
    op: Operation,
    world: World,
    expect: Expect,
    target: Param | None = None,
    bad: Bad | None = None,
    what: str = "",
) -> Case:
    """The valid request for ``op``, with ``target`` (if any) set to ``bad``."""

    def value(param: Param, valid: Any) -> Any:
        return bad.value if bad is not None and param == target else valid

    def sent(param: Param) -> bool:
        return param.required or param == target or param.name in SENT_WHEN_OPTIONAL

    path = op.path
    for param in op.of("path"):
        text = value(param, world.path_value(op, param.name))
        path = path.replace(f"{{{param.name}}}", quote(text, safe=""))
    query = {p.name: value(p, _valid_text(p)) for p in op.of("query") if sent(p)}
    # Header values go out as UTF-8 bytes ("²" included); the service reads them as latin-1.
    headers = {p.name: value(p, _valid_text(p)).encode() for p in op.of("header") if sent(p)}
    caller = world.caller(op)
    for param in op.of("auth"):
        valid = caller.headers["Authorization"] if caller else None
        credentials = value(param, valid)
        if credentials is not None:
            headers[param.name] = credentials.encode()

    content: bytes | None = None
    fields = {
        p.name: bad.raw if bad is not None and p == target else json.dumps(_valid_json(p))
        for p in op.of("json")
        if sent(p)
    }
    if fields or (op.of("json") and op.body_required):
        members = ", ".join(f"{json.dumps(name)}: {raw}" for name, raw in fields.items())
        content = f"{{{members}}}".encode()
        headers["Content-Type"] = b"application/json"
    elif op.of("form"):
        form = _form(op, world, target.name if target else None)
        if target is not None and target.location == "form" and bad is not None:
            form[target.name] = bad.value
        content = urlencode(form).encode()
        headers["Content-Type"] = b"application/x-www-form-urlencoded"
    if not what and target is not None and bad is not None:
        what = f"{target.location} {target.name} = {bad.label}"
    return Case(op, target, what, path, query, headers, content, expect)


def expectation(op: Operation, param: Param, bad: Bad, open_to_anonymous: bool) -> Expect:
    if bad.has_nul:
        return "nul"
    if param.location in ("header", "auth") and len(bad.value.encode()) > MAX_HEADER_BYTES:
        return "headers too large"
    if param.location == "auth":
        # Made-up credentials are never valid: a secured operation refuses them, unless it answers
        # anonymous callers anyway (the health checks show statuses only). An open operation may
        # ignore them (registration) or refuse them (the token endpoint's Basic client id).
        return "either" if open_to_anonymous or not op.secured else "refused"
    # A value the schema accepts may be legitimately accepted, and the service may still refuse
    # it for its own reasons: a search for "²" or "٣" is a search (a 20,000-character one is over
    # the 200 allowed: refused), a full name "²" is a name, "99999999999999999999" a password for
    # a new account, 20 digits a User-Agent. What the schema refuses must be refused.
    return "either" if accepts(param, bad) else "refused"


async def send(
    client: httpx.AsyncClient, cases: list[Case], concurrency: int = CONCURRENCY
) -> list[httpx.Response]:
    """Every case, ``concurrency`` at a time; the answers in the order of ``cases``."""
    gate = asyncio.Semaphore(concurrency)

    async def one(case: Case) -> httpx.Response:
        async with gate:
            return await client.request(
                case.op.method,
                case.url,
                params=case.query,
                headers=[(name.encode(), value) for name, value in case.headers.items()],
                content=case.content,
            )

    return await asyncio.gather(*(one(case) for case in cases))


def problems(case: Case, response: httpx.Response, token_urls: set[str]) -> list[str]:
    """What is wrong with this answer to this case (nothing: an empty list)."""
    found = []
    status = response.status_code
    if status >= 500:
        found.append("a server error")
    elif case.expect == "nul" and status != 400:
        found.append("the request guard refuses a NUL with 400")
    elif case.expect == "headers too large" and status != 431:
        found.append("the request guard refuses oversized headers with 431")
    elif case.expect == "stale" and status != 412:
        found.append("an If-Match that names no version is a failed precondition, 412")
    elif case.expect == "refused" and not 400 <= status < 500:
        found.append("a value the operation cannot accept was not refused")
    elif not (200 <= status < 300 or 400 <= status < 500):
        found.append("neither accepted nor refused")
    if 400 <= status < 500:
        content_type = response.headers.get("content-type", "")
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            found.append(f"an error answered with no JSON object: {content_type!r}")
        elif content_type == PROBLEM_JSON:
            if body.get("status") != status or not body.get("title"):
                found.append("a problem document without its status and a title")
            # Validation errors must be about the bad parameter alone: if the valid values this
            # test sends were refused too, the bad one was never really tried.
            locs = [error.get("loc", []) for error in body.get("errors", [])]
            if case.param is not None and any(case.param.name not in loc for loc in locs):
                found.append(f"refused for other parameters too: {locs}")
        elif not (
            case.op.path in token_urls and content_type == "application/json" and "error" in body
        ):
            found.append(f"an error answered as {content_type!r}, not {PROBLEM_JSON}")
    if "Traceback" in response.text:
        found.append("a traceback in the answer")
    return found


def describe(case: Case, response: httpx.Response, why: list[str]) -> str:
    return (
        f"{case.op.method} {case.url[:120]} [{case.what}] -> {response.status_code}: "
        f"{'; '.join(why)}; answer: {response.text[:300]}"
    )


def _log_problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{record.levelname} {record.name}: {record.getMessage()[:300]}"
        for record in caplog.records
        if (record.levelno >= logging.ERROR and record.name.startswith("src"))
        or record.exc_info
        or "Traceback" in record.getMessage()
    ]


@contextlib.asynccontextmanager
async def _reporting_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the running app that gets a server error as the 500 the app sends, so that
    the failure names the request, instead of the exception being raised into the test."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


# --- every parameter of every operation -----------------------------------------------------------


async def _world(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> World:
    me = await client.get(f"{API}/users/me", headers=admin_headers)
    assert me.status_code == 200, me.text
    user, user_headers = await signed_in(client)
    spare = await login(client, user["email"])
    target = await admin_creates(client, admin_headers, full_name="Target")
    registered = await client.post(
        f"{API}/clients",
        json={"name": "Bad input", "redirect_uris": ["https://app.example.com/callback"]},
        headers=admin_headers,
    )
    assert registered.status_code == 201, registered.text
    enrolment = await client.post(f"{API}/users/me/mfa/totp", json={}, headers=user_headers)
    assert enrolment.status_code == 201, enrolment.text
    return World(
        admin=Account(me.json()["id"], me.json()["email"], admin_headers),
        user=Account(user["id"], user["email"], user_headers),
        target=Account(target["id"], target["email"], {}),
        spare_session=session_of(spare),
        client_id=registered.json()["client_id"],
        factor_id=enrolment.json()["factor_id"],
    )


async def _probe_gets(client: httpx.AsyncClient, world: World, ops: list[Operation]) -> set[str]:
    """Check that the valid GET requests this test builds succeed (so its valid values are), and
    return the secured GETs that answer a caller without credentials with a 2xx anyway.

    Only GETs are sent valid: a valid request with another method might change something.
    """
    gets = [op for op in ops if op.method == "GET"]
    valid = await send(client, [build_case(op, world, "either") for op in gets], concurrency=1)
    for op, answer in zip(gets, valid, strict=True):
        assert answer.is_success, (op.label, answer.status_code, answer.text)
    secured = [op for op in gets if op.secured]
    anonymous = [build_case(op, world, "either") for op in secured]
    for case in anonymous:
        del case.headers["Authorization"]
    answers = await send(client, anonymous, concurrency=1)
    return {op.label for op, answer in zip(secured, answers, strict=True) if answer.is_success}


def _parameter_cases(ops: list[Operation], world: World, open_ops: set[str]) -> list[Case]:
    cases = []
    for op in ops:
        for param in op.params:
            for bad in bad_values(param):
                expect = expectation(op, param, bad, op.label in open_ops)
                if expect == "either" and op.destroys:
                    # Bad values only: with everything else valid, one that may be acceptable
                    # (a User-Agent of 20 digits, a current password "²" where an admin needs
                    # none) would delete the target or end a real session.
                    continue
                cases.append(build_case(op, world, expect, param, bad))
    return cases


def _request_cases(ops: list[Operation], world: World) -> list[Case]:
    """Requests that are bad as a whole, for every operation they apply to."""
    cases = []
    for op in ops:
        case = build_case(op, world, "headers too large", what="a 100 KB Authorization")
        case.headers["Authorization"] = b"Bearer " + b"A" * 100_000
        cases.append(case)
        if op.method == "PATCH":
            # A version of 5,000 digits, bare, quoted and weak, is no version of anything (and
            # no int() of it may be tried); an operation that does not honour If-Match may
            # ignore it.
            honours = any(p.name.lower() == "if-match" for p in op.of("header"))
            for tag in (FIVE_THOUSAND_DIGITS, f'"{FIVE_THOUSAND_DIGITS}"', f'W/"{"9" * 5000}"'):
                what = f"If-Match of 5,000 digits ({tag[:3]}...)"
                case = build_case(op, world, "stale" if honours else "either", what=what)
                case.headers["If-Match"] = tag.encode()
                cases.append(case)
        if op.of("json"):
            for label, body in WHOLE_BODIES:
                case = build_case(op, world, "refused", what=f"the body is {label}")
                case.content = body
                cases.append(case)
    return cases


async def _accounts(client: httpx.AsyncClient, world: World) -> dict[str, dict[str, Any]]:
    accounts = (world.admin, world.user, world.target)
    return {a.id: await fetch(client, world.admin.headers, a.id) for a in accounts}


def _accepted_changes(
    cases: list[Case], answers: list[httpx.Response]
) -> dict[str, dict[str, list[Any]]]:
    """user id -> field -> the values accepted PATCHes gave it (as their answers tell)."""
    accepted: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for case, answer in zip(cases, answers, strict=True):
        if case.op.method == "PATCH" and answer.is_success and case.param is not None:
            user = answer.json()
            accepted[user["id"]][case.param.name].append(user.get(case.param.name))
    return accepted


def _unexpected_changes(
    before: dict[str, dict[str, Any]],
    after: dict[str, dict[str, Any]],
    accepted: dict[str, dict[str, list[Any]]],
) -> list[str]:
    found = []
    for user_id, old in before.items():
        new, changes = after[user_id], accepted.get(user_id, {})
        for name in sorted(PUBLIC_FIELDS):
            if old[name] == new[name] or new[name] in changes.get(name, []):
                continue
            if name in ("updated_at", "version") and changes:
                continue
            found.append(f"{user_id} {name}: {old[name]!r} -> {new[name]!r}")
    return found


@pytest.mark.timeout(300)
async def test_bad_input_anywhere_is_refused_and_changes_nothing(
    admin_app: AdminApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app, _, admin_headers = admin_app
    settings: Settings = app.state.settings
    assert settings.MAX_REQUEST_HEADER_BYTES == MAX_HEADER_BYTES
    doc = app.openapi()
    ops = operations(doc)
    token_urls = token_endpoints(doc)
    # The test must not pass on an empty or truncated document.
    assert len(ops) >= 20, [op.label for op in ops]
    assert sum(len(op.params) for op in ops) >= 100
    assert token_urls, "no OAuth2 token endpoint declared"

    async with _reporting_client(app) as client:
        world = await _world(client, admin_headers)
        before = await _accounts(client, world)
        open_ops = await _probe_gets(client, world, ops)
        cases = _parameter_cases(ops, world, open_ops) + _request_cases(ops, world)
        assert len(cases) >= 1000, len(cases)
        for case in cases:
            assert len(case.content or b"") < settings.MAX_REQUEST_BODY_BYTES, case.what
        serial = [case for case in cases if case.op.one_at_a_time]
        concurrent = [case for case in cases if not case.op.one_at_a_time]
        cases = concurrent + serial
        answers = await send(client, concurrent) + await send(client, serial, concurrency=1)

        failures = [
            describe(case, answer, why)
            for case, answer in zip(cases, answers, strict=True)
            if (why := problems(case, answer, token_urls))
        ]
        assert not failures, f"{len(failures)} of {len(cases)} requests:\n" + "\n".join(failures)
        assert not _log_problems(caplog), "\n".join(_log_problems(caplog))

        after = await _accounts(client, world)
        changes = _unexpected_changes(before, after, _accepted_changes(cases, answers))
        assert not changes, changes
        for account in (world.admin, world.user):
            still = await client.get(f"{API}/users/me", headers=account.headers)
            assert still.status_code == 200, still.text
        sessions = await client.get(f"{API}/users/me/sessions", headers=world.user.headers)
        assert world.spare_session in {s["id"] for s in sessions.json()}


# --- a sign-in behind a trusted proxy -------------------------------------------------------------

# 10,000 characters of client address, from a proxy the service trusts (TRUSTED_PROXIES above).
FORWARDED_10K: tuple[tuple[str, str, str], ...] = (
    ("digits", "X-Forwarded-For", "9" * 10_000),
    ("770 addresses", "X-Forwarded-For", ", ".join(["203.0.113.7"] * 770)),
    ("commas", "X-Forwarded-For", "," * 10_000),
    ("an IPv6 zone", "X-Forwarded-For", "fe80::1%" + "a" * 9_992),
    ("an IPv6 zone and a port", "X-Forwarded-For", "[fe80::1%" + "a" * 9_986 + "]:443"),
    ("589 addresses", "Forwarded", ", ".join(["for=203.0.113.7"] * 589)),
    ("an IPv6 zone", "Forwarded", 'for="[fe80::1%' + "a" * 9_984 + ']:443"'),
)


async def test_sign_in_with_a_huge_forwarded_for_header_still_works(
    admin_app: AdminApp, caplog: pytest.LogCaptureFixture
) -> None:
    """The address headers are parsed, or set aside when they name no address, and a sign-in
    with the right password succeeds whatever they hold: never a 500."""
    caplog.set_level(logging.INFO)
    app, _, _ = admin_app
    async with _reporting_client(app) as client:
        user, _ = await signed_in(client)
        form = {"grant_type": "password", "username": user["email"], "password": PASSWORD}
        failures = []
        for label, name, value in FORWARDED_10K:
            assert 10_000 <= len(value) < 10_100
            response = await client.post(f"{API}/auth/login", data=form, headers={name: value})
            if response.status_code != 200 or "access_token" not in response.json():
                failures.append(
                    f"POST {API}/auth/login with {name}: 10,000 characters ({label}) -> "
                    f"{response.status_code}: {response.text[:300]}"
                )
    assert not failures, "\n".join(failures)
    assert not _log_problems(caplog), "\n".join(_log_problems(caplog))
