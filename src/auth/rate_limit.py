"""Brute-force protection for password checks, and throttles for requests that send mail.

Password attempts (``LoginGuard``) are limited three ways, none of which hands an attacker a
switch to lock the real user out:

- per client address: a sliding window over every attempt (``LOGIN_RATE_LIMIT_*``);
- per (account, client address): a hard, escalating lock-out after ``LOCKOUT_FAILURE_THRESHOLD``
  consecutive failures (Keycloak's escalation) — it stops that address, nobody else;
- per account, from all addresses: past ``LOCKOUT_ACCOUNT_THRESHOLD`` consecutive failures,
  attempts are spaced out by a gentle, capped delay — except from an address that signed in to
  the account recently, which failures elsewhere never slow down.

Every attempt is counted *before* the password is checked (and forgotten again when it was
right), so twenty parallel guesses cannot all slip under a threshold of five.

Requests that send mail or create accounts (``RequestThrottle``) get sliding windows per client
address and per target email address.

Redis holds the state so every instance sees the same counts; each decision is one Lua script, so
concurrent requests cannot both take the last slot, and a refused attempt is counted nowhere. The
scripts read the Redis server's ``TIME`` (one clock for all instances) unless a clock is injected
(tests). When Redis is disabled or unreachable, ``InProcessLimiter`` takes the same decisions from
this process's memory: the service never fails open, it says so once in the log, and
``fallback_count`` counts every decision taken that way.

Keys never contain an email (a SHA-256 prefix stands in) and group IPv6 clients by their /64,
the block one subscriber usually holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from src.auth.rate_limit_local import (
    ASK_KNOWN,
    DEFAULT_MAX_TRACKED_KEYS,
    InProcessLimiter,
    LoginPolicy,
)
from src.config.settings import Settings
from src.services import metrics

__all__ = [
    "InProcessLimiter",
    "LoginDecision",
    "LoginGuard",
    "LoginPolicy",
    "RequestThrottle",
    "account_digest",
    "client_key",
]

logger = logging.getLogger(__name__)

PREFIX = "ums:login:"
THROTTLE_PREFIX = "ums:throttle:"

# Any failure of a Redis call means "not there right now": a connection reset surfaces as a
# RuntimeError from the event loop's transport, a timeout as TimeoutError, a refused connection as
# OSError. Limits must then come from the fallback, never turn into a 500.
_REDIS_DOWN = (RedisError, TimeoutError, OSError, RuntimeError)

# Shared by both scripts: the clock (an injected one from ARGV[1], else the server's), and the
# wait before a sliding window of ``limit`` entries has room (0 when it has).
_LUA_PRELUDE = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function window_wait(key, limit, window)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if count < limit then return 0 end
  local entry = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
  return tonumber(entry[2]) + window - now
end
"""

# KEYS: address window, (account, address) failures, account failures.
# ARGV: now or '', window, per-address limit, threshold, increment, max wait, reset,
#       account threshold, account increment, account max delay, known (0 no, 1 yes, 2 ask),
#       unique member.
# Returns {wait ms, lock-out ms this attempt starts if it fails}; {-1, 0} asks whether the
# address is known to the account (only then does the account's delay apply).
_ADMIT_LUA = (
    _LUA_PRELUDE
    + """
local window, per_ip = tonumber(ARGV[2]), tonumber(ARGV[3])
local threshold, increment, max_wait = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local reset = tonumber(ARGV[7])
local acct_threshold, acct_increment = tonumber(ARGV[8]), tonumber(ARGV[9])
local acct_max, known = tonumber(ARGV[10]), tonumber(ARGV[11])

local pair = redis.call('HMGET', KEYS[2], 'count', 'last', 'locked_until')
local pair_count, pair_last = tonumber(pair[1]) or 0, tonumber(pair[2]) or 0
local locked_until = tonumber(pair[3]) or 0
if now - pair_last >= reset then pair_count = 0 end

local acct = redis.call('HMGET', KEYS[3], 'count', 'last')
local acct_count, acct_last = tonumber(acct[1]) or 0, tonumber(acct[2]) or 0
if now - acct_last >= reset then acct_count = 0 end

local wait = math.max(0, locked_until - now, window_wait(KEYS[1], per_ip, window))
if wait == 0 and acct_count >= acct_threshold and known ~= 1 then
  if known == 2 then return {-1, 0} end
  local delay = math.min(acct_increment * (acct_count - acct_threshold + 1), acct_max)
  wait = math.max(0, acct_last + delay - now)
end
if wait > 0 then return {math.ceil(wait), 0} end

redis.call('ZADD', KEYS[1], now, ARGV[12])
redis.call('PEXPIRE', KEYS[1], window)
pair_count = pair_count + 1
local lock = 0
if pair_count >= threshold then
  lock = math.min(increment * (pair_count - threshold + 1), max_wait)
  locked_until = math.max(locked_until, now + lock)
end
redis.call('HSET', KEYS[2], 'count', pair_count, 'last', now, 'locked_until', locked_until)
redis.call('PEXPIRE', KEYS[2], math.max(reset, locked_until - now))
redis.call('HSET', KEYS[3], 'count', acct_count + 1, 'last', now)
redis.call('PEXPIRE', KEYS[3], reset)
return {0, lock}
"""
)

