"""Bad input into every parameter of every operation: NUL characters, huge numbers, Unicode
digits, over-long values and wrong JSON types.

The operations and their parameters are read from the app's own OpenAPI document (path, query and
header parameters, the bearer token of secured operations, the fields of JSON and form bodies), so
a route added tomorrow is attacked without anyone editing this file. Each request makes exactly one
parameter bad and keeps every other one valid (the target user's id, a real session id, a fresh
email address), so the bad value is what the service has to deal with, not a missing sibling.

What must hold for every answer:

- never a 5xx, and no ERROR record or traceback in the log: PostgreSQL cannot store NUL in text,
  Python refuses to turn 5,000 digits into an int, "²".isdigit() is true but int("²") fails — each
  of these used to end in a 500 somewhere;
- a 4xx for a value the operation's schema does not accept (a 2xx only where the value is
  legitimately acceptable, e.g. a full name of "²"), as ``application/problem+json`` — except the
  OAuth2 token endpoint, whose own errors are RFC 6749 ``{"error": ...}`` JSON;
- exactly 400 for a NUL and 431 for headers over ``MAX_REQUEST_HEADER_BYTES``: the request guard
  (src/api/middleware.py) answers those before any route runs;
- and nothing changes: the admin, the user and the target read the same before and after, apart
  from a full name an accepted PATCH set (the only legitimately acceptable change a request here
  can make), and their sessions still work.

Requests are sent 20 at a time; QUICK_SETTINGS make password hashing cheap, so the whole module
takes seconds, not minutes.
"""

from __future__ import annotations

import asyncio
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
from tests.auth_support import (
    QUICK_SETTINGS,
    forget_in_process_login_attempts,
    session_of,
)
from tests.helpers import PASSWORD, login, signed_in, unique_email
from tests.users_support import API, PUBLIC_FIELDS, admin_creates, fetch

AdminApp = tuple[FastAPI, httpx.AsyncClient, dict[str, str]]

SETTINGS: dict[str, Any] = {
    **QUICK_SETTINGS,
    # Hundreds of requests here carry a wrong current password (see WRONG_PASSWORD): the lock-out
    # per (account, address) would otherwise answer 429 to the rest, and to the valid sign-in below.
    "LOCKOUT_FAILURE_THRESHOLD": 100_000,
    # The in-process client connects from 127.0.0.1; trusting it makes the service actually parse
    # the forwarded-for headers of the sign-in with an X-Forwarded-For of 10,000 characters.
    "TRUSTED_PROXIES": "127.0.0.1",
    # 20 requests at a time on a loaded 2-core CI machine may wait for a pooled connection longer
    # than the default 2 s; a 503 from that would be the test's doing, not the input's.
    "DATABASE_POOL_TIMEOUT": 30.0,
}
CONCURRENCY = 20


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
# A valid-looking password that is never the caller's: sent wherever an operation wants a proof of
# identity (the token endpoint's password, ``current_password``). With the real one, a bad value in
# a sibling that happens to be acceptable ("99999999999999999999" is a valid new password) would
# really change the password or end sessions; with this one nothing can.
WRONG_PASSWORD = "not the password of anyone here"

Location = Literal["path", "query", "header", "auth", "json", "form"]


@dataclass(frozen=True)
class Bad:
    """One bad value: ``value`` is what the service receives (text for path, query, header and
    form; a JSON value for JSON bodies), ``raw`` its JSON text (5,000 digits have no json.dumps)."""

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
    values = [_text("NUL", NUL)]
    if param.emailish:
        values.append(_text("NUL in an email", NUL_EMAIL))
    values += [_text(f"{label} as text", digits) for label, digits in HUGE_INTEGERS]
    values += [_text(label, digit) for label, digit in UNICODE_DIGITS]
    values.append(_text("20,000 characters", LONG))
    if param.emailish:
        values.append(_text("over-long email", LONG_EMAIL))
    if param.location != "json":
        return values
    # A JSON body can also carry the numbers as numbers, and values of the wrong type.
    values.append(Bad("5,000 digits as a number", 10**5000 - 1, FIVE_THOUSAND_DIGITS))
    values += [
        Bad(f"{label} as a number", int(digits), digits) for label, digits in HUGE_INTEGERS[1:]
    ]
    values += [
        Bad("a list", ["a"], '["a"]'),
        Bad("an object", {"a": "b"}, '{"a": "b"}'),
        Bad("null", None, "null"),
    ]
    if not _json_accepts(param.schema, True):  # true is no bad value for a boolean
        values.append(Bad("true", True, "true"))
    return values


