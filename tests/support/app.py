"""Helpers shared by the tests (plain functions, not fixtures)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from src.config.settings import Settings
from src.main import create_app


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app with its lifespan entered, and an HTTP client talking to it in-process."""
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client


# Start-up and shut-down must end within this, however loaded the machine: far above what they
# take (measured by `make bench`), far below the 40 s an unbounded Kafka client would wait.
BOUND = 20.0


class bounded_app:
    """``running_app`` whose start-up and shut-down must each end within ``BOUND``: a hang fails
    the test, slowness on a busy machine does not."""

    def __init__(self, settings: Settings) -> None:
        self._cm = running_app(settings)

    async def __aenter__(self) -> tuple[FastAPI, httpx.AsyncClient]:
        async with asyncio.timeout(BOUND):
            return await self._cm.__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        async with asyncio.timeout(BOUND):
            await self._cm.__aexit__(*exc)  # type: ignore[arg-type]


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1) -> Any:
    """Poll an async or sync ``check`` until it returns a truthy value; fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")
        await asyncio.sleep(interval)


# What tests send to see the details of /api/v1/health* (HEALTH_DETAILS_TOKEN in make_settings).
OPERATOR_TOKEN = "operator-token-for-tests"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


# --- accounts -------------------------------------------------------------------------------------

PASSWORD = "correct horse battery staple"


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.com"


async def register(
    client: httpx.AsyncClient, email: str | None = None, password: str = PASSWORD, **extra: Any
) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/auth/register",
        json={"email": email or unique_email(), "password": password, **extra},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def login(client: httpx.AsyncClient, email: str, password: str = PASSWORD) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/auth/login",
        data={"grant_type": "password", "username": email, "password": password},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def bearer(tokens: dict[str, Any] | str) -> dict[str, str]:
    token = tokens if isinstance(tokens, str) else tokens["access_token"]
    return {"Authorization": f"Bearer {token}"}


async def signed_in(
    client: httpx.AsyncClient, **extra: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """Register a fresh user and sign it in: (user, auth headers)."""
    user = await register(client, **extra)
    tokens = await login(client, user["email"])
    return user, bearer(tokens)


async def assert_no_leftover_tasks(before: set[asyncio.Task[Any]]) -> None:
    """Fail if tasks started since ``before`` (a snapshot of ``asyncio.all_tasks()``) still run
    once cancelled tasks have had a few seconds to finish unwinding."""

    def leftover() -> set[asyncio.Task[Any]]:
        return asyncio.all_tasks() - before - {asyncio.current_task()}

    try:
        await eventually(lambda: not leftover(), timeout=5, interval=0.05)
    except AssertionError:
        raise AssertionError(sorted(repr(task.get_coro()) for task in leftover())) from None
