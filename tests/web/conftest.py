"""Fixtures for the hosted pages: cheap hashing, no Kafka (tokens are read from the outbox),
fresh login and mail counters after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from src.config.settings import Settings
from tests.support.app import running_app
from tests.support.auth import QUICK_SETTINGS, forget_in_process_login_attempts
from tests.web.helpers import App


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**QUICK_SETTINGS, **overrides})

    return factory


@pytest_asyncio.fixture(autouse=True)
async def _forget_login_attempts(redis_client: Redis) -> AsyncIterator[None]:
    yield
    await forget_in_process_login_attempts(redis_client)


@pytest_asyncio.fixture
async def app(make_settings: Callable[..., Settings]) -> AsyncIterator[App]:
    async with running_app(make_settings()) as pair:
        yield pair
