"""The long-lived security objects, built once at start-up and shared by every request.

Loading the signing key and sizing the hashing pool are expensive; doing them per request would
cost ~37 ms a token (PyJWT re-parses PEM text) and a thread pool per login.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from src.auth.jwt import AccessTokenCodec
from src.auth.passwords import PasswordHasher
from src.auth.rate_limit import LoginGuard, RequestThrottle
from src.config.settings import Settings
from src.security.sealing import Sealer
from src.users.cache import UserCache
from src.users.schemas import UserPublic

MAIL_REQUESTS_IN_FLIGHT = 32


@dataclass(frozen=True)
class Security:
    settings: Settings
    hasher: PasswordHasher
    tokens: AccessTokenCodec
    guard: LoginGuard
    throttle: RequestThrottle
    cache: UserCache
    sealer: Sealer
    # Mail requests (reset, verification) at work after their answer, at most this many at once.
    mail_requests: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAIL_REQUESTS_IN_FLIGHT)
    )

    def close(self) -> None:
        self.hasher.close()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user as of this request and the session its token belongs to."""

    user: UserPublic
    session_id: uuid.UUID
    # What the token was granted: the application (client_id) and its scopes; None for the
    # service's own API sign-in.
    client_id: str | None = None
    scope: str | None = None
    # How and when the user last authenticated in this session (from the token): step-up.
    amr: tuple[str, ...] = ()
    auth_time: int | None = None

    @property
    def id(self) -> uuid.UUID:
        return self.user.id

    @property
    def is_admin(self) -> bool:
        return self.user.role == "admin"
