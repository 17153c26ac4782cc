"""Accounts for the run, made through the real API (register, then log in), never the database:
what the figures measure must be what a client of the service gets.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

API = "/api/v1"
PASSWORD = "bench-correct-horse-battery-7"


@dataclass(frozen=True)
class Account:
    id: str
    email: str
    access_token: str


async def register(client: httpx.AsyncClient, email: str) -> dict[str, Any]:
    reply = await client.post(f"{API}/auth/register", json={"email": email, "password": PASSWORD})
    if reply.status_code != 201:
        raise RuntimeError(f"register {email}: {reply.status_code} {reply.text[:300]}")
    body: dict[str, Any] = reply.json()
    return body


async def login(client: httpx.AsyncClient, email: str, password: str = PASSWORD) -> dict[str, Any]:
    form = {"grant_type": "password", "username": email, "password": password}
    reply = await client.post(f"{API}/auth/login", data=form)
    if reply.status_code != 200:
        raise RuntimeError(f"login {email}: {reply.status_code} {reply.text[:300]}")
    body: dict[str, Any] = reply.json()
    return body


async def _bounded(limit: int, calls: list[Any]) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(call: Any) -> Any:
        async with gate:
            return await call

    return list(await asyncio.gather(*(one(c) for c in calls)))


@dataclass(frozen=True)
class Seeded:
    admin: Account
    user: Account
    me_body: dict[str, Any]
    page_body: dict[str, Any]


async def seed(base: str, admin_email: str, admin_password: str, extra_users: int) -> Seeded:
    """The first admin (made by the service from FIRST_ADMIN_*) signs in; one user registers and
    signs in; ``extra_users`` more register, so that ``GET /users?limit=50`` is a full page.
    Returns also the service's real answers, which the bare app copies."""
    prefix = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        admin_tokens = await login(client, admin_email, admin_password)
        me = await client.get(
            f"{API}/users/me", headers={"Authorization": f"Bearer {admin_tokens['access_token']}"}
        )
        me.raise_for_status()
        admin = Account(str(me.json()["id"]), admin_email, admin_tokens["access_token"])

        email = f"bench-{prefix}@example.com"
        registered = await register(client, email)
        user = Account(str(registered["id"]), email, (await login(client, email))["access_token"])

        await _bounded(
            8, [register(client, f"seed-{prefix}-{n}@example.com") for n in range(extra_users)]
        )
        user_headers = {"Authorization": f"Bearer {user.access_token}"}
        me_body = (await client.get(f"{API}/users/me", headers=user_headers)).json()
        admin_headers = {"Authorization": f"Bearer {admin.access_token}"}
        page = await client.get(f"{API}/users", params={"limit": 50}, headers=admin_headers)
        page.raise_for_status()
    return Seeded(admin, user, me_body, page.json())


async def refresh_tokens(base: str, email: str, count: int) -> list[str]:
    """``count`` live refresh tokens of ``email`` (one login, so one session, each)."""
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        replies = await _bounded(16, [login(client, email) for _ in range(count)])
    return [str(r["refresh_token"]) for r in replies]
