"""Helpers for the authentication tests: token-endpoint calls, problem checks, outbox reads."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jwt
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.app.container import app_services
from src.auth.rate_limit import PREFIX as LOGIN_PREFIX
from src.auth.rate_limit import THROTTLE_PREFIX
from src.db.models import OneTimeToken, OutboxEvent, User, UserSession
from src.events.outbox import open_secret
from src.security.tokens import hash_token
from tests.support.app import PASSWORD

API = "/api/v1"
TOKEN_URL = f"{API}/auth/login"
REGISTER_URL = f"{API}/auth/register"
ME_URL = f"{API}/users/me"
SESSIONS_URL = f"{API}/users/me/sessions"
PUBLIC_FIELDS = {
    "id",
    "email",
    "full_name",
    "role",
    "is_active",
    "email_verified",
    "created_at",
    "updated_at",
    "version",
}
NOTIFICATIONS_TOPIC = "user-notifications"

# Every test logs in from the in-process client's one address: the per-IP limit is for attackers,
# not for a test suite (the brute-force tests set their own limits). Cheap hashing keeps account
# creation fast; the production parameters are covered by tests/test_passwords.py. Kafka is off
# because these tests read the outbox table, and a relay only slows shut-down.
QUICK_SETTINGS: dict[str, Any] = {
    "LOGIN_RATE_LIMIT_PER_IP": 100_000,
    "LOCKOUT_ACCOUNT_THRESHOLD": 100_000,
    "ARGON2_TIME_COST": 1,
    "ARGON2_MEMORY_COST": 8192,
    "KAFKA_ENABLED": False,
}


# Where httpx.ASGITransport says every request comes from, unless told otherwise.
IN_PROCESS_CLIENT_IP = "127.0.0.1"


def fresh_ip() -> str:
    """A client address of its own: a /64 (limits count IPv6 clients per /64) nobody else uses,
    so the shared Redis's memory of other tests' attempts does not count against it."""
    return f"2001:db8:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}::1"


@asynccontextmanager
async def client_from(app: FastAPI, ip: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose requests come from ``ip`` (a fresh address by default)."""
    transport = httpx.ASGITransport(app=app, client=(ip or fresh_ip(), 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def forget_in_process_login_attempts(redis: Redis) -> None:
    """Drop the shared Redis's per-IP login window of the in-process client address.

    Every test of the run logs in from that one address into the same Redis; the many logins
    here must not push a later test (with the default limit of 30 a minute) over it.
    """
    await redis.delete(f"{LOGIN_PREFIX}ip:{IN_PROCESS_CLIENT_IP}")
    for action in ("register", "password_reset", "verification", "email_change"):
        await redis.delete(f"{THROTTLE_PREFIX}{action}:ip:{IN_PROCESS_CLIENT_IP}")


async def password_grant(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD
) -> httpx.Response:
    return await client.post(
        TOKEN_URL, data={"grant_type": "password", "username": email, "password": password}
    )


async def refresh_grant(client: httpx.AsyncClient, refresh_token: str) -> httpx.Response:
    return await client.post(
        TOKEN_URL, data={"grant_type": "refresh_token", "refresh_token": refresh_token}
    )


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """An RFC 9457 answer with this status; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"], body
    return body


def assert_unauthenticated(response: httpx.Response) -> dict[str, Any]:
    body = assert_problem(response, 401)
    assert response.headers.get("www-authenticate") == "Bearer", response.headers
    return body


def assert_oauth_error(response: httpx.Response, error: str) -> dict[str, Any]:
    """An RFC 6749 section 5.2 answer: 400, JSON, ``error`` code, not cacheable."""
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    assert body["error"] == error, body
    return body


def unverified_claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def session_of(tokens: dict[str, Any]) -> str:
    return str(unverified_claims(tokens["access_token"])["sid"])


def _sessions(app: FastAPI) -> async_sessionmaker[AsyncSession]:
    maker: async_sessionmaker[AsyncSession] = app_services(app).sessionmaker
    return maker


async def outbox(
    app: FastAPI, user_id: str | uuid.UUID | None = None, type_: str | None = None
) -> list[OutboxEvent]:
    """Outbox rows in recording order, optionally for one user and of one type."""
    query = select(OutboxEvent).order_by(OutboxEvent.position)
    if user_id is not None:
        query = query.where(OutboxEvent.aggregate_id == uuid.UUID(str(user_id)))
    if type_ is not None:
        query = query.where(OutboxEvent.type == type_)
    async with _sessions(app)() as db:
        return list((await db.execute(query)).scalars().all())


async def one_time_secret(app: FastAPI, user_id: str, type_: str) -> dict[str, str]:
    """The sealed token and link the newest notification of this type carries for the user
    (opened with the app's key, as the mail courier does)."""
    rows = await outbox(app, user_id, type_)
    assert rows, f"no {type_} event for {user_id}"
    assert rows[-1].sealed is not None, "the link was already purged"
    assert "token" not in rows[-1].payload and "url" not in rows[-1].payload
    return open_secret(app_services(app).security.sealer, rows[-1].id, rows[-1].sealed)


async def one_time_token(app: FastAPI, user_id: str, type_: str) -> str:
    """The token the newest notification event of this type carries for the user."""
    return (await one_time_secret(app, user_id, type_))["token"]


async def user_row(app: FastAPI, email: str) -> User | None:
    async with _sessions(app)() as db:
        result = await db.execute(select(User).where(User.email == email))
        return result.scalar_one_or_none()


async def one_time_token_row(app: FastAPI, token: str) -> OneTimeToken:
    async with _sessions(app)() as db:
        row = await db.get(OneTimeToken, hash_token(token))
        assert row is not None
        return row


async def expire_one_time_token(app: FastAPI, token: str) -> None:
    async with _sessions(app)() as db:
        row = await db.get(OneTimeToken, hash_token(token))
        assert row is not None
        await db.execute(
            update(OneTimeToken)
            .where(OneTimeToken.token_hash == hash_token(token))
            .values(expires_at=row.created_at.replace(year=row.created_at.year - 1))
        )
        await db.commit()


async def set_active(app: FastAPI, user_id: str, active: bool) -> None:
    """Flip the flag in the database behind the service's back (no cache invalidation)."""
    async with _sessions(app)() as db:
        await db.execute(update(User).where(User.id == uuid.UUID(user_id)).values(is_active=active))
        await db.commit()


async def expire_session(app: FastAPI, session_id: str) -> None:
    """Move a session's end (sliding and absolute) into the past, as time passing would."""
    async with _sessions(app)() as db:
        row = await db.get(UserSession, uuid.UUID(session_id))
        assert row is not None
        past = row.created_at.replace(year=row.created_at.year - 1)
        await db.execute(
            update(UserSession)
            .where(UserSession.id == row.id)
            .values(expires_at=past, absolute_expires_at=past)
        )
        await db.commit()