# KEYS: the windows. ARGV: now or '', window, unique member, then one limit per key.
# Returns the wait in ms (0 = admitted and counted in every window).
_HIT_LUA = (
    _LUA_PRELUDE
    + """
local window = tonumber(ARGV[2])
local wait = 0
for i, key in ipairs(KEYS) do
  wait = math.max(wait, window_wait(key, tonumber(ARGV[3 + i]), window))
end
if wait > 0 then return math.ceil(wait) end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[3])
  redis.call('PEXPIRE', key, window)
end
return 0
"""
)

T = TypeVar("T")
KnownAddress = Callable[[], Awaitable[bool]]


def account_digest(account: str) -> str:
    """128 bits of SHA-256: no email in Redis keys, and no practical collisions between accounts."""
    return hashlib.sha256(account.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def client_key(ip: str) -> str:
    """The unit limits count per: an IPv4 address, or the /64 an IPv6 address belongs to."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _seconds(wait_ms: float) -> float | None:
    """A wait for ``Retry-After``: whole seconds, rounded up, at least 1; ``None`` for no wait."""
    if wait_ms <= 0:
        return None
    return float(max(1, math.ceil(wait_ms / 1000)))


@dataclass(frozen=True)
class LoginDecision:
    """``wait``: refused, retry after this many seconds. Otherwise admitted, and
    ``lock_if_wrong`` says how long this address is locked out of the account should the
    password be wrong (``None``: not at all)."""

    wait: float | None = None
    lock_if_wrong: float | None = None


class _RedisOrLocal:
    """Runs a decision in Redis, or in this process when Redis is not there.

    An injected ``clock`` drives both (tests); by default Redis uses its own.
    """

    # The ``limiter`` label of the fallback metrics.
    metric_label = "login"

    def __init__(
        self,
        settings: Settings,
        redis: Callable[[], Redis | None],
        what: str,
        local: InProcessLimiter,
        clock: Callable[[], float] | None,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._what = what
        self._local = local
        self._clock = clock
        self._client: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._degraded = False
        self.fallback_count = 0
        # The gauge follows ``_degraded``: a new limiter starts on Redis, whatever one before it
        # in this process (an app started earlier, as in the tests) last said.
        metrics.LIMITER_FALLBACK.labels(self.metric_label).set(0)

    @property
    def degraded(self) -> bool:
        """Whether the last decision was taken by the in-process limiter."""
        return self._degraded

    def _now_arg(self) -> str:
        """ "Now" for a script: the injected clock's, or empty for the Redis server's own."""
        return str(int(self._clock() * 1000)) if self._clock else ""

    def _script(self, client: Redis, source: str) -> AsyncScript:
        # Registering only hashes the text locally; EVALSHA loads the script on first use.
        if client is not self._client:
            self._client, self._scripts = client, {}
        if source not in self._scripts:
            self._scripts[source] = client.register_script(source)
        return self._scripts[source]

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
                    metrics.LIMITER_FALLBACK.labels(self.metric_label).set(0)
                    logger.info("%s is using Redis again", self._what)
                return result
        self.fallback_count += 1
        metrics.LIMITER_FALLBACK_DECISIONS.labels(self.metric_label).inc()
        return local()

    def _fall_back(self, reason: str) -> None:
        if not self._degraded:
            self._degraded = True
            metrics.LIMITER_FALLBACK.labels(self.metric_label).set(1)
            logger.warning(
                "%s falls back to the in-process limiter (%s); limits now apply per process",
                self._what,
                reason,
            )


class LoginGuard(_RedisOrLocal):
    """Decides whether a password may be checked; see the module docstring for how."""

    def __init__(
        self,
        settings: Settings,
        redis: Callable[[], Redis | None],
        clock: Callable[[], float] | None = None,
        max_tracked_keys: int = DEFAULT_MAX_TRACKED_KEYS,
    ) -> None:
        self._policy = LoginPolicy.from_settings(settings)
        local = InProcessLimiter(
            self._policy.window_ms, clock or time.time, max_tracked_keys, self._policy.reset_ms
        )
        super().__init__(settings, redis, "Login rate limiting", local, clock)

    @staticmethod
    def _keys(ip: str, account: str) -> list[str]:
        address, digest = client_key(ip), account_digest(account)
        return [
            f"{PREFIX}ip:{address}",
            f"{PREFIX}pair:{digest}:{address}",
            f"{PREFIX}acct:{digest}",
        ]

    async def admit(self, ip: str, account: str, known_address: KnownAddress) -> LoginDecision:
        """Before a password is checked. Counts the attempt as a failure until ``succeeded``.

        ``known_address`` says whether ``ip`` signed in to the account recently; it is only asked
        when the account's delay would otherwise apply.
        """
        keys, policy = self._keys(ip, account), self._policy
        member = secrets.token_hex(8)

        async def decide(known: int) -> tuple[float, float]:
            async def remote(client: Redis) -> tuple[float, float]:
                args: list[int | str] = [
                    self._now_arg(), policy.window_ms, policy.per_ip, policy.threshold,
                    policy.increment_ms, policy.max_wait_ms, policy.reset_ms,
                    policy.account_threshold, policy.account_increment_ms,
                    policy.account_max_delay_ms, known, member,
                ]  # fmt: skip
                wait, lock = await self._script(client, _ADMIT_LUA)(keys=keys, args=args)
                return float(wait), float(lock)

            ip_key, pair_key, account_key = keys
            return await self._decide(
                remote, lambda: self._local.admit(policy, ip_key, pair_key, account_key, known)
            )

        wait_ms, lock_ms = await decide(ASK_KNOWN)
        if wait_ms == -1:
            wait_ms, lock_ms = await decide(1 if await known_address() else 0)
        if wait_ms > 0:
            return LoginDecision(wait=_seconds(wait_ms))
        return LoginDecision(lock_if_wrong=lock_ms / 1000 if lock_ms > 0 else None)

    async def succeeded(self, ip: str, account: str) -> None:
        """The password was right: forget the failures counted for the account and this address.

        Failures this process counted during an outage are forgotten too, so a later outage does
        not resume a stale streak.
        """
        keys = self._keys(ip, account)[1:]
        self._local.forget(*keys)

        async def remote(client: Redis) -> None:
            await client.delete(*keys)

        await self._decide(remote, lambda: None)

    async def forget_account(self, account: str) -> None:
        """The owner proved control of the account's mail (a password reset): end its streak,
        so the owner is not left waiting behind an attack's failures."""
        key = self._keys("", account)[2]
        self._local.forget(key)

        async def remote(client: Redis) -> None:
            await client.delete(key)

        await self._decide(remote, lambda: None)


class RequestThrottle(_RedisOrLocal):
    """Sliding windows per client address and per target email for one kind of request."""

    metric_label = "throttle"

    def __init__(
        self,
        settings: Settings,
        redis: Callable[[], Redis | None],
        clock: Callable[[], float] | None = None,
        max_tracked_keys: int = DEFAULT_MAX_TRACKED_KEYS,
    ) -> None:
        self._window_ms = settings.MAIL_RATE_LIMIT_WINDOW_SECONDS * 1000
        self._per_ip = settings.MAIL_RATE_LIMIT_PER_IP
        self._per_address = settings.MAIL_RATE_LIMIT_PER_ADDRESS
        local = InProcessLimiter(self._window_ms, clock or time.time, max_tracked_keys)
        super().__init__(settings, redis, "Request throttling", local, clock)

    async def hit(self, action: str, ip: str, address: str | None = None) -> float | None:
        """Count one ``action`` request; ``None`` if within the limits, else seconds to wait."""
        limits: list[tuple[str, int]] = [
            (f"{THROTTLE_PREFIX}{action}:ip:{client_key(ip)}", self._per_ip)
        ]
        if address is not None:
            limits.append(
                (f"{THROTTLE_PREFIX}{action}:to:{account_digest(address)}", self._per_address)
            )
        return _seconds(await self._hit(limits))

    async def _hit(self, limits: Sequence[tuple[str, int]]) -> float:
        keys = [key for key, _ in limits]
        member = secrets.token_hex(8)

        async def remote(client: Redis) -> float:
            args: list[int | str] = [
                self._now_arg(),
                self._window_ms,
                member,
                *(limit for _, limit in limits),
            ]
            return float(await self._script(client, _HIT_LUA)(keys=keys, args=args))

        return await self._decide(remote, lambda: self._local.hit(limits))