# --- what the schema accepts ----------------------------------------------------------------------

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_INTEGER = re.compile(r"-?[0-9]{1,4000}")  # ASCII digits only, as OpenAPI means "integer"
_BOOLEAN_WORDS = {"0", "off", "f", "false", "n", "no", "1", "on", "t", "true", "y", "yes"}


def _string_accepts(schema: dict[str, Any], value: str) -> bool:
    if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
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
    return schema.get("minimum", number) <= number <= schema.get("maximum", number)


def _json_accepts(schema: dict[str, Any], value: Any) -> bool:
    """Whether a JSON value satisfies the (resolved) schema; the subset OpenAPI here uses."""
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
    """Whether a path, query, header or form value satisfies the schema (it arrives as text)."""
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


# --- the operations, from the OpenAPI document ----------------------------------------------------


@dataclass(frozen=True)
class Param:
    location: Location
    name: str
    schema: dict[str, Any] = field(hash=False)
    required: bool
    description: str = ""

    @property
    def emailish(self) -> bool:
        """An email address travels here (the token endpoint's ``username`` is one)."""
        return self.schema.get("format") == "email" or "email" in (
            self.name + " " + self.description
        ).lower().replace("_", " ")

    def accepts(self, bad: Bad) -> bool:
        if self.location == "json":
            return _json_accepts(self.schema, bad.value)
        return _text_accepts(self.schema, bad.value)


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    params: tuple[Param, ...]
    secured: bool
    body_required: bool

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"

    def of(self, location: Location) -> list[Param]:
        return [p for p in self.params if p.location == location]


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
    """The object in a body schema that may also be null (``anyOf: [object, null]``)."""
    for branch in schema.get("anyOf", [schema]):
        if "properties" in branch:
            found: dict[str, Any] = branch
            return found
    return {"properties": {}}


def operations(doc: dict[str, Any]) -> list[Operation]:
    found = []
    for path, item in doc["paths"].items():
        for method, spec in item.items():
            secured = bool(spec.get("security", doc.get("security")))
            params = [
                Param(
                    location=p["in"],
                    name=p["name"],
                    schema=_resolve(doc, p.get("schema", {})),
                    required=bool(p.get("required")),
                    description=p.get("description", ""),
                )
                for p in spec.get("parameters", [])
            ]
            if secured:
                # The bearer token is a parameter of every secured operation too.
                params.append(Param("auth", "Authorization", {"type": "string"}, required=True))
            body = spec.get("requestBody", {})
            for media, location in (
                ("application/json", "json"),
                ("application/x-www-form-urlencoded", "form"),
            ):
                if media not in body.get("content", {}):
                    continue
                schema = _object_schema(_resolve(doc, body["content"][media].get("schema", {})))
                required = set(schema.get("required", []))
                params += [
                    Param(
                        location=location,  # type: ignore[arg-type]
                        name=name,
                        schema=prop,
                        required=name in required,
                        description=prop.get("description", ""),
                    )
                    for name, prop in schema["properties"].items()
                ]
            found.append(
                Operation(
                    method=method.upper(),
                    path=path,
                    params=tuple(params),
                    secured=secured,
                    body_required=bool(body.get("required")),
                )
            )
    return found


def token_endpoints(doc: dict[str, Any]) -> set[str]:
    """The OAuth2 token URLs the document declares (their errors are RFC 6749, not RFC 9457)."""
    urls = set()
    for scheme in doc.get("components", {}).get("securitySchemes", {}).values():
        for flow in scheme.get("flows", {}).values():
            if "tokenUrl" in flow:
                urls.add(flow["tokenUrl"])
    return urls


# --- valid values for everything that is not attacked ---------------------------------------------


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

    def caller(self, op: Operation) -> Account | None:
        """Who sends a request: nobody for open operations; the user for its own account
        (``/me``) and for every DELETE; the admin for the rest.

        DELETE goes out as the user, on itself, so that a bad value never meets a request that
        would otherwise succeed: an admin's DELETE of the target ignores the body, and a bad
        ``current_password`` that happens to be well-formed would delete the target.
        """
        if not op.secured:
            return None
        if op.method == "DELETE" or "me" in op.path.split("/"):
            return self.user
        return self.admin

    def path_value(self, op: Operation, name: str) -> str:
        if name == "user_id":
            caller = self.caller(op)
            return caller.id if op.method == "DELETE" and caller else self.target.id
        if name == "session_id":
            return self.spare_session
        pytest.fail(f"{op.label}: no valid value known for path parameter {{{name}}}; add one")


