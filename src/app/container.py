"""Everything the running app holds, in one typed object (``app.state.services``).

Built at start-up by ``src.app.wiring``; settings (``app.state.settings``) and the Redis and
Kafka connections (``app.state.connections``, the specification's functions manage them) exist
from the moment the app is created, and the container refers to the same objects.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from src.auth.context import Security
from src.config.settings import Settings
from src.events.audit import AuditConsumer
from src.events.relay import OutboxRelay
from src.mail.courier import Courier
from src.oauth.clients import FirstPartyClients
from src.services.connections import Connections

if TYPE_CHECKING:
    from src.app.health import HealthShares


@dataclass
class AppServices:
    settings: Settings
    connections: Connections
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    security: Security
    # Set by every commit that recorded events: wakes the relay (or the courier) at once.
    outbox_signal: asyncio.Event
    health: HealthShares
    # Which applications' tokens the account API accepts (looked up once a moment, not per call).
    first_party: FirstPartyClients
    # Background work the app owns and cancels at shut-down.
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    relay: OutboxRelay | None = None
    audit_consumer: AuditConsumer | None = None
    courier: Courier | None = None


def app_services(app: FastAPI) -> AppServices:
    """The app's container; only there while the app runs (between start-up and shut-down)."""
    services: AppServices = app.state.services
    return services
