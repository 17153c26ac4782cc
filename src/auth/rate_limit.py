"""Brute-force protection for the password grant: sliding windows per IP and per account, and a
Keycloak-style escalating lock-out per account.

Redis holds the state so every instance of the service sees the same counts. Each decision is one
Lua script, so concurrent logins cannot both take the last slot, and a refused attempt is counted
against neither key. The scripts read the Redis server's ``TIME`` rather than taking the client's
clock: all instances then measure windows and lock-outs against one clock, so skew between
application hosts cannot stretch or shrink a window (allowed in scripts since Redis 5, whose
effects replication copies the resulting writes, not the call to ``TIME``).

When Redis is disabled or unreachable, ``InProcessLimiter`` takes the same decisions from this
process's memory: the service never fails open, it says so once in the log, and ``fallback_count``
counts every decision taken that way.

Redis keys never contain an email: accounts are keyed by a SHA-256 prefix of the normalised email.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from src.auth.rate_limit_local import DEFAULT_MAX_TRACKED_KEYS, InProcessLimiter, LoginPolicy
from src.config.settings import Settings

__all__ = ["InProcessLimiter", "LoginGuard", "LoginPolicy"]

logger = logging.getLogger(__name__)

PREFIX = "ums:login:"

# Errors that mean "Redis is not there right now" (asyncio.TimeoutError is TimeoutError since
# 3.11). Anything else, such as a script error, is a bug and must surface, not hide in a fallback.
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, TimeoutError)

# KEYS: IP window, account window, account failures.
# ARGV: window ms, IP limit, account limit, unique member for this attempt.
# Returns the wait in ms, or 0 when the attempt was admitted and counted in both windows.
_CHECK_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])

local wait = 0
local locked_until = tonumber(redis.call('HGET', KEYS[3], 'locked_until')) or 0
if locked_until > now then wait = locked_until - now end

local function window_wait(key, limit)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if count < limit then return 0 end
  local entry = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
  return tonumber(entry[2]) + window - now
end

wait = math.max(wait, window_wait(KEYS[1], tonumber(ARGV[2])),
                window_wait(KEYS[2], tonumber(ARGV[3])))
if wait > 0 then return math.ceil(wait) end

for i = 1, 2 do
  redis.call('ZADD', KEYS[i], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[i], window)
end
return 0
"""

# KEYS: account failures (hash: count, last, locked_until).
# ARGV: threshold, wait increment ms, maximum wait ms, failure reset ms.
# Returns the lock-out this failure started or extended, in ms (0 = none).
_FAILURE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local threshold = tonumber(ARGV[1])
local reset = tonumber(ARGV[4])

local state = redis.call('HMGET', KEYS[1], 'count', 'last', 'locked_until')
local count = tonumber(state[1]) or 0
local last = tonumber(state[2]) or 0
local locked_until = tonumber(state[3]) or 0
if now - last >= reset then count = 0 end
count = count + 1

local wait = 0
if count >= threshold then
  wait = math.min(tonumber(ARGV[2]) * (count - threshold + 1), tonumber(ARGV[3]))
  locked_until = math.max(locked_until, now + wait)