def _valid_json(param: Param) -> Any:
    """A valid value for a body field that is not attacked."""
    if param.name == "current_password":
        return WRONG_PASSWORD
    if "password" in param.name:
        return f"a fresh passphrase {uuid.uuid4().hex}"
    if param.schema.get("format") == "email":
        return unique_email("bad-input")
    if param.name == "token":
        return f"no-such-token-{uuid.uuid4().hex}"
    schema = next(
        (b for b in param.schema.get("anyOf", [param.schema]) if b.get("type") != "null"), {}
    )
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


def _form_fill(op: Operation, world: World, attacked: str | None) -> dict[str, str]:
    names = {p.name for p in op.of("form")}
    if {"grant_type", "username", "password", "refresh_token"} <= names:
        # An OAuth2 token endpoint: every field is optional in the schema; RFC 6749 says which
        # ones each grant needs. A refresh token is only read by its own grant.
        if attacked == "refresh_token":
            return {"grant_type": "refresh_token"}
        return {"grant_type": "password", "username": world.user.email, "password": WRONG_PASSWORD}
    return {p.name: _valid_text(p) for p in op.of("form") if p.required}


# --- requests -------------------------------------------------------------------------------------

Expect = Literal["nul", "headers too large", "refused", "either"]


@dataclass
class Case:
    op: Operation
    param: Param | None  # the bad one (None: the request is bad as a whole, e.g. its headers)
    what: str  # which parameter is bad, and how: for the failure message
    method: str
    url: str
    params: dict[str, str]
    headers: dict[str, bytes]
    content: bytes | None
    expect: Expect


def build_case(
    op: Operation,
    world: World,
    target: Param | None,
    bad: Bad | None,
    expect: Expect,
    extra_headers: dict[str, bytes] | None = None,
    what: str = "",
) -> Case:
    """The valid request for ``op`` with ``target`` (if any) set to ``bad``."""

    def attacked(param: Param) -> bool:
        return target is not None and param == target and bad is not None

    path = op.path
    for param in op.of("path"):
        value = bad.value if attacked(param) and bad else world.path_value(op, param.name)
        path = path.replace(f"{{{param.name}}}", quote(value, safe=""))
    query = {
        p.name: (bad.value if bad and attacked(p) else _valid_text(p))
        for p in op.of("query")
        if attacked(p) or p.required
    }
    headers: dict[str, bytes] = {}
    for param in op.of("header"):
        if attacked(param) and bad:
            headers[param.name] = bad.value.encode("utf-8")
        elif param.required:
            headers[param.name] = _valid_text(param).encode()
    caller = world.caller(op)
    auth = next(iter(op.of("auth")), None)
    if auth is not None and attacked(auth) and bad:
        headers["Authorization"] = b"Bearer " + bad.value.encode("utf-8")
    elif caller is not None:
        headers["Authorization"] = caller.headers["Authorization"].encode()
    headers.update(extra_headers or {})

    content: bytes | None = None
    if op.of("json"):
        fields = {
            p.name: (bad.raw if bad and attacked(p) else json.dumps(_valid_json(p)))
            for p in op.of("json")
            if attacked(p) or p.required
        }
        if fields or op.body_required:
            text = "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}"
            content = text.encode()
            headers["Content-Type"] = b"application/json"
    elif op.of("form"):
        form = _form_fill(op, world, target.name if target else None)
        if target is not None and target.location == "form" and bad:
            form[target.name] = bad.value
        content = urlencode(form).encode()
        headers["Content-Type"] = b"application/x-www-form-urlencoded"
    label = what or (f"{target.location} {target.name} = {bad.label}" if target and bad else "")
    return Case(op, target, label, op.method, path, query, headers, content, expect)


def expectation(op: Operation, param: Param, bad: Bad, open_to_anonymous: bool) -> Expect:
    if bad.has_nul:
        return "nul"
    if param.location in ("header", "auth") and len(bad.value.encode()) > MAX_HEADER_BYTES:
        return "headers too large"
    if op.method == "DELETE":
        # Every DELETE here is refused by construction (see World.caller): a 2xx deleted something.
        return "refused"
    if param.location == "auth":
        # A made-up token is never valid; only an operation that answers anonymous callers (the
        # health checks) may answer it, the same way.
        return "either" if open_to_anonymous else "refused"
    # A value the schema accepts may be legitimately accepted (a full name "²", a search "٣", a
    # 20-digit password for a new account); the service may still refuse it for its own reasons.
    return "either" if param.accepts(bad) else "refused"


