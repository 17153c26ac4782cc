"""Small typed FastAPI dependencies: what a route needs, by name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from src.config.settings import Settings
from src.services.connections import get_kafka_from_app, get_redis_from_app
from src.services.kafka.manager import KafkaManager


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessionmaker() as session:
        yield session


def get_redis(request: Request) -> Redis | None:
    return get_redis_from_app(request.app)


def get_kafka(request: Request) -> KafkaManager | None:
    return get_kafka_from_app(request.app)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
RedisDep = Annotated[Redis | None, Depends(get_redis)]
KafkaDep = Annotated[KafkaManager | None, Depends(get_kafka)]