end
redis.call('HSET', KEYS[1], 'count', count, 'last', now, 'locked_until', locked_until)
redis.call('PEXPIRE', KEYS[1], math.max(reset, locked_until - now))
return wait
"""

T = TypeVar("T")


def account_digest(account: str) -> str:
    """128 bits of SHA-256: no email in Redis keys, and no practical collisions between accounts."""
    return hashlib.sha256(account.encode()).hexdigest()[:32]


def _seconds(wait_ms: float) -> float | None:
    """A wait for ``Retry-After``: whole seconds, rounded up, at least 1; ``None`` for no wait."""
    if wait_ms <= 0:
        return None
    return float(max(1, math.ceil(wait_ms / 1000)))


class LoginGuard:
    """Decides whether a login attempt may proceed; see the module docstring for how."""

    def __init__(
        self,
        settings: Settings,
        redis: Callable[[], Redis | None],
        clock: Callable[[], float] = time.time,
        max_tracked_keys: int = DEFAULT_MAX_TRACKED_KEYS,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._policy = LoginPolicy.from_settings(settings)
        self._local = InProcessLimiter(self._policy, clock, max_tracked_keys)
        self._client: Redis | None = None
        self._scripts: tuple[AsyncScript, AsyncScript] | None = None
        self._degraded = False
        self.fallback_count = 0

    @property
    def degraded(self) -> bool:
        """Whether the last decision was taken by the in-process limiter."""
        return self._degraded

    async def check(self, ip: str, account: str) -> float | None:
        """Before verifying a password: None if the attempt may proceed, else seconds to wait
        (Retry-After). Counts the attempt in the sliding windows (per IP and per account)."""
        digest = account_digest(account)
        keys = [f"{PREFIX}ip:{ip}", f"{PREFIX}account:{digest}", f"{PREFIX}failures:{digest}"]
        policy = self._policy

        async def remote(client: Redis) -> float:
            script = self._scripts_for(client)[0]
            args: list[int | str] = [
                policy.window_ms,
                policy.per_ip,
                policy.per_account,
                secrets.token_hex(8),
            ]
            return float(await script(keys=keys, args=args))

        return _seconds(await self._decide(remote, lambda: self._local.check(*keys)))

    async def record_failure(self, ip: str, account: str) -> float | None:
        """After a wrong password: counts a consecutive failure for the account; returns the
        lock-out seconds if this failure triggered/extended a lock-out, else None.

        ``ip`` is not used: per-IP guessing is bounded by the sliding window, which counts every
        attempt, and a lock-out belongs to the account whatever address the failures came from.
        """
        key = f"{PREFIX}failures:{account_digest(account)}"
        policy = self._policy

        async def remote(client: Redis) -> float:
            script = self._scripts_for(client)[1]
            args = [policy.threshold, policy.increment_ms, policy.max_wait_ms, policy.reset_ms]
            return float(await script(keys=[key], args=args))

        wait_ms = await self._decide(remote, lambda: self._local.record_failure(key))
        return wait_ms / 1000 if wait_ms > 0 else None

    async def record_success(self, account: str) -> None:
        """After a correct password: clears the account's consecutive failures."""
        key = f"{PREFIX}failures:{account_digest(account)}"
        # Failures this process counted during an outage are forgotten too, so a later outage
        # does not resume a stale streak.
        self._local.record_success(key)

        async def remote(client: Redis) -> None:
            await client.delete(key)

        await self._decide(remote, lambda: None)

    def _scripts_for(self, client: Redis) -> tuple[AsyncScript, AsyncScript]:
        # Registering only hashes the text locally; EVALSHA loads the script on first use.
        if self._scripts is None or client is not self._client:
            self._client = client
            self._scripts = (
                client.register_script(_CHECK_LUA),
                client.register_script(_FAILURE_LUA),
            )
        return self._scripts

    async def _decide(self, remote: Callable[[Redis], Awaitable[T]], local: Callable[[], T]) -> T:
        client = self._redis()
        if client is None:
            self._fall_back("Redis is disabled or unavailable")
        else:
            try:
                async with asyncio.timeout(self._settings.HEALTH_CHECK_TIMEOUT):
                    result = await remote(client)
            except _REDIS_DOWN as exc:
                self._fall_back(str(exc) or type(exc).__name__)
            else:
                if self._degraded:
                    self._degraded = False
                    logger.info("Login rate limiting is using Redis again")
                return result
        self.fallback_count += 1
        return local()

    def _fall_back(self, reason: str) -> None:
        if not self._degraded:
            self._degraded = True
            logger.warning(
                "Login rate limiting falls back to the in-process limiter (%s); "
                "limits now apply per process",
                reason,
            )