MAX_HEADER_BYTES = 16384  # Settings.MAX_REQUEST_HEADER_BYTES; checked against the app's below


async def send(client: httpx.AsyncClient, cases: list[Case]) -> list[httpx.Response]:
    """Every case, CONCURRENCY at a time, answers in the order of ``cases``."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(case: Case) -> httpx.Response:
        async with gate:
            return await client.request(
                case.method,
                case.url,
                params=case.params,
                headers=case.headers,
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
        found.append("the request guard should refuse a NUL with 400")
    elif case.expect == "headers too large" and status != 431:
        found.append("the request guard should refuse oversized headers with 431")
    elif case.expect == "refused" and not 400 <= status < 500:
        found.append("a value the operation cannot accept was not refused")
    elif case.expect == "either" and not (200 <= status < 300 or 400 <= status < 500):
        found.append("neither accepted nor refused")
    if 400 <= status < 500:
        content_type = response.headers.get("content-type", "")
        if content_type == PROBLEM_JSON:
            body = response.json()
            if body.get("status") != status or not body.get("title"):
                found.append("a problem document without the right status and a title")
        elif not (
            case.op.path in token_urls
            and content_type == "application/json"
            and "error" in response.json()
        ):
            found.append(f"an error answered as {content_type!r}, not {PROBLEM_JSON}")
    if "Traceback" in response.text:
        found.append("a traceback in the answer")
    return found


def describe(case: Case, response: httpx.Response, why: list[str]) -> str:
    return (
        f"{case.method} {case.url[:120]} [{case.what}] -> {response.status_code}: "
        f"{'; '.join(why)}; answer: {response.text[:300]}"
    )


# --- the test -------------------------------------------------------------------------------------


async def _world(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> World:
    me = await client.get(f"{API}/users/me", headers=admin_headers)
    assert me.status_code == 200, me.text
    user, user_headers = await signed_in(client)
    spare = await login(client, user["email"])
    target = await admin_creates(client, admin_headers, full_name="Target")
    return World(
        admin=Account(me.json()["id"], me.json()["email"], admin_headers),
        user=Account(user["id"], user["email"], user_headers),
        target=Account(target["id"], target["email"], {}),
        spare_session=session_of(spare),
    )


async def _anonymous_answers(
    client: httpx.AsyncClient, world: World, ops: list[Operation]
) -> set[str]:
    """The secured GET operations that answer a caller without a token with a 2xx anyway.

    Only GETs are asked: a valid anonymous request to any other method might change something.
    """
    gets = [op for op in ops if op.secured and op.method == "GET"]
    cases = [build_case(op, world, None, None, "either") for op in gets]
    for case in cases:
        del case.headers["Authorization"]
    answers = await send(client, cases)
    return {op.label for op, answer in zip(gets, answers, strict=True) if answer.is_success}


def _attack_cases(ops: list[Operation], world: World, open_ops: set[str]) -> list[Case]:
    cases = []
    for op in ops:
        for param in op.params:
            for bad in bad_values(param):
                expect = expectation(op, param, bad, op.label in open_ops)
                cases.append(build_case(op, world, param, bad, expect))
    return cases


def _extra_cases(ops: list[Operation], world: World) -> list[Case]:
    cases = []
    for op in ops:
        # 100 KB of Authorization, on every operation: refused before any work.
        huge = {"Authorization": b"Bearer " + b"A" * 100_000}
        cases.append(
            build_case(op, world, None, None, "headers too large", huge, "100 KB Authorization")
        )
        if op.method == "PATCH":
            # A version of 5,000 digits, bare, quoted and weak: never a version (412 where the
            # operation honours If-Match), never int() of it.
            expect: Expect = "refused" if op.of("header") else "either"
            for tag in (FIVE_THOUSAND_DIGITS, f'"{FIVE_THOUSAND_DIGITS}"', f'W/"{"9" * 5000}"'):
                if_match = {"If-Match": tag.encode()}
                what = f"If-Match of 5,000 digits ({tag[:3]}...)"
                cases.append(build_case(op, world, None, None, expect, if_match, what))
    return cases


def _log_problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{record.levelname} {record.name}: {record.getMessage()}"
        for record in caplog.records
        if (record.levelno >= logging.ERROR and record.name.startswith("src"))
        or record.exc_info
        or "Traceback" in record.getMessage()
    ]


async def _accounts(client: httpx.AsyncClient, world: World) -> dict[str, dict[str, Any]]:
    accounts = (world.admin, world.user, world.target)
    return {a.id: await fetch(client, world.admin.headers, a.id) for a in accounts}


def _changes_allowed(
    cases: list[Case], answers: list[httpx.Response]
) -> dict[str, dict[str, list[Any]]]:
    """For each account, the values an accepted PATCH gave its fields (user id -> field -> values).

    A PATCH whose bad-looking value was legitimately acceptable ("²" is a fine full name) did
    change the account; the answer says to what.
    """
    allowed: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for case, answer in zip(cases, answers, strict=True):
        if case.method == "PATCH" and answer.is_success and case.param is not None:
            user = answer.json()
            allowed[user["id"]][case.param.name].append(user.get(case.param.name))
    return allowed


def _unexpected_changes(
    before: dict[str, dict[str, Any]],
    after: dict[str, dict[str, Any]],
    allowed: dict[str, dict[str, list[Any]]],
) -> list[str]:
    found = []
    for user_id, old in before.items():
        new, accepted = after[user_id], allowed.get(user_id, {})
        for name in sorted(PUBLIC_FIELDS):
            if old[name] == new[name]:
                continue
            if name in ("updated_at", "version") and accepted:
                continue
            if new[name] in accepted.get(name, []):
                continue
            found.append(f"{user_id} {name}: {old[name]!r} -> {new[name]!r}")
    return found


@pytest.mark.timeout(300)
async def test_bad_input_never_breaks_or_changes_anything(
    admin_app: AdminApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app, client, admin_headers = admin_app
    assert app.state.settings.MAX_REQUEST_HEADER_BYTES == MAX_HEADER_BYTES
    doc = app.openapi()
    ops = operations(doc)
    token_urls = token_endpoints(doc)
    # Not an empty or truncated document: the test must not pass on nothing.
    assert len(ops) >= 20, [op.label for op in ops]
    assert sum(len(op.params) for op in ops) >= 40
    assert token_urls, "no OAuth2 token endpoint declared"

    world = await _world(client, admin_headers)
    before = await _accounts(client, world)
    open_ops = await _anonymous_answers(client, world, ops)

    cases = _attack_cases(ops, world, open_ops) + _extra_cases(ops, world)
    for case in cases:
        assert case.content is None or len(case.content) < app.state.settings.MAX_REQUEST_BODY_BYTES
    answers = await send(client, cases)
    import sys
    for c, a in zip(cases, answers):
        if a.status_code >= 400:
            try: b = a.json()
            except Exception: b = a.text
            if isinstance(b, dict):
                b = {k: v for k, v in b.items() if k in ("error", "error_description", "detail", "errors", "title")}
            print("ANS", c.op.label, "|", c.what, "|", a.status_code, a.headers.get("content-type"), "|", str(b)[:400], file=sys.stderr)

    failures = [
        describe(case, answer, why)
        for case, answer in zip(cases, answers, strict=True)
        if (why := problems(case, answer, token_urls))
    ]
    assert not failures, f"{len(failures)} of {len(cases)} requests:\n" + "\n".join(failures)
    assert not _log_problems(caplog), "\n".join(_log_problems(caplog))

    after = await _accounts(client, world)
    changes = _unexpected_changes(before, after, _changes_allowed(cases, answers))
    assert not changes, changes
    for account in (world.admin, world.user):
        still = await client.get(f"{API}/users/me", headers=account.headers)
        assert still.status_code == 200, still.text
    sessions = await client.get(f"{API}/users/me/sessions", headers=world.user.headers)
    assert world.spare_session in {s["id"] for s in sessions.json()}


async def test_sign_in_with_a_huge_forwarded_for_header_still_works(admin_app: AdminApp) -> None:
    """10,000 characters of X-Forwarded-For (or Forwarded) from a trusted proxy: parsed or set
    aside, never a 500, and the sign-in with the right password succeeds."""
    _, client, _ = admin_app
    user, _ = await signed_in(client)
    addresses = ", ".join(["203.0.113.7"] * 770)
    headers: list[dict[str, str]] = [
        {"X-Forwarded-For": "9" * 10_000},
        {"X-Forwarded-For": addresses},
        {"X-Forwarded-For": "," * 10_000},
        {"Forwarded": ", ".join(["for=203.0.113.7"] * 589)},
    ]
    for extra in headers:
        assert 10_000 <= len(next(iter(extra.values()))) < 10_100
        response = await client.post(
            f"{API}/auth/login",
            data={"grant_type": "password", "username": user["email"], "password": PASSWORD},
            headers=extra,
        )
        assert response.status_code == 200, (next(iter(extra)), response.text)
        assert response.json()["access_token"]
