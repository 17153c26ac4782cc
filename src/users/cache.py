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
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from src.db.types import utcnow
from src.users.schemas import UserPublic

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

T = TypeVar("T")

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


class _BatchedReads:
    """Reads asked for in the same turn of the event loop go to Redis as one MGET.

    Every authenticated request reads two keys; under load many requests reach that point in
    the same turn of the loop. redis-py spends more CPU on a command than the rest of a cached
    request does, so one command for all of them is most of what a cached request costs
    (``make bench``). A lone request waits for nothing: its batch goes out on the next turn.
    """

    MAX_KEYS = 512

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._keys: list[str] = []
        self._answer: asyncio.Future[list[str | None]] | None = None
        self._sending: set[asyncio.Task[None]] = set()  # the loop holds tasks only weakly

    async def get(self, client: Redis, *keys: str) -> list[str | None]:
        if self._answer is None or len(self._keys) + len(keys) > self.MAX_KEYS:
            self._keys = []
            self._answer = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(self._send(client, self._keys, self._answer))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        start = len(self._keys)
        self._keys.extend(keys)
        values = await asyncio.shield(self._answer)
        return values[start : start + len(keys)]

    async def _send(
        self, client: Redis, keys: list[str], answer: asyncio.Future[list[str | None]]
    ) -> None:
        if self._answer is answer:
            self._answer = None  # later readers start the next batch
        try:
            async with asyncio.timeout(self._timeout):
                values: list[Any] = await client.mget(keys)
        except Exception as exc:  # noqa: BLE001 - every reader asks the database instead
            answer.set_exception(exc)
            answer.exception()  # retrieved here: readers that went away must not warn
        else:
            answer.set_result(values)
        finally:
            if not answer.done():  # cancelled (shut-down): nobody may wait for it for ever
                answer.cancel()


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
        self._loading: dict[tuple[uuid.UUID, uuid.UUID], asyncio.Task[Any]] = {}
        self._reads = _BatchedReads(timeout)

    async def load_once(
        self, user_id: uuid.UUID, session_id: uuid.UUID, load: Callable[[], Awaitable[T]]
    ) -> T:
        """Run ``load`` for a session's miss, unless one is already running: then share its
        answer (or its error). Every entry ages out after ``max_age_seconds``, and a busy token
        would otherwise send all of its requests in flight at that moment to the database.

        The load is a task of its own, shielded: a caller that goes away (its client hung up)
        does not cancel it for the others. ``invalidate`` forgets a running load of what it
        drops, so a request that starts after a logout never shares a read from before it."""
        key = (user_id, session_id)
        task = self._loading.get(key) or self._start(key, load)
        result: T = await asyncio.shield(task)
        return result

    def _start(
        self, key: tuple[uuid.UUID, uuid.UUID], load: Callable[[], Awaitable[Any]]
    ) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(load())
        self._loading[key] = task
        task.add_done_callback(lambda done: self._forget(key, done))
        return task

    def _forget(self, key: tuple[uuid.UUID, uuid.UUID], task: asyncio.Task[Any]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]
        if not task.cancelled():
            task.exception()  # a refresh nobody waited for: its failure only costs a later miss

    def refresh_soon(
        self, user_id: uuid.UUID, session_id: uuid.UUID, load: Callable[[], Awaitable[Any]]
    ) -> None:
        """Start ``load`` in the background (unless it runs already), for an entry still good
        but half way to ``max_age_seconds``: a session in steady use never misses, and its
        requests never wait for the database."""
        key = (user_id, session_id)
        if key not in self._loading:
            self._start(key, load)

    def ageing(self, state: SessionState) -> bool:
        return self._clock() - state.checked_at > self._max_age / 2

    async def get_auth(
        self, user_id: uuid.UUID, session_id: uuid.UUID
    ) -> tuple[UserPublic, SessionState] | None:
        """The cached user and session state, or ``None``: ask the database (and ``store``)."""
        client = self._redis()
        if client is None:
            return None
        try:
            user_raw, session_raw = await self._reads.get(
                client, user_key(user_id), session_key(session_id)
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
        user_ids, session_ids = set(user_ids), set(session_ids)
        for key in [k for k in self._loading if k[0] in user_ids or k[1] in session_ids]:
            del self._loading[key]
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
