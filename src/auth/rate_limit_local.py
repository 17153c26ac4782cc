"""The login limits as plain Python, for when Redis cannot be reached.

It mirrors the two Lua scripts in ``src.auth.rate_limit`` step by step (same keys, same
millisecond arithmetic, same rounding) so a login is judged the same way with or without Redis;
the only difference is scope: this state lives in one process, so with N workers an attacker gets
N times the limits while Redis is down. That is the price of staying up, and it is logged.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from src.config.settings import Settings

# Each of the two tables below holds at most this many keys by default.
DEFAULT_MAX_TRACKED_KEYS = 10_000


@dataclass(frozen=True)
class LoginPolicy:
    """The settings the limiter needs, in milliseconds (the unit both implementations count in)."""

    window_ms: int
    per_ip: int
    per_account: int
    threshold: int
    increment_ms: int
    max_wait_ms: int
    reset_ms: int

    @classmethod
    def from_settings(cls, settings: Settings) -> LoginPolicy:
        return cls(
            window_ms=settings.LOGIN_RATE_LIMIT_WINDOW_SECONDS * 1000,
            per_ip=settings.LOGIN_RATE_LIMIT_PER_IP,
            per_account=settings.LOGIN_RATE_LIMIT_PER_ACCOUNT,
            threshold=settings.LOCKOUT_FAILURE_THRESHOLD,
            increment_ms=settings.LOCKOUT_WAIT_INCREMENT_SECONDS * 1000,
            max_wait_ms=settings.LOCKOUT_MAX_WAIT_SECONDS * 1000,
            reset_ms=settings.LOCKOUT_FAILURE_RESET_SECONDS * 1000,
        )

    def lock_ms(self, failures: int) -> int:
        """Keycloak's escalation: one increment at the threshold, one more per further failure."""
        if failures < self.threshold:
            return 0
        return min(self.increment_ms * (failures - self.threshold + 1), self.max_wait_ms)


@dataclass
class _Failures:
    count: int
    last_ms: float
    locked_until_ms: float


class InProcessLimiter:
    """Sliding windows and lock-outs in this process's memory, bounded.

    Memory bound: at most ``max_keys`` window keys (IPs and accounts together), each holding at most
    its limit of timestamps because a refused attempt is not stored, plus at most ``max_keys``
    failure records. With the defaults (10,000 keys, 30 attempts per IP) that is a few tens of MB
    in the worst case. Expired entries are pruned from the least recently used end on every call;
    when a table is still full, its least recently used key is evicted. Eviction can forget a
    lock-out under a flood of distinct keys: the trade for not being an out-of-memory vector.

    Methods return waits in milliseconds (0 = allowed) and take the same key strings as Redis.
    """

    def __init__(
        self,
        policy: LoginPolicy,
        clock: Callable[[], float] = time.time,
        max_keys: int = DEFAULT_MAX_TRACKED_KEYS,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._policy = policy
        self._clock = clock
        self._max_keys = max_keys
        self._last_now = 0.0
        # Ordered by last insertion, so the front is always the first to expire.
        self._windows: OrderedDict[str, deque[float]] = OrderedDict()
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    @property
    def tracked_keys(self) -> int:
        return len(self._windows) + len(self._failures)

    def _now_ms(self) -> float:
        # Wall clocks can step back; the windows assume time never does.
        self._last_now = max(self._last_now, self._clock() * 1000)
        return self._last_now

    def check(self, ip_key: str, account_key: str, failures_key: str) -> float:
        now = self._now_ms()
        self._prune(now)
        wait = 0.0
        failures = self._failures.get(failures_key)
        if failures is not None and failures.locked_until_ms > now:
            wait = failures.locked_until_ms - now
        wait = max(
            wait,
            self._window_wait(ip_key, self._policy.per_ip, now),
            self._window_wait(account_key, self._policy.per_account, now),
        )
        if wait > 0:
            return wait
        for key in (ip_key, account_key):
            stamps = self._windows.setdefault(key, deque())
            stamps.append(now)
            self._windows.move_to_end(key)
        self._cap(self._windows)
        return 0.0

    def record_failure(self, failures_key: str) -> float:
        now = self._now_ms()
        self._prune(now)
        state = self._failures.pop(failures_key, None) or _Failures(0, 0.0, 0.0)
        if now - state.last_ms >= self._policy.reset_ms:
            state.count = 0
        state.count += 1
        state.last_ms = now
        wait = self._policy.lock_ms(state.count)
        if wait:
            state.locked_until_ms = max(state.locked_until_ms, now + wait)
        self._failures[failures_key] = state
        self._cap(self._failures)
        return float(wait)

    def record_success(self, failures_key: str) -> None:
        self._failures.pop(failures_key, None)

    def _window_wait(self, key: str, limit: int, now: float) -> float:
        stamps = self._windows.get(key)
        if not stamps:
            return 0.0
        while stamps and stamps[0] <= now - self._policy.window_ms:
            stamps.popleft()
        if len(stamps) < limit:
            return 0.0
        # The slot frees when the entry that puts us at the limit leaves the window.
        return stamps[len(stamps) - limit] + self._policy.window_ms - now

    def _prune(self, now: float) -> None:
        window = self._policy.window_ms
        while self._windows:
            stamps = next(iter(self._windows.values()))
            if stamps and stamps[-1] > now - window:
                break
            self._windows.popitem(last=False)
        while self._failures:
            state = next(iter(self._failures.values()))
            if state.last_ms + self._policy.reset_ms > now or state.locked_until_ms > now:
                break
            self._failures.popitem(last=False)

    def _cap(self, table: OrderedDict[str, deque[float]] | OrderedDict[str, _Failures]) -> None:
        while len(table) > self._max_keys:
            table.popitem(last=False)
