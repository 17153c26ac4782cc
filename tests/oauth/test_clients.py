"""OAuth clients: the admin API, the registration rules, events, deletion, client authentication,
redirect URI matching, and the command line (``python -m src clients``).

Against real PostgreSQL and Redis: tests read the rows, the outbox and the sessions directly to
check what was stored, not only what was answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
from fastapi import FastAPI
from jsonschema import Draft202012Validator
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.app.container import app_services
from src.config.settings import Settings
from src.db.models import AuthorizationCode, OAuthClient, OAuthConsent, OutboxEvent, UserSession
from src.db.types import utcnow
from src.errors import InvalidInput, OAuthError
from src.oauth.clients import (
    CONSOLE_CLIENT_ID,
    GRANT_TYPES,
    SCOPES,
    authenticate_client,
    check_registration,
    post_logout_redirect_allowed,
    redirect_uri_allowed,
)
from src.oauth.schemas import GrantType, Scope
from src.security.tokens import hash_token
from tests.support.app import bearer, login, register
from tests.support.auth import (
    API,
    QUICK_SETTINGS,
    assert_problem,
    assert_unauthenticated,
    session_of,
)

AdminApp = tuple[FastAPI, httpx.AsyncClient, dict[str, str]]

CLIENTS = f"{API}/clients"
ROOT = Path(__file__).resolve().parents[2]
EVENTS_DIR = ROOT / "docs" / "events"
PUBLIC_FIELDS = {
    "id",
    "client_id",
    "name",
    "client_type",
    "redirect_uris",
    "post_logout_redirect_uris",
    "grant_types",
    "scopes",
    "first_party",
    "created_at",
    "updated_at",
    "version",
}
CALLBACK = "https://app.example.com/callback"


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**QUICK_SETTINGS, **overrides})

    return factory


def _sessions(app: FastAPI) -> async_sessionmaker[AsyncSession]:
    maker: async_sessionmaker[AsyncSession] = app_services(app).sessionmaker
    return maker


async def _client_row(app: FastAPI, client_id: str) -> OAuthClient | None:
    async with _sessions(app)() as db:
        query = select(OAuthClient).where(OAuthClient.client_id == client_id)
        return (await db.execute(query)).scalar_one_or_none()


async def _counts(app: FastAPI) -> tuple[int, int]:
    """(clients, outbox rows): what a refused request must leave as it was."""
    async with _sessions(app)() as db:
        clients = await db.scalar(select(func.count()).select_from(OAuthClient))
        events = await db.scalar(select(func.count()).select_from(OutboxEvent))
    return int(clients or 0), int(events or 0)


async def _events(app: FastAPI, client_row_id: str) -> list[OutboxEvent]:
    async with _sessions(app)() as db:
        query = (
            select(OutboxEvent)
            .where(OutboxEvent.aggregate_id == uuid.UUID(client_row_id))
            .order_by(OutboxEvent.position)
        )
        return list((await db.execute(query)).scalars().all())


async def _create(
    client: httpx.AsyncClient, admin: dict[str, str], **fields: Any
) -> dict[str, Any]:
    fields.setdefault("name", "Example App")
    fields.setdefault("redirect_uris", [CALLBACK])
    response = await client.post(CLIENTS, json=fields, headers=admin)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _schema_problems(row: OutboxEvent) -> list[str]:
    schema = json.loads((EVENTS_DIR / f"{row.type}.schema.json").read_text())
    checker = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    return [error.message for error in checker.iter_errors(row.payload)]


# --- who may call ---------------------------------------------------------------------------------

ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "", {"name": "Nope", "redirect_uris": [CALLBACK]}),
    ("GET", "", None),
    ("GET", "/{client_id}", None),
    ("PATCH", "/{client_id}", {"name": "Renamed"}),
    ("DELETE", "/{client_id}", None),
    ("POST", "/{client_id}/secret", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
async def test_only_administrators_may_call_the_client_api(
    admin_app: AdminApp, method: str, path: str, body: dict[str, Any] | None
) -> None:
    app, client, admin = admin_app
    existing = await _create(client, admin, client_id="kept-client")
    user = await register(client)
    user_headers = bearer(await login(client, user["email"]))
    url = CLIENTS + path.format(client_id="kept-client")
    before = await _counts(app)

    anonymous = await client.request(method, url, json=body)
    assert_unauthenticated(anonymous)
    refused = await client.request(method, url, json=body, headers=user_headers)
    assert_problem(refused, 403)

    assert await _counts(app) == before
    row = await _client_row(app, "kept-client")
    assert row is not None and row.name == existing["name"] and row.version == 1


async def test_openapi_documents_every_client_operation_and_its_problems(
    app_client: httpx.AsyncClient,
) -> None:
    spec = (await app_client.get(f"{API}/openapi.json")).json()
    operations = {
        (method.upper(), path.removeprefix(CLIENTS)): operation
        for path, item in spec["paths"].items()
        if path.startswith(CLIENTS)
        for method, operation in item.items()
    }
    assert set(operations) == {(method, path) for method, path, _ in ROUTES}
    for key, operation in operations.items():
        assert operation["tags"] == ["clients"] and operation.get("security"), key
        codes = {int(code) for code in operation["responses"]}
        assert {401, 403, 422} <= codes, key
        for code in codes - {200, 201, 204}:
            content = operation["responses"][str(code)]["content"]
            assert set(content) == {"application/problem+json"}, (key, code)
    schemas = spec["components"]["schemas"]
    for name in ("ClientPublic", "ClientWithSecret", "ClientsPage"):
        assert "secret_hash" not in json.dumps(schemas[name]), name
    assert "client_secret" not in schemas["ClientPublic"]["properties"]
    create = schemas["ClientCreate"]
    assert create["required"] == ["name"] and create["additionalProperties"] is False


# --- the life of a client -------------------------------------------------------------------------


async def test_register_read_change_rotate_delete(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    response = await client.post(
        CLIENTS,
        json={
            "name": "Billing",
            "client_id": "billing-web",
            "redirect_uris": [CALLBACK, "http://127.0.0.1/cb"],
            "post_logout_redirect_uris": ["https://app.example.com/"],
            "first_party": True,
        },
        headers=admin,
    )
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"{CLIENTS}/billing-web"
    assert response.headers["content-type"] == "application/json"
    created = response.json()
    secret = created.pop("client_secret")
    assert set(created) == PUBLIC_FIELDS
    assert created["client_type"] == "confidential"
    assert created["grant_types"] == ["authorization_code", "refresh_token"]
    assert created["scopes"] == ["openid", "profile", "email"]
    assert created["first_party"] is True
    assert isinstance(secret, str) and len(secret) >= 43

    # Stored only as its hash; never shown again.
    row = await _client_row(app, "billing-web")
    assert row is not None and row.secret_hash == hash_token(secret)
    assert secret not in json.dumps({c.name: str(getattr(row, c.key)) for c in row.__mapper__.c})
    read = await client.get(f"{CLIENTS}/billing-web", headers=admin)
    assert read.status_code == 200 and read.json() == created
    listed = (await client.get(CLIENTS, headers=admin)).json()
    # Besides the admin console's own client, which start-up registers (src/web/admin).
    listed["items"] = [c for c in listed["items"] if c["client_id"] != CONSOLE_CLIENT_ID]
    assert listed == {"items": [created], "next_cursor": None}
    for answer in (read.text, json.dumps(listed)):
        assert secret not in answer and "secret" not in answer

    changed = await client.patch(
        f"{CLIENTS}/billing-web",
        json={"name": "Billing (new)", "scopes": ["openid", "offline_access"]},
        headers=admin,
    )
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert body["name"] == "Billing (new)" and body["scopes"] == ["openid", "offline_access"]
    assert body["version"] == 2 and set(body) == PUBLIC_FIELDS

    rotated = await client.post(f"{CLIENTS}/billing-web/secret", headers=admin)
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["client_secret"]
    assert new_secret and new_secret != secret
    async with _sessions(app)() as db:
        assert (await authenticate_client(db, "billing-web", new_secret)).client_id == "billing-web"
        with pytest.raises(OAuthError):
            await authenticate_client(db, "billing-web", secret)

    assert (await client.delete(f"{CLIENTS}/billing-web", headers=admin)).status_code == 204
    assert_problem(await client.get(f"{CLIENTS}/billing-web", headers=admin), 404)
    assert await _client_row(app, "billing-web") is None

    # One event per change, in order, each as its schema says, none with a secret.
    events = await _events(app, created["id"])
    assert [e.type for e in events] == [
        "client.created",
        "client.updated",
        "client.secret_rotated",
        "client.deleted",
    ]
    admin_id = (await client.get(f"{API}/users/me", headers=admin)).json()["id"]
    for event in events:
        assert event.topic == "user-events"
        assert event.payload["actor_id"] == admin_id
        assert event.payload["client_id"] == "billing-web"
        assert not _schema_problems(event), (event.type, _schema_problems(event))
        text = json.dumps(event.payload)
        assert "secret" not in text and secret not in text and new_secret not in text
        assert hash_token(secret) not in text and hash_token(new_secret) not in text
    assert events[1].payload["changes"] == ["name", "scopes"]
    assert events[3].payload["sessions_revoked"] == 0


async def test_a_public_client_has_no_secret(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    created = await _create(
        client, admin, client_type="public", redirect_uris=["com.example.app:/callback"]
    )
    assert created["client_secret"] is None
    row = await _client_row(app, created["client_id"])
    assert row is not None and row.secret_hash is None
    rotated = await client.post(f"{CLIENTS}/{created['client_id']}/secret", headers=admin)
    assert_problem(rotated, 409)
    assert (await _client_row(app, created["client_id"])) is not None
    assert [e.type for e in await _events(app, created["id"])] == ["client.created"]


async def test_accepted_redirect_uris_and_grants(admin_app: AdminApp) -> None:
    _, client, admin = admin_app
    uris = [
        "https://app.example.com/cb?tenant=1",
        "https://app.example.com:8443/cb",
        "http://127.0.0.1/cb",
        "http://127.0.0.1:8080/cb",
        "http://[::1]/cb",
        "http://localhost:3000/cb",  # not production
        "com.example.app:/oauth2redirect",
    ]
    created = await _create(client, admin, redirect_uris=uris)
    assert created["redirect_uris"] == uris
    # A machine-to-machine client needs no redirect URI.
    machine = await _create(
        client, admin, redirect_uris=[], grant_types=["client_credentials"], scopes=["openid"]
    )
    assert machine["redirect_uris"] == [] and machine["client_secret"]
    # The generated client_id fits the rule for chosen ones.
    assert 1 <= len(machine["client_id"]) <= 64


async def test_listing_pages_through_every_client_in_a_stable_order(admin_app: AdminApp) -> None:
    _, client, admin = admin_app
    created = [(await _create(client, admin))["id"] for _ in range(5)]
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(CLIENTS, params=params, headers=admin)).json()
        seen += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    # The admin console's own client was registered first, at start-up.
    assert seen[0]["client_id"] == CONSOLE_CLIENT_ID
    assert [c["id"] for c in seen[1:]] == created
    keys = [(c["created_at"], c["id"]) for c in seen]
    assert keys == sorted(keys)


# --- bad input ------------------------------------------------------------------------------------

LONG_URI = "https://app.example.com/" + "a" * 2000
BAD_BODIES: dict[str, tuple[dict[str, Any], str]] = {
    # name: (the body, the field a 422 must name)
    "wildcard host": ({"redirect_uris": ["https://*.example.com/cb"]}, "redirect_uris"),
    "wildcard path": ({"redirect_uris": ["https://app.example.com/*"]}, "redirect_uris"),
    "fragment": ({"redirect_uris": ["https://app.example.com/cb#top"]}, "redirect_uris"),
    "empty fragment": ({"redirect_uris": ["https://app.example.com/cb#"]}, "redirect_uris"),
    "http not loopback": ({"redirect_uris": ["http://app.example.com/cb"]}, "redirect_uris"),
    "http other loopback": ({"redirect_uris": ["http://127.0.0.2/cb"]}, "redirect_uris"),
    "relative": ({"redirect_uris": ["/callback"]}, "redirect_uris"),
    "no scheme": ({"redirect_uris": ["app.example.com/cb"]}, "redirect_uris"),
    "userinfo": ({"redirect_uris": ["https://user@app.example.com/cb"]}, "redirect_uris"),
    "user and password": (
        {"redirect_uris": ["https://a:b@app.example.com/cb"]},
        "redirect_uris",
    ),
    "loopback userinfo": ({"redirect_uris": ["http://x@127.0.0.1/cb"]}, "redirect_uris"),
    "no host": ({"redirect_uris": ["https:///cb"]}, "redirect_uris"),
    "bad port": ({"redirect_uris": ["https://app.example.com:99999/cb"]}, "redirect_uris"),
    "space": ({"redirect_uris": ["https://app.example.com/a b"]}, "redirect_uris"),
    "control character": ({"redirect_uris": ["https://app.example.com/\u0001"]}, "redirect_uris"),
    "not ascii": ({"redirect_uris": ["https://exämple.com/cb"]}, "redirect_uris"),
    "upper-case scheme": ({"redirect_uris": ["HTTPS://app.example.com/cb"]}, "redirect_uris"),
    "javascript": ({"redirect_uris": ["javascript:alert(1)"]}, "redirect_uris"),
    "data": ({"redirect_uris": ["data:text/html,hi"]}, "redirect_uris"),
    "file": ({"redirect_uris": ["file:///etc/passwd"]}, "redirect_uris"),
    "private scheme without a dot": ({"redirect_uris": ["myapp:/cb"]}, "redirect_uris"),
    "private scheme without a path": ({"redirect_uris": ["com.example.app:cb"]}, "redirect_uris"),
    "over-long URI": ({"redirect_uris": [LONG_URI]}, "redirect_uris"),
    "too many URIs": (
        {"redirect_uris": [f"https://app.example.com/{i}" for i in range(11)]},
        "redirect_uris",
    ),
    "same URI twice": ({"redirect_uris": [CALLBACK, CALLBACK]}, "redirect_uris"),
    "URIs null": ({"redirect_uris": None}, "redirect_uris"),
    "no URI for authorization_code": ({"redirect_uris": []}, "redirect_uris"),
    "bad post-logout URI": (
        {"post_logout_redirect_uris": ["http://app.example.com/"]},
        "post_logout_redirect_uris",
    ),
    "unknown scope": ({"scopes": ["openid", "admin"]}, "scopes"),
    "no scope": ({"scopes": []}, "scopes"),
    "unknown grant": ({"grant_types": ["implicit"]}, "grant_types"),
    "no grant": ({"grant_types": []}, "grant_types"),
    "public with client_credentials": (
        {"client_type": "public", "grant_types": ["authorization_code", "client_credentials"]},
        "grant_types",
    ),
    "unknown client type": ({"client_type": "hybrid"}, "client_type"),
    "name too long": ({"name": "n" * 201}, "name"),
    "blank name": ({"name": "   "}, "name"),
    "newline in name": ({"name": "Good App\nSign in here"}, "name"),
    "bidi override in name": ({"name": "App \u202etxt.exe"}, "name"),
    "client_id too long": ({"client_id": "c" * 65}, "client_id"),
    "client_id with a slash": ({"client_id": "a/b"}, "client_id"),
    "client_id with a space": ({"client_id": "a b"}, "client_id"),
    "empty client_id": ({"client_id": ""}, "client_id"),
    "client_id a dot segment": ({"client_id": "."}, "client_id"),
    "client_id two dots": ({"client_id": ".."}, "client_id"),
    "a secret of one's own": ({"client_secret": "chosen"}, "client_secret"),
    "a hash of one's own": ({"secret_hash": "0" * 64}, "secret_hash"),
}


@pytest.mark.parametrize("case", BAD_BODIES, ids=list(BAD_BODIES))
async def test_bad_registrations_are_refused_and_store_nothing(
    admin_app: AdminApp, case: str
) -> None:
    app, client, admin = admin_app
    fields, field = BAD_BODIES[case]
    body = {"name": "Example App", "redirect_uris": [CALLBACK], **fields}
    before = await _counts(app)

    response = await client.post(CLIENTS, json=body, headers=admin)

    problem = assert_problem(response, 422)
    assert any(field in error["loc"] for error in problem["errors"]), problem
    assert "Traceback" not in response.text
    assert await _counts(app) == before


async def test_a_nul_character_is_refused_before_anything_runs(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    before = await _counts(app)
    for body in (
        {"name": "Example\u0000App", "redirect_uris": [CALLBACK]},
        {"name": "Example App", "redirect_uris": ["https://app.example.com/\u0000"]},
    ):
        # The request guard refuses NUL anywhere in a request (400), before validation.
        assert_problem(await client.post(CLIENTS, json=body, headers=admin), 400)
    assert await _counts(app) == before


BAD_CHANGES: dict[str, tuple[dict[str, Any], str]] = {
    "no URI left for authorization_code": ({"redirect_uris": []}, "redirect_uris"),
    "a wildcard": ({"redirect_uris": ["https://*.example.com/"]}, "redirect_uris"),
    "client_credentials for a public client": (
        {"grant_types": ["client_credentials"]},
        "grant_types",
    ),
    "the client type": ({"client_type": "confidential"}, "client_type"),
    "the client_id": ({"client_id": "another"}, "client_id"),
    "name null": ({"name": None}, "name"),
    "scopes null": ({"scopes": None}, "scopes"),
    "first_party null": ({"first_party": None}, "first_party"),
}


@pytest.mark.parametrize("case", BAD_CHANGES, ids=list(BAD_CHANGES))
async def test_bad_changes_are_refused_and_change_nothing(admin_app: AdminApp, case: str) -> None:
    app, client, admin = admin_app
    created = await _create(client, admin, client_type="public")
    before = await _counts(app)
    fields, field = BAD_CHANGES[case]

    response = await client.patch(f"{CLIENTS}/{created['client_id']}", json=fields, headers=admin)

    problem = assert_problem(response, 422)
    assert any(field in error["loc"] for error in problem["errors"]), problem
    assert await _counts(app) == before
    read = (await client.get(f"{CLIENTS}/{created['client_id']}", headers=admin)).json()
    assert read == {k: v for k, v in created.items() if k != "client_secret"}


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 201},
        {"limit": -1},
        {"limit": 10**30},
        {"limit": "ten"},
        {"cursor": "not-a-cursor"},
        {"cursor": "c" * 201},
    ],
    ids=lambda p: ",".join(f"{k}={str(v)[:12]}" for k, v in p.items()),
)
async def test_bad_list_parameters_are_refused(admin_app: AdminApp, params: dict[str, Any]) -> None:
    _, client, admin = admin_app
    assert_problem(await client.get(CLIENTS, params=params, headers=admin), 422)


async def test_unknown_clients_are_not_found(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    before = await _counts(app)
    for method, path in [
        ("GET", "/nobody"),
        ("PATCH", "/nobody"),
        ("DELETE", "/nobody"),
        ("POST", "/nobody/secret"),
        ("GET", "/" + "x" * 300),
    ]:
        body = {"name": "X"} if method == "PATCH" else None
        response = await client.request(method, CLIENTS + path, json=body, headers=admin)
        assert_problem(response, 404)
    assert await _counts(app) == before


async def test_parallel_registrations_of_one_client_id_make_exactly_one(
    admin_app: AdminApp,
) -> None:
    app, client, admin = admin_app
    clients_before, events_before = await _counts(app)
    body = {"name": "Raced", "client_id": "raced", "redirect_uris": [CALLBACK]}
    responses = await asyncio.gather(
        *(client.post(CLIENTS, json=body, headers=admin) for _ in range(20))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 19, statuses
    for response in responses:
        if response.status_code == 409:
            assert_problem(response, 409)
    winner = next(r.json() for r in responses if r.status_code == 201)
    row = await _client_row(app, "raced")
    assert row is not None and str(row.id) == winner["id"]
    assert row.secret_hash == hash_token(winner["client_secret"])
    assert [e.type for e in await _events(app, winner["id"])] == ["client.created"]
    assert await _counts(app) == (clients_before + 1, events_before + 1)


# --- deleting a client ends what it was given -----------------------------------------------------


async def test_deleting_a_client_revokes_its_sessions_at_once_and_forgets_its_consents(
    admin_app: AdminApp,
) -> None:
    app, client, admin = admin_app
    doomed = await _create(client, admin, client_id="doomed")
    await _create(client, admin, client_id="survivor")
    user = await register(client)
    ours = await login(client, user["email"])
    theirs = await login(client, user["email"])
    ours_id, theirs_id = uuid.UUID(session_of(ours)), uuid.UUID(session_of(theirs))
    now = utcnow()
    async with _sessions(app)() as db:
        for session_id, client_id in ((ours_id, "doomed"), (theirs_id, "survivor")):
            await db.execute(
                update(UserSession).where(UserSession.id == session_id).values(client_id=client_id)
            )
        for client_id in ("doomed", "survivor"):
            db.add(OAuthConsent(user_id=uuid.UUID(user["id"]), client_id=client_id, scope="openid"))
            db.add(
                AuthorizationCode(
                    code_hash=hash_token(f"code for {client_id}"),
                    client_id=client_id,
                    user_id=uuid.UUID(user["id"]),
                    browser_session_id=uuid.uuid4(),
                    redirect_uri=CALLBACK,
                    scope="openid",
                    code_challenge="c" * 43,
                    auth_time=now,
                    amr="pwd",
                    expires_at=now + timedelta(minutes=1),
                )
            )
        await db.commit()
    # Both tokens work, and the service has cached that they do (AUTH_CACHE_MAX_AGE_SECONDS is
    # long in tests, so only the deletion dropping the entries can make the next request fail).
    for tokens in (ours, theirs):
        assert (await client.get(f"{API}/users/me", headers=bearer(tokens))).status_code == 200

    assert (await client.delete(f"{CLIENTS}/doomed", headers=admin)).status_code == 204

    assert_unauthenticated(await client.get(f"{API}/users/me", headers=bearer(ours)))
    assert (await client.get(f"{API}/users/me", headers=bearer(theirs))).status_code == 200
    async with _sessions(app)() as db:
        gone = await db.get(UserSession, ours_id)
        kept = await db.get(UserSession, theirs_id)
        assert gone is not None and gone.revoked_at is not None
        assert gone.revoked_reason == "client_deleted"
        assert kept is not None and kept.revoked_at is None
        consents = (await db.execute(select(OAuthConsent.client_id))).scalars().all()
        codes = (await db.execute(select(AuthorizationCode.client_id))).scalars().all()
    assert list(consents) == ["survivor"] and list(codes) == ["survivor"]
    deleted = (await _events(app, doomed["id"]))[-1]
    assert deleted.type == "client.deleted" and deleted.payload["sessions_revoked"] == 1
    assert not _schema_problems(deleted)


# --- client authentication ------------------------------------------------------------------------


async def test_authenticate_client(admin_app: AdminApp) -> None:
    app, client, admin = admin_app
    secret = (await _create(client, admin, client_id="server-app"))["client_secret"]
    await _create(client, admin, client_id="spa", client_type="public")

    async def refusal(client_id: str | None, client_secret: str | None) -> OAuthError:
        async with _sessions(app)() as db:
            with pytest.raises(OAuthError) as caught:
                await authenticate_client(db, client_id, client_secret)
        assert caught.value.error == "invalid_client" and caught.value.status == 401
        return caught.value

    async with _sessions(app)() as db:
        assert (await authenticate_client(db, "server-app", secret)).client_id == "server-app"
        assert (await authenticate_client(db, "spa", None)).client_id == "spa"
        assert (await authenticate_client(db, "spa", "")).client_id == "spa"

    unknown = await refusal("nobody", secret)
    wrong = await refusal("server-app", secret + "x")
    # The same answer whether the client exists or not.
    assert unknown.description == wrong.description
    for client_id, client_secret in [
        (None, None),
        ("", secret),
        ("server-app", None),
        ("server-app", ""),
        ("server-app", secret.upper()),
        ("SERVER-APP", secret),  # client_ids are compared exactly
        ("spa", "anything"),  # a public client sends no secret
        ("server-app\u0000", secret),
        ("s" * 10_000, secret),
    ]:
        assert (await refusal(client_id, client_secret)).description == unknown.description


# --- matching redirect URIs -----------------------------------------------------------------------


def _registered(*uris: str, post_logout: tuple[str, ...] = ()) -> OAuthClient:
    return OAuthClient(
        client_id="c",
        name="c",
        client_type="public",
        redirect_uris=list(uris),
        post_logout_redirect_uris=list(post_logout),
        grant_types=["authorization_code"],
        scopes=["openid"],
    )


@pytest.mark.parametrize(
    ("registered", "presented", "allowed"),
    [
        (CALLBACK, CALLBACK, True),
        (CALLBACK, CALLBACK + "/", False),  # a trailing slash is another URI
        (CALLBACK + "/", CALLBACK, False),
        (CALLBACK, "https://app.example.com/Callback", False),
        (CALLBACK, "https://APP.example.com/callback", False),
        (CALLBACK, "https://app.example.com:443/callback", False),
        (CALLBACK, CALLBACK + "?x=1", False),
        (CALLBACK, CALLBACK + "#x", False),
        (CALLBACK, "https://app.example.com/callback/../callback", False),
        (CALLBACK, "https://app.example.com.evil.example/callback", False),
        ("https://app.example.com/cb?a=1", "https://app.example.com/cb?a=1", True),
        # RFC 8252 section 7.3: loopback IP literals match with any port.
        ("http://127.0.0.1/cb", "http://127.0.0.1/cb", True),
        ("http://127.0.0.1/cb", "http://127.0.0.1:51234/cb", True),
        ("http://127.0.0.1:8080/cb", "http://127.0.0.1:9090/cb", True),
        ("http://127.0.0.1:8080/cb", "http://127.0.0.1/cb", True),
        ("http://[::1]/cb", "http://[::1]:8080/cb", True),
        ("http://127.0.0.1", "http://127.0.0.1:8080", True),
        ("http://127.0.0.1/cb?x=1", "http://127.0.0.1:8080/cb?x=1", True),
        ("http://127.0.0.1/cb", "http://127.0.0.1:51234/cb/", False),
        ("http://127.0.0.1/cb", "http://127.0.0.1:51234/other", False),
        ("http://127.0.0.1/cb", "http://127.0.0.1:99999/cb", False),
        ("http://127.0.0.1/cb", "http://127.0.0.1:/cb", False),
        ("http://127.0.0.1/cb", "http://127.0.0.1:80@evil.example/cb", False),
        ("http://127.0.0.1/cb", "https://127.0.0.1:8080/cb", False),
        ("http://127.0.0.1/cb", "http://[::1]:8080/cb", False),
        ("http://127.0.0.1/cb", "http://127.0.0.1:8080/cb#x", False),
        ("http://127.0.0.1/cb", "http://127.0.0.1:8080/cb\n", False),
        # "localhost" is a name anything may answer for: no port exception.
        ("http://localhost/cb", "http://localhost/cb", True),
        ("http://localhost/cb", "http://localhost:8080/cb", False),
        ("http://localhost:3000/cb", "http://localhost:3001/cb", False),
        ("com.example.app:/cb", "com.example.app:/cb", True),
        ("com.example.app:/cb", "com.example.app:/cb/", False),
    ],
)
def test_redirect_uri_allowed(registered: str, presented: str, allowed: bool) -> None:
    assert redirect_uri_allowed(_registered(registered), presented) is allowed


def test_redirect_uri_allowed_checks_every_registered_uri_and_nothing_else() -> None:
    client = _registered("https://a.example.com/cb", "http://127.0.0.1/native")
    assert redirect_uri_allowed(client, "https://a.example.com/cb")
    assert redirect_uri_allowed(client, "http://127.0.0.1:7000/native")
    assert not redirect_uri_allowed(client, "http://127.0.0.1:7000/cb")
    assert not redirect_uri_allowed(_registered(), "http://127.0.0.1/cb")


def test_post_logout_redirects_match_exactly() -> None:
    client = _registered(CALLBACK, post_logout=("https://app.example.com/", "http://127.0.0.1/"))
    assert post_logout_redirect_allowed(client, "https://app.example.com/")
    assert post_logout_redirect_allowed(client, "http://127.0.0.1/")
    assert not post_logout_redirect_allowed(client, "http://127.0.0.1:8080/")
    assert not post_logout_redirect_allowed(client, "https://app.example.com")
    assert not post_logout_redirect_allowed(client, CALLBACK)  # a redirect URI is not one


def test_localhost_is_refused_in_production(make_settings: Callable[..., Settings]) -> None:
    production = make_settings(ENVIRONMENT="production")
    development = make_settings(ENVIRONMENT="development")
    uris = ["https://app.example.com/cb", "http://localhost:3000/cb"]
    check_registration(development, "public", ["authorization_code"], uris, uris)
    with pytest.raises(InvalidInput) as caught:
        check_registration(production, "public", ["authorization_code"], uris, uris)
    locs = [error["loc"] for error in caught.value.extra["errors"]]
    assert locs == [["body", "redirect_uris", 1], ["body", "post_logout_redirect_uris", 1]]
    # The loopback IP literals are fine everywhere.
    loopback = ["http://127.0.0.1/cb", "http://[::1]:8080/cb"]
    check_registration(production, "public", ["authorization_code"], loopback, loopback)


def test_the_api_lists_exactly_the_supported_grants_and_scopes() -> None:
    assert get_args(GrantType) == GRANT_TYPES
    assert get_args(Scope) == tuple(SCOPES)
    assert all(description and description[0].isupper() for description in SCOPES.values())


# --- the command line -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(make_settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., Any]:
    """Run ``python -m src`` against the test database and Redis, as an operator would."""
    settings = make_settings()
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("REDIS_", "KAFKA_", "DATABASE_"))
    }
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "ENVIRONMENT": "test",
            "DATA_DIR": str(tmp_path / "data"),
            "DATABASE_URL": settings.DATABASE_URL,
            "REDIS_HOST": settings.REDIS_HOST,
            "REDIS_PORT": str(settings.REDIS_PORT),
            "REDIS_DB": str(settings.REDIS_DB),
            "KAFKA_ENABLED": "false",
        }
    )

    async def run(*args: str) -> Run:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "src",
            *args,
            cwd=tmp_path,  # no .env of the developer's
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return Run(process.returncode, stdout.decode(), stderr.decode())

    return run


async def test_the_command_line_creates_lists_and_deletes_clients(
    admin_app: AdminApp, cli: Callable[..., Any]
) -> None:
    app, client, admin = admin_app
    clients_before, events_before = await _counts(app)
    made: Run = await cli(
        "clients",
        "create",
        "--name",
        "Ops Console",
        "--client-id",
        "ops-console",
        "--redirect-uri",
        CALLBACK,
        "--redirect-uri",
        "http://127.0.0.1/cb",
        "--scope",
        "openid",
        "--scope",
        "email",
        "--first-party",
    )
    assert made.code == 0, made.stderr
    lines = dict(line.split(": ", 1) for line in made.stdout.splitlines())
    assert lines["client_id"] == "ops-console"
    row = await _client_row(app, "ops-console")
    assert row is not None and row.secret_hash == hash_token(lines["client_secret"])
    assert row.scopes == ["openid", "email"] and row.first_party is True
    assert row.redirect_uris == [CALLBACK, "http://127.0.0.1/cb"]
    assert lines["client_secret"] not in made.stderr

    public: Run = await cli(
        "clients", "create", "--name", "Phone", "--public",
        "--redirect-uri", "com.example.phone:/cb",
    )  # fmt: skip
    assert public.code == 0, public.stderr
    assert "client_secret" not in public.stdout
    public_id = public.stdout.split(": ", 1)[1].strip()

    listed: Run = await cli("clients", "list")
    assert listed.code == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    rows = [r for r in rows if r[0] != CONSOLE_CLIENT_ID]  # registered by the service itself
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("ops-console", "confidential", "Ops Console"),
        (public_id, "public", "Phone"),
    ]
    assert lines["client_secret"] not in listed.stdout

    # Refused by the database's state: exit 1, the reason on stderr, nothing changed.
    duplicate: Run = await cli(
        "clients", "create", "--name", "Again", "--client-id", "ops-console",
        "--redirect-uri", CALLBACK,
    )  # fmt: skip
    assert duplicate.code == 1 and "already exists" in duplicate.stderr
    missing: Run = await cli("clients", "delete", "nobody")
    assert missing.code == 1 and "No such client" in missing.stderr
    # Bad usage and values the rules refuse: exit 2, nothing stored.
    for args in [
        ("clients", "create", "--name", "Bad", "--redirect-uri", "http://app.example.com/cb"),
        ("clients", "create", "--name", "Bad", "--grant-type", "implicit"),
        ("clients", "create", "--name", "Bad"),  # authorization_code needs a redirect URI
        ("clients", "create", "--name", "Bad", "--public", "--confidential"),
        ("clients", "create", "--redirect-uri", CALLBACK),
        ("clients", "delete"),
        ("clients",),
    ]:
        bad: Run = await cli(*args)
        assert bad.code == 2, (args, bad)
        assert bad.stderr and not bad.stdout, (args, bad)
    assert await _counts(app) == (clients_before + 2, events_before + 2)

    # Deleting from the shell ends the client's sessions at once, cached or not.
    user = await register(client)
    tokens = await login(client, user["email"])
    async with _sessions(app)() as db:
        await db.execute(
            update(UserSession)
            .where(UserSession.id == uuid.UUID(session_of(tokens)))
            .values(client_id="ops-console")
        )
        await db.commit()
    assert (await client.get(f"{API}/users/me", headers=bearer(tokens))).status_code == 200
    deleted: Run = await cli("clients", "delete", "ops-console")
    assert deleted.code == 0, deleted.stderr
    assert "1 session(s) revoked" in deleted.stdout
    assert_unauthenticated(await client.get(f"{API}/users/me", headers=bearer(tokens)))

    assert [r.split("\t")[0] for r in (await cli("clients", "list")).stdout.splitlines()] == [
        CONSOLE_CLIENT_ID,
        public_id,
    ]
    events = await _events(app, str(row.id))
    assert [e.type for e in events] == ["client.created", "client.deleted"]
    assert all(e.payload["actor_id"] is None and not _schema_problems(e) for e in events)
    assert (await client.get(f"{CLIENTS}/ops-console", headers=admin)).status_code == 404
