"""``user-service create-admin`` and ``users export|erase`` against the real PostgreSQL and Redis.

The accounts are made and used through the HTTP API of an app on the same database and Redis, so
what the commands find is what the service stores, and what they change is what the service then
sees (a deleted user's token stops working at once: its cache entries went with it).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pyotp
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import select

from src.app.container import app_services
from src.db.models import (
    AuditEvent,
    MailDelivery,
    MfaFactor,
    OutboxEvent,
    RecoveryCode,
    RefreshToken,
    User,
    UserSession,
)
from src.db.types import utcnow
from src.events.erasure import ERASED_EMAIL
from src.events.outbox import EventType
from src.users.privacy import ERASED_RECIPIENT
from tests import test_cli
from tests.conftest import SettingsFactory
from tests.support.app import PASSWORD, bearer, login, register, running_app, unique_email
from tests.support.auth import QUICK_SETTINGS, outbox
from tests.support.oidc import ADMIN_PASSWORD
from tests.test_cli import Cli
from tests.test_event_schemas import data_schemas, problems, validator

# The in-process command runner of tests/test_cli.py, and the environment it runs in.
cli_env = test_cli.cli_env
cli = test_cli.cli

AdminApp = tuple[FastAPI, httpx.AsyncClient, dict[str, str], str]
API = "/api/v1"
NEW_ADMIN_PASSWORD = "a long and unusual passphrase"
USER_AGENT = "privacy-test-agent/1.0"
FULL_NAME = "Ada Lovelace"
FACTOR_NAME = "Ada's phone"


@pytest_asyncio.fixture
async def admin_app(make_settings: SettingsFactory, clean_db: None) -> AsyncIterator[AdminApp]:
    """An app on the test database and Redis without Kafka (the outbox keeps every row), its
    first admin signed in: (app, client, admin header, admin email)."""
    email = unique_email("admin")
    settings = make_settings(
        **QUICK_SETTINGS, FIRST_ADMIN_EMAIL=email, FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD
    )
    async with running_app(settings) as (app, client):
        yield app, client, bearer(await login(client, email, ADMIN_PASSWORD)), email


async def _user(app: FastAPI, email: str) -> User | None:
    async with app_services(app).sessionmaker() as db:
        return await db.scalar(select(User).where(User.email == email))


# --- create-admin ---------------------------------------------------------------------------------


async def test_create_admin_from_standard_input(admin_app: AdminApp, cli: Cli) -> None:
    app, client, _, _ = admin_app
    email = unique_email("new-admin")

    weak = await cli("create-admin", email, "--password-stdin", stdin="short\n")
    assert weak.code == 2
    assert weak.err.startswith("invalid: The password must be at least")
    assert "short" not in weak.err.replace("The password must be at least", "")
    common = await cli("create-admin", email, "--password-stdin", stdin="password1234\n")
    assert common.code == 2 and "too common" in common.err
    assert await _user(app, email) is None

    made = await cli("create-admin", email.upper(), "--password-stdin", stdin=NEW_ADMIN_PASSWORD)
    assert made.code == 0, made.err
    user = await _user(app, email)
    assert user is not None and user.role == "admin" and user.email_verified and user.is_active
    assert made.out == f"created the administrator {email} ({user.id})\n"
    [registered] = await outbox(app, user.id, EventType.REGISTERED)
    assert registered.payload["role"] == "admin" and registered.payload["actor_id"] is None
    # The password works, and was stored the usual way (never as given).
    assert NEW_ADMIN_PASSWORD not in user.password_hash
    tokens = await login(client, email, NEW_ADMIN_PASSWORD)
    me = await client.get(f"{API}/users/me", headers=bearer(tokens))
    assert me.json()["role"] == "admin"

    again = await cli("create-admin", email, "--password-stdin", stdin="whatever it is\n")
    assert again.code == 0
    assert again.out == f"{email} ({user.id}) is already an administrator; nothing changed\n"


async def test_create_admin_promotes_an_existing_user_and_keeps_the_password(
    admin_app: AdminApp, cli: Cli
) -> None:
    app, client, _, _ = admin_app
    user = await register(client, unique_email("promoted"))
    promoted = await cli("create-admin", user["email"])  # asks nothing: no password needed
    assert promoted.code == 0, promoted.err
    assert promoted.out.startswith(f"promoted the existing user {user['email']} ({user['id']})")
    assert "password is unchanged" in promoted.out
    [changed] = await outbox(app, user["id"], EventType.ROLE_CHANGED)
    assert changed.payload["role"] == "admin" and changed.payload["previous_role"] == "user"
    assert changed.payload["actor_id"] is None
    tokens = await login(client, user["email"], PASSWORD)
    assert (await client.get(f"{API}/users/me", headers=bearer(tokens))).json()["role"] == "admin"


async def test_create_admin_never_asks_without_a_terminal(admin_app: AdminApp, cli: Cli) -> None:
    app, _, _, _ = admin_app
    email = unique_email("no-tty")
    run = await cli("create-admin", email, stdin=f"{NEW_ADMIN_PASSWORD}\n")
    assert run.code == 1
    assert run.err == "no terminal to ask for the password on: use --password-stdin\n"
    empty = await cli("create-admin", email, "--password-stdin", stdin="")
    assert empty.code == 1 and empty.err == "no password on standard input\n"
    assert await _user(app, email) is None


# --- export and erase -----------------------------------------------------------------------------


async def _a_user_with_history(app: FastAPI, client: httpx.AsyncClient) -> dict[str, Any]:
    """A user with a session (IP address, user agent), a name, an authenticator and its recovery
    codes, an audit trail row and a mail delivery that both name them."""
    email = unique_email("subject")
    user = await register(client, email, full_name=FULL_NAME)
    response = await client.post(
        f"{API}/auth/login",
        data={"grant_type": "password", "username": email, "password": PASSWORD},
        headers={"User-Agent": USER_AGENT},
    )
    assert response.status_code == 200, response.text
    auth = bearer(response.json())
    mfa = f"{API}/users/me/mfa"
    started = await client.post(f"{mfa}/totp", json={"name": FACTOR_NAME}, headers=auth)
    assert started.status_code == 201, started.text
    code = {"code": pyotp.TOTP(started.json()["secret"]).now()}
    confirmed = await client.post(
        f"{mfa}/totp/{started.json()['factor_id']}/confirm", json=code, headers=auth
    )
    assert confirmed.status_code == 200, confirmed.text
    uid = uuid.UUID(user["id"])
    async with app_services(app).sessionmaker() as db:
        # What the audit consumer and the courier store (their own tests cover how).
        db.add(
            AuditEvent(
                event_id=uuid.uuid4(),
                type="user.logged_in",
                user_id=uid,
                source="/user-management-service",
                time=utcnow(),
                data={"id": user["id"], "ip": "192.0.2.44", "client_id": None, "via": "x"},
                topic="user-events",
                partition=0,
                offset=1,
            )
        )
        data = {"user_id": user["id"], "email": email, "expires_at": "2030-01-01T00:00:00Z"}
        db.add(
            MailDelivery(
                event_id=uuid.uuid4(),
                topic="user-notifications",
                type="user.verification_requested",
                user_id=uid,
                status="failed",
                attempts=8,
                last_error=f"550 5.1.1 <{email}>: no such mailbox",
                finished_at=utcnow(),
            )
        )
        db.add(
            MailDelivery(
                event_id=uuid.uuid4(),
                topic="user-notifications",
                type="user.password_reset_requested",
                user_id=uid,
                status="pending",
                attempts=1,
                last_error=f"450 4.2.1 <{email}>: mailbox busy, try later",
                next_attempt_at=utcnow(),
                data=data,
                sealed="v1.test.c2VhbGVk",
            )
        )
        await db.commit()
    return {**user, "auth": auth}


async def _secrets_of(app: FastAPI, uid: uuid.UUID) -> list[str]:
    """Every stored secret or hash about the user: none may appear in an export."""
    async with app_services(app).sessionmaker() as db:
        user = await db.get(User, uid)
        assert user is not None
        found = [user.password_hash]
        sessions = list(await db.scalars(select(UserSession).where(UserSession.user_id == uid)))
        found += [s.cookie_hash for s in sessions if s.cookie_hash]
        found += list(
            await db.scalars(
                select(RefreshToken.token_hash).where(
                    RefreshToken.session_id.in_([s.id for s in sessions])
                )
            )
        )
        found += [
            f.secret
            for f in await db.scalars(select(MfaFactor).where(MfaFactor.user_id == uid))
            if f.secret
        ]
        found += list(
            await db.scalars(select(RecoveryCode.code_hash).where(RecoveryCode.user_id == uid))
        )
        found += [
            row.sealed
            for row in await db.scalars(select(OutboxEvent).where(OutboxEvent.aggregate_id == uid))
            if row.sealed
        ]
    assert len(found) >= 1 + 1 + 10  # hash, a refresh token, recovery codes
    return found


def _keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for item in value.values() for k in _keys(item)}
    if isinstance(value, list):
        return {k for item in value for k in _keys(item)}
    return set()


async def test_export_has_everything_about_the_user_and_no_secret(
    admin_app: AdminApp, cli: Cli
) -> None:
    app, client, _, _ = admin_app
    user = await _a_user_with_history(app, client)
    uid = uuid.UUID(user["id"])

    run = await cli("users", "export", user["email"].upper())
    assert run.code == 0, run.err
    document = json.loads(run.out)
    assert document["user"]["id"] == user["id"] and document["user"]["email"] == user["email"]
    assert document["user"]["full_name"] == FULL_NAME
    [session] = document["sessions"]
    assert session["user_agent"] == USER_AGENT and session["ip_address"] == "127.0.0.1"
    [factor] = document["second_factors"]
    assert (factor["kind"], factor["name"]) == ("totp", FACTOR_NAME)
    assert factor["confirmed_at"] is not None
    assert document["passkeys"] == [] and len(document["recovery_codes"]) == 10
    assert [link["purpose"] for link in document["one_time_links"]] == ["email_verification"]
    types = [event["type"] for event in document["outbox_events"]]
    assert types[:2] == ["user.registered", "user.verification_requested"]
    assert {"user.logged_in", "user.mfa_enrolled"} <= set(types)
    [audit] = document["audit_events"]
    assert audit["data"]["ip"] == "192.0.2.44"
    failed, pending = sorted(document["mail_deliveries"], key=lambda d: d["status"])
    assert failed["status"] == "failed" and user["email"] in failed["last_error"]
    assert pending["status"] == "pending" and pending["data"]["email"] == user["email"]
    assert document["oauth_clients"] == []

    # Nothing secret, by value and by name.
    for secret in await _secrets_of(app, uid):
        assert secret not in run.out
    forbidden = {"password_hash", "secret", "token_hash", "cookie_hash", "code_hash", "sealed"}
    assert not forbidden & _keys(document)
    assert not {"public_key", "credential_id", "last_used_step"} & _keys(document)

    missing = await cli("users", "export", unique_email("nobody"))
    assert missing.code == 1 and missing.err.startswith("no such user: ")


async def _texts(app: FastAPI, uid: uuid.UUID) -> list[str]:
    """Every kept row about the user, as text."""
    async with app_services(app).sessionmaker() as db:
        outbox_rows = await db.scalars(select(OutboxEvent).where(OutboxEvent.aggregate_id == uid))
        audit_rows = await db.scalars(select(AuditEvent).where(AuditEvent.user_id == uid))
        deliveries = await db.scalars(select(MailDelivery).where(MailDelivery.user_id == uid))
        return (
            [json.dumps(row.payload) + str(row.sealed) for row in outbox_rows]
            + [json.dumps(row.data) for row in audit_rows]
            + [json.dumps(row.data) + str(row.last_error) + str(row.sealed) for row in deliveries]
        )


async def test_erase_deletes_the_user_and_scrubs_the_kept_rows(
    admin_app: AdminApp, cli: Cli
) -> None:
    app, client, _, _ = admin_app
    user = await _a_user_with_history(app, client)
    uid, email = uuid.UUID(user["id"]), user["email"]
    me = await client.get(f"{API}/users/me", headers=user["auth"])
    assert me.status_code == 200  # and now in the cache
    before = await outbox(app, uid)
    rows_before = len(await _texts(app, uid))
    assert any(email in text for text in await _texts(app, uid))

    refused = await cli("users", "erase", email, stdin="someone-else@example.com\n")
    assert refused.code == 1 and refused.err.endswith("not confirmed: nothing was erased\n")
    assert await _user(app, email) is not None

    erased = await cli("users", "erase", email, stdin=f"{email.upper()}\n")
    assert erased.code == 0, erased.err
    assert erased.out.startswith(f"erased user {uid}: account deleted;")
    assert email not in erased.out

    assert await _user(app, email) is None
    # Its session ended with it: the token is refused at once, not when the cache entry expires.
    assert (await client.get(f"{API}/users/me", headers=user["auth"])).status_code == 401

    # Every row is still there, with its type and order; nothing personal is left in any.
    after = await outbox(app, uid)
    assert [(r.position, r.type) for r in after[: len(before)]] == [
        (r.position, r.type) for r in before
    ]
    assert [r.type for r in after[len(before) :]] == ["user.deleted", "user.erased"]
    texts = await _texts(app, uid)
    assert len(texts) == rows_before + 2
    for personal in (email, FULL_NAME, FACTOR_NAME, USER_AGENT, "192.0.2.44", "127.0.0.1"):
        assert not [text for text in texts if personal.lower() in text.lower()], personal
    assert ERASED_EMAIL in after[0].payload["email"] and after[0].payload["full_name"] is None
    deleted, erasure = after[-2:]
    assert deleted.payload["actor_id"] is None
    assert set(erasure.payload) == {"id", "erased_at"} and erasure.payload["id"] == str(uid)
    assert erasure.topic == "user-events" and erasure.aggregate_id == uid
    # An event erased before it was published still matches its schema when it is.
    schemas = {name: validator(path) for name, path in data_schemas().items()}
    failures = [f"{r.type}: {p}" for r in after for p in problems(schemas[r.type], r.payload)]
    assert not failures, failures
    async with app_services(app).sessionmaker() as db:
        deliveries = await db.scalars(select(MailDelivery).where(MailDelivery.user_id == uid))
        failed, skipped = sorted(deliveries, key=lambda d: d.status)
        # A finished mail keeps its outcome, without the address; one waiting to be tried
        # again never will be.
        assert (failed.status, failed.last_error) == (
            "failed",
            "550 5.1.1 <[erased]>: no such mailbox",
        )
        assert (skipped.status, skipped.last_error) == ("skipped", ERASED_RECIPIENT)
        assert skipped.next_attempt_at is None and skipped.finished_at is not None
        assert skipped.sealed is None and skipped.data is not None
        assert skipped.data["email"] == ERASED_EMAIL

    again = await cli("users", "erase", "--yes", email)
    assert again.code == 1 and again.err == f"no such user: {email}\n"
    assert len(await outbox(app, uid)) == len(after)


async def test_erase_refuses_the_last_admin(admin_app: AdminApp, cli: Cli) -> None:
    app, _, _, admin_email = admin_app
    run = await cli("users", "erase", "--yes", admin_email)
    assert run.code == 1
    assert run.err.startswith("refused: This is the last active admin")
    assert await _user(app, admin_email) is not None
    assert not await outbox(app, None, EventType.ERASED)


class _Terminal:
    """Standard input that is a terminal (getpass, patched, does the reading)."""

    def isatty(self) -> bool:
        return True

    def readline(self) -> str:
        raise AssertionError("the password must be asked for with getpass, not read")


async def test_create_admin_asks_twice_on_a_terminal(
    admin_app: AdminApp, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _, _, _ = admin_app
    email = unique_email("asked")
    answers: list[str] = []
    prompts: list[str] = []

    def getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return answers.pop(0)

    monkeypatch.setattr("getpass.getpass", getpass)
    monkeypatch.setattr(test_cli, "_Input", lambda _text: _Terminal())

    answers[:] = [NEW_ADMIN_PASSWORD, NEW_ADMIN_PASSWORD + " but different"]
    differ = await cli("create-admin", email)
    assert differ.code == 1 and differ.err == "the two passwords differ; nothing was created\n"
    assert await _user(app, email) is None

    answers[:] = [NEW_ADMIN_PASSWORD, NEW_ADMIN_PASSWORD]
    made = await cli("create-admin", email)
    assert made.code == 0, made.err
    assert len(prompts) == 4 and not answers
    user = await _user(app, email)
    assert user is not None and user.role == "admin"
