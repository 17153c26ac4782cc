"""Redis cache of what every authenticated request needs: the user and its session's state.

Redis only accelerates. A miss, an error or Redis being down all mean "ask the database". An
invalidation that fails is dangerous (a stale "active" entry could outlive a deactivation), so a
failed write marks Redis unavailable; the supervisor empties this cache before using Redis again.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import RedisError

from src.users.schemas import UserPublic

logger = logging.getLogger(__name__)

PREFIX = "ums:cache:"


class SessionState(BaseModel):
    user_id: uuid.UUID
    expires_at: datetime
    revoked: bool


def _user_key(user_id: uuid.UUID) -> str:
    return f"{PREFIX}user:{user_id}"


def _session_key(session_id: uuid.UUID) -> str:
    return f"{PREFIX}session:{session_id}"


class UserCache:
    def __init__(
        self,
        redis: Callable[[], Redis | None],
        ttl_seconds: int,
        timeout: float,
        on_write_failure: Callable[[], None],
    ) -> None:
        self._redis = redis
        self._ttl = ttl_seconds
        self._timeout = timeout
        self._on_write_failure = on_write_failure

    async def get_auth(
        self, user_id: uuid.UUID, session_id: uuid.UUID
    ) -> tuple[UserPublic | None, SessionState | None]:
        client = self._redis()
        if client is None:
            return None, None
        try:
            async with asyncio.timeout(self._timeout):
                user_raw, session_raw = await client.mget(
                    _user_key(user_id), _session_key(session_id)
                )
        except (RedisError, TimeoutError, OSError):
            return None, None
        user = UserPublic.model_validate_json(user_raw) if user_raw else None
        session = SessionState.model_validate_json(session_raw) if session_raw else None
        return user, session

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
                        pipe.set(_user_key(user.id), user.model_dump_json(), ex=self._ttl)
                    if session_id is not None and state is not None:
                        pipe.set(_session_key(session_id), state.model_dump_json(), ex=self._ttl)
                    await pipe.execute()
        except (RedisError, TimeoutError, OSError):
            logger.debug("cache fill failed", exc_info=True)

    async def invalidate(
        self, user_ids: Iterable[uuid.UUID] = (), session_ids: Iterable[uuid.UUID] = ()
    ) -> None:
        keys = [_user_key(u) for u in user_ids] + [_session_key(s) for s in session_ids]
        client = self._redis()
        if not keys or client is None:
            return
        try:
            async with asyncio.timeout(self._timeout):
                await client.delete(*keys)
        except (RedisError, TimeoutError, OSError) as exc:
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
