"""The published event contract (docs/architecture.md, "Event catalogue"; docs/events/).

Every event type has a JSON Schema for its CloudEvents ``data`` and every schema names an event
type; a real flow through the app records every type, and each outbox row is checked against its
type's schema, and each message against the envelope schema, exactly as the relay would send it.
A new event type without a schema, or a payload that drifts from its schema, fails here.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
import pytest_asyncio
from fastapi import FastAPI
from jsonschema import Draft202012Validator, FormatChecker
from redis.asyncio import Redis

from src.app.container import app_services
from src.config.settings import Settings
from src.events.outbox import NOTIFICATION_EVENTS, EventType, topic_for
from src.events.relay import OutboxRelay
from src.users.privacy import erase_user
from tests.support.app import PASSWORD, bearer, eventually, login, register, unique_email
from tests.support.auth import (
    QUICK_SETTINGS,
    client_from,
    forget_in_process_login_attempts,
    one_time_token,
    outbox,
    password_grant,
)
from tests.support.oidc import REDIRECT_URI, code_flow, exchange

AdminApp = tuple[FastAPI, httpx.AsyncClient, dict[str, str]]

API = "/api/v1"
EVENTS_DIR = Path(__file__).resolve().parents[1] / "docs" / "events"
ENVELOPE = EVENTS_DIR / "envelope.schema.json"
SUFFIX = ".schema.json"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
NEW_PASSWORD = "a new passphrase for the flow"

# jsonschema checks "date-time" only with an optional package this project does not install:
# check it here, as RFC 3339 says (a full date, a full time, and an offset: "Z" or +hh:mm).
FORMATS = FormatChecker()
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", re.ASCII)


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True  # "format" says nothing about other types
    if not _RFC3339.fullmatch(value):
        return False
    datetime.fromisoformat(value.replace("Z", "+00:00"))  # a real date and time
    return True


def _load(path: Path) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def data_schemas() -> dict[str, Path]:
    """Event type -> the schema file of its ``data`` (every file but the envelope's)."""
    return {
        path.name.removesuffix(SUFFIX): path
        for path in sorted(EVENTS_DIR.glob(f"*{SUFFIX}"))
        if path != ENVELOPE
    }


def validator(path: Path) -> Draft202012Validator:
    return Draft202012Validator(_load(path), format_checker=FORMATS)


def problems(checker: Draft202012Validator, instance: Any) -> list[str]:
    return [
        f"{'/'.join(str(part) for part in error.absolute_path) or '(root)'}: {error.message}"
        for error in checker.iter_errors(instance)
    ]


# --- the files ------------------------------------------------------------------------------------


def test_every_event_type_has_a_schema_and_every_schema_names_an_event_type() -> None:
    types = {str(event_type) for event_type in EventType}
    files = set(data_schemas())
    assert not types - files, f"event types without a schema in docs/events/: {types - files}"
    assert not files - types, f"schemas in docs/events/ for no event type: {files - types}"
    assert ENVELOPE.is_file()


@pytest.mark.parametrize("path", [ENVELOPE, *data_schemas().values()], ids=lambda p: p.name)
def test_each_schema_is_a_strict_draft_2020_12_schema(path: Path) -> None:
    schema = _load(path)
    assert schema.get("$schema") == DRAFT_2020_12
    Draft202012Validator.check_schema(schema)
    assert schema.get("type") == "object" and schema.get("title") and schema.get("description")
    # The code fixes every field set: a schema that lets unknown fields through documents less
    # than it seems to, and a field added in the code without the schema would go unnoticed.
    assert schema.get("additionalProperties") is False, path.name
    properties = schema["properties"]
    assert set(schema.get("required", [])) <= set(properties), path.name
    assert all(
        isinstance(rule, dict) and rule.get("description") for rule in properties.values()
    ), f"{path.name}: every field needs a description"


def test_data_schemas_name_their_type_and_topic() -> None:
    for name, path in data_schemas().items():
        schema = _load(path)
        topic = "user-notifications" if name in NOTIFICATION_EVENTS else "user-events"
        assert schema["x-event-type"] == name
        assert schema["x-topic"] == topic, name
    envelope_types = _load(ENVELOPE)["properties"]["type"]["enum"]
    assert sorted(envelope_types) == sorted(str(event_type) for event_type in EventType)


# --- a real flow ----------------------------------------------------------------------------------


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """Cheap hashing and no Kafka: the outbox keeps every row (and its sealed link) to read."""

    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**QUICK_SETTINGS, **overrides})

    return factory


@pytest_asyncio.fixture
async def forget_login_attempts(redis_client: Redis) -> AsyncIterator[None]:
    """The flow signs in many times from the in-process address: leave no count behind."""
    yield
    await forget_in_process_login_attempts(redis_client)


