"""Redis cache of what every authenticated request needs: the user and its session's state.

Redis only accelerates. A miss, an error of any kind (a reset connection surfaces as a
RuntimeError from the event loop's transport), an entry that no longer validates, or Redis being
down all mean "ask the database". An invalidation that fails is dangerous (a stale "active" entry
could outlive a deactivation), so a failed write marks Redis unavailable here, and the supervisor
empties this cache before using Redis again. Other instances still read their copy of Redis,
though; so no cached answer is believed for longer than ``AUTH_CACHE_MAX_AGE_SECONDS`` after the
database gave it: that bounds how late any instance honours a logout, whatever Redis did.

Keys carry a schema version: entries written by another version of the service are never read
(they expire by themselves), so a deploy that changes what is cached needs no flush.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from pydantic import BaseModel

from src.db.types import utcnow
from src.users.schemas import UserPublic

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

PREFIX = "ums:cache:"
# Bump when UserPublic or SessionState change shape.
SCHEMA_VERSION = 2


class SessionState(BaseModel):
    user_id: uuid.UUID
    expires_at: datetime
    revoked: bool
    # When the database said so (the user and the session were read together then).
    checked_at: datetime


def user_key(user_id: uuid.UUID) -> str:
    return f"{PREFIX}v{SCHEMA_VERSION}:user:{user_id}"


def session_key(session_id: uuid.UUID) -> str:
    return f"{PREFIX}v{SCHEMA_VERSION}:session:{session_id}"


class UserCache:
    def __init__(
        self,
        redis: Callable[[], Redis | None],
        ttl_seconds: int,
        timeout: float,
        on_write_failure: Callable[[], None],
        max_age_seconds: float = 1.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._redis = redis
        self._ttl = ttl_seconds
        self._timeout = timeout
        self._on_write_failure = on_write_failure
        self._max_age = timedelta(seconds=max_age_seconds)
        self._clock = clock

    async def get_auth(
        self, user_id: uuid.UUID, session_id: uuid.UUID
    ) -> tuple[UserPublic, SessionState] | None:
        """The cached user and session state, or ``None``: ask the database (and ``store``)."""
        client = self._redis()
        if client is None:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                user_raw, session_raw = await client.mget(
                    user_key(user_id), session_key(session_id)
                )
            if not user_raw or not session_raw:
                return None
            user = UserPublic.model_validate_json(user_raw)
            state = SessionState.model_validate_json(session_raw)
        except Exception:
            logger.debug("cache read failed", exc_info=True)
            return None
        if self._clock() - state.checked_at > self._max_age:
            return None  # too old to believe: another instance may have failed to drop it
        return user, state

    async def store(
        self,
        user: UserPublic | None,
        session_id: uuid.UUID | None = None,
        state: SessionState | None = None,
    ) -> None:
        """Best effort: a failed fill only costs the next request a database read."""
        client = self._redis()
        if client is None:
            return
        try:
            async with asyncio.timeout(self._timeout):
                async with client.pipeline(transaction=False) as pipe:
                    if user is not None:
                        pipe.set(user_key(user.id), user.model_dump_json(), ex=self._ttl)
                    if session_id is not None and state is not None:
                        pipe.set(session_key(session_id), state.model_dump_json(), ex=self._ttl)
                    await pipe.execute()
        except Exception:
            logger.debug("cache fill failed", exc_info=True)

    async def invalidate(
        self, user_ids: Iterable[uuid.UUID] = (), session_ids: Iterable[uuid.UUID] = ()
    ) -> None:
        keys = [user_key(u) for u in user_ids] + [session_key(s) for s in session_ids]
        client = self._redis()
        if not keys or client is None:
            return
        try:
            async with asyncio.timeout(self._timeout):
                await client.delete(*keys)
        except Exception as exc:  # noqa: BLE001 - any failure leaves a possibly stale entry behind
            logger.warning(
                "cache invalidation failed (%s); bypassing Redis until it is emptied",
                type(exc).__name__,
            )
            self._on_write_failure()


async def flush_cache(client: Redis, timeout: float = 5.0) -> int:
    """Delete every cache entry (run before trusting Redis again after an outage)."""
    deleted = 0
    batch: list[str] = []
    async with asyncio.timeout(timeout):
        async for key in client.scan_iter(match=f"{PREFIX}*", count=500):
            batch.append(key)
            if len(batch) >= 500:  # one round trip per batch, not per key
                deleted += await client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await client.unlink(*batch)
    return deleted