def _ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json() if response.content else {}
    return body


async def _recorded(app: FastAPI, user_id: str, type_: EventType, count: int = 1) -> None:
    """Wait for work that runs after the answer (a failed login's event, a reset request)."""

    async def enough() -> bool:
        return len(await outbox(app, user_id, str(type_))) >= count

    await eventually(enough)


async def _run_flow(app: FastAPI, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
    """Every path that records an event, through the HTTP API as clients use it."""
    # OAuth clients: registered, changed, a new secret, deleted; and the app the flow signs in to.
    server = {
        "name": "Flow server",
        "client_id": "flow-server",
        "grant_types": ["client_credentials"],
    }
    _ok(await client.post(f"{API}/clients", json=server, headers=admin), 201)
    _ok(await client.patch(f"{API}/clients/flow-server", json={"name": "Renamed"}, headers=admin))
    _ok(await client.post(f"{API}/clients/flow-server/secret", headers=admin))
    _ok(await client.delete(f"{API}/clients/flow-server", headers=admin), 204)
    flow_app = {
        "name": "Flow app",
        "client_id": "flow-app",
        "client_type": "public",
        "grant_types": ["password", "refresh_token", "authorization_code"],
        "redirect_uris": [REDIRECT_URI],
        "first_party": True,
    }
    _ok(await client.post(f"{API}/clients", json=flow_app, headers=admin), 201)

    # Registration (unverified: a verification link is mailed), a wrong and a right password.
    email = unique_email("flow")
    user = await register(client, email, full_name="Ada Lovelace")
    uid = user["id"]
    assert (await password_grant(client, email, "not the password")).status_code == 400
    await _recorded(app, uid, EventType.LOGIN_FAILED)
    response = await client.post(
        f"{API}/auth/login",
        data={"grant_type": "password", "username": email, "password": PASSWORD},
        headers={"User-Agent": "flow-test/1.0"},
        auth=("flow-app", ""),  # a client_id, in HTTP Basic
    )
    auth = bearer(_ok(response))
    _ok(await client.patch(f"{API}/users/me", json={"full_name": "Ada King"}, headers=auth))
    # The hosted sign-in page and an authorization code (two more sign-ins).
    code, verifier, _ = await code_flow(client, "flow-app", email, PASSWORD)
    _ok(await exchange(client, code, verifier, "flow-app"))

    # A password reset, asked for and confirmed.
    reset = await client.post(f"{API}/auth/password-reset/request", json={"email": email})
    _ok(reset, 202)
    await _recorded(app, uid, EventType.PASSWORD_RESET_REQUESTED)
    token = await one_time_token(app, uid, EventType.PASSWORD_RESET_REQUESTED)
    confirm = {"token": token, "new_password": NEW_PASSWORD}
    _ok(await client.post(f"{API}/auth/password-reset/confirm", json=confirm), 204)

    # An email change: asked for with the password, confirmed from the new address (the old one
    # gets a notice with an undo link), then undone from the old address.
    auth = bearer(await login(client, email, NEW_PASSWORD))
    new_email = unique_email("moved")
    body = {"new_email": new_email, "current_password": NEW_PASSWORD}
    _ok(await client.post(f"{API}/users/me/email", json=body, headers=auth), 202)
    token = await one_time_token(app, uid, EventType.EMAIL_CHANGE_REQUESTED)
    moved = _ok(await client.post(f"{API}/auth/email-change/confirm", json={"token": token}))
    assert moved["email"] == new_email and moved["email_verified"] is True
    token = await one_time_token(app, uid, EventType.EMAIL_CHANGE_NOTICE)
    _ok(await client.post(f"{API}/auth/email-change/undo", json={"token": token}), 204)
    # The undo made the password unusable and mailed a reset link to the restored address.
    token = await one_time_token(app, uid, EventType.PASSWORD_RESET_REQUESTED)
    confirm = {"token": token, "new_password": PASSWORD}
    _ok(await client.post(f"{API}/auth/password-reset/confirm", json=confirm), 204)

    # A sign-in here, then one from an address the account has never been used from.
    await login(client, email)
    async with client_from(app) as elsewhere:
        await login(elsewhere, email)
    # The password changed with the current one (the session asking survives).
    auth = bearer(await login(client, email))
    body = {"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    _ok(await client.post(f"{API}/users/me/password", json=body, headers=auth), 204)

    # Second factors: an authenticator enrolled (its first confirmation brings recovery codes),
    # new recovery codes, a wrong code, then a recovery code to remove the authenticator (each
    # TOTP code works once, so the steps after the confirmation use recovery codes).
    mfa = f"{API}/users/me/mfa"
    started = _ok(await client.post(f"{mfa}/totp", json={"name": "Phone"}, headers=auth), 201)
    first = {"code": pyotp.TOTP(started["secret"]).now()}
    factor = f"{mfa}/{started['factor_id']}"
    confirmed = await client.post(
        f"{mfa}/totp/{started['factor_id']}/confirm", json=first, headers=auth
    )
    first_codes = _ok(confirmed)["recovery_codes"]
    # Changing factors now needs a sign-in with one (step-up): a recovery code proves it.
    body = {"current_password": NEW_PASSWORD, "code": first_codes[0]}
    auth = bearer(_ok(await client.post(f"{API}/auth/reauthenticate", json=body, headers=auth)))
    body = {"current_password": NEW_PASSWORD}
    codes = _ok(await client.post(f"{mfa}/recovery-codes", json=body, headers=auth))
    wrong = {"code": "AAAA-AAAA-AAAA-AAAA"}
    assert (await client.request("DELETE", factor, json=wrong, headers=auth)).status_code == 400
    await _recorded(app, uid, EventType.MFA_FAILED)
    wrong_password = {"current_password": "not the password"}
    reauth = await client.post(f"{API}/auth/reauthenticate", json=wrong_password, headers=auth)
    assert reauth.status_code == 400
    await _recorded(app, uid, EventType.STEP_UP_FAILED)
    spend = {"code": codes["recovery_codes"][0]}
    _ok(await client.request("DELETE", factor, json=spend, headers=auth), 204)

    # A second account, verified through its link, then administered.
    other = await register(client, unique_email("other"))
    oid = other["id"]
    token = await one_time_token(app, oid, EventType.VERIFICATION_REQUESTED)
    _ok(await client.post(f"{API}/auth/verify-email/confirm", json={"token": token}))
    admin_changes: list[dict[str, Any]] = [
        {"role": "admin"},
        {"role": "user"},
        {"is_active": False},
        {"is_active": True},
        {"email": unique_email("set-by-admin")},
        {"email_verified": True},
        # One request, three kinds of change: user.updated, role_changed and deactivated.
        {"full_name": "Set By Admin", "is_active": False, "role": "admin"},
    ]
    # One of its sessions ended by an administrator (user.session_revoked).
    await login(client, other["email"])
    sessions = await client.get(f"{API}/users/{oid}/sessions", headers=admin)
    assert sessions.status_code == 200, sessions.text
    revoke = f"{API}/users/{oid}/sessions/{sessions.json()[0]['id']}"
    _ok(await client.delete(revoke, headers=admin), 204)
    for change in admin_changes:
        _ok(await client.patch(f"{API}/users/{oid}", json=change, headers=admin))
    _ok(await client.delete(f"{API}/users/{oid}/mfa", headers=admin), 204)  # nothing to reset
    _ok(await client.delete(f"{API}/users/{oid}", headers=admin), 204)

    # An account an administrator creates (registered with the admin as actor).
    created = await client.post(
        f"{API}/users",
        json={"email": unique_email("made"), "password": PASSWORD, "role": "user"},
        headers=admin,
    )
    _ok(created, 201)

    # A GDPR erasure (`user-service users erase`): user.deleted, then user.erased.
    erased = await register(client, unique_email("erased"), full_name="Erased Person")
    services = app_services(app)
    await erase_user(services.engine, services.security, erased["email"])


async def test_a_real_flow_records_every_event_type_as_its_schema_says(
    admin_app: AdminApp, forget_login_attempts: None
) -> None:
    app, client, admin = admin_app
    settings: Settings = app.state.settings
    await _run_flow(app, client, admin)

    rows = await outbox(app)
    recorded = {row.type for row in rows}
    missing = {str(event_type) for event_type in EventType} - recorded
    assert not missing, f"the flow recorded no {sorted(missing)}: extend it to the new path"

    schemas = {name: validator(path) for name, path in data_schemas().items()}
    envelope = validator(ENVELOPE)
    # The relay's own message builder: what Kafka would carry, sealed link included.
    relay = OutboxRelay(settings, app_services(app).sessionmaker, lambda: None)
    failures: list[str] = []
    for row in rows:
        where = f"{row.type} #{row.position}"
        assert row.topic == topic_for(EventType(row.type), settings), where
        failures += [f"{where} payload {p}" for p in problems(schemas[row.type], row.payload)]
        message = relay._message(row)
        assert message.key == str(row.aggregate_id) and message.topic == row.topic
        published = json.loads(message.value)
        failures += [f"{where} envelope {p}" for p in problems(envelope, published)]
        failures += [f"{where} data {p}" for p in problems(schemas[row.type], published["data"])]
        # Only a notification with a link carries it, and only sealed, only on the topic.
        assert ("sealed" in published["data"]) == (row.sealed is not None), where
        assert "sealed" not in row.payload, where
    assert not failures, "\n".join(failures)
