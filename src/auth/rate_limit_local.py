"""The limits as plain Python, for when Redis cannot be reached.

It mirrors the Lua scripts in ``src.auth.rate_limit`` step by step (same keys, same millisecond
arithmetic, same rounding) so a request is judged the same way with or without Redis; the only
difference is scope: this state lives in one process, so with N workers an attacker gets N times
the limits while Redis is down. That is the price of staying up, and it is logged.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from src.config.settings import Settings

# Each of the two tables below holds at most this many keys by default.
DEFAULT_MAX_TRACKED_KEYS = 10_000

# ``known`` argument of ``admit``: ask the caller whether the address is known to the account
# (answered with a wait of -1) before applying the account's delay.
ASK_KNOWN = 2


@dataclass(frozen=True)
class LoginPolicy:
    """The settings the login limits need, in milliseconds (the unit both implementations use)."""

    window_ms: int
    per_ip: int
    threshold: int
    increment_ms: int
    max_wait_ms: int
    reset_ms: int
    account_threshold: int
    account_increment_ms: int
    account_max_delay_ms: int

    @classmethod
    def from_settings(cls, settings: Settings) -> LoginPolicy:
        return cls(
            window_ms=settings.LOGIN_RATE_LIMIT_WINDOW_SECONDS * 1000,
            per_ip=settings.LOGIN_RATE_LIMIT_PER_IP,
            threshold=settings.LOCKOUT_FAILURE_THRESHOLD,
            increment_ms=settings.LOCKOUT_WAIT_INCREMENT_SECONDS * 1000,
            max_wait_ms=settings.LOCKOUT_MAX_WAIT_SECONDS * 1000,
            reset_ms=settings.LOCKOUT_FAILURE_RESET_SECONDS * 1000,
            account_threshold=settings.LOCKOUT_ACCOUNT_THRESHOLD,
            account_increment_ms=settings.LOCKOUT_ACCOUNT_DELAY_SECONDS * 1000,
            account_max_delay_ms=settings.LOCKOUT_ACCOUNT_MAX_DELAY_SECONDS * 1000,
        )


@dataclass
class _Failures:
    count: int
    last_ms: float
    locked_until_ms: float = 0.0


class InProcessLimiter:
    """Sliding windows and failure streaks in this process's memory, bounded.

    Memory bound: at most ``max_keys`` window keys, each holding at most its limit of timestamps
    (a refused attempt is not stored), plus at most ``max_keys`` failure records. Expired entries
    are pruned from the least recently used end on every call; when a table is still full, its
    least recently used key is evicted. Eviction can forget a lock-out under a flood of distinct
    keys: the trade for not being an out-of-memory vector.

    Methods return waits in milliseconds (0 = allowed) and take the same key strings as Redis.
    """

    def __init__(
        self,
        window_ms: int,
        clock: Callable[[], float] = time.time,
        max_keys: int = DEFAULT_MAX_TRACKED_KEYS,
        failures_kept_ms: int = 0,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._window_ms = window_ms
        self._clock = clock
        self._max_keys = max_keys
        self._last_now = 0.0
        # Ordered by last insertion, so the front is always the first to expire (one window).
        self._windows: OrderedDict[str, deque[float]] = OrderedDict()
        self._failures: OrderedDict[str, _Failures] = OrderedDict()
        # A failure streak is forgotten this long after its last failure (LOCKOUT_FAILURE_RESET).
        self._failures_kept_ms = failures_kept_ms

    @property
    def tracked_keys(self) -> int:
        return len(self._windows) + len(self._failures)

    def _now_ms(self) -> float:
        # Wall clocks can step back; the windows assume time never does.
        self._last_now = max(self._last_now, self._clock() * 1000)
        return self._last_now

    # --- sliding windows ------------------------------------------------------------------------
    def hit(self, limits: Sequence[tuple[str, int]]) -> float:
        """Count one request in every window, or none of them when any is full."""
        now = self._now_ms()
        self._prune(now)
        wait = max((self._window_wait(key, limit, now) for key, limit in limits), default=0.0)
        if wait > 0:
            return wait
        for key, _ in limits:
            self._count(key, now)
        return 0.0

    def _count(self, key: str, now: float) -> None:
        self._windows.setdefault(key, deque()).append(now)
        self._windows.move_to_end(key)
        self._cap(self._windows)

    def _window_wait(self, key: str, limit: int, now: float) -> float:
        stamps = self._windows.get(key)
        if not stamps:
            return 0.0
        while stamps and stamps[0] <= now - self._window_ms:
            stamps.popleft()
        if len(stamps) < limit:
            return 0.0
        # The slot frees when the entry that puts us at the limit leaves the window.
        return stamps[len(stamps) - limit] + self._window_ms - now

    # --- password attempts ----------------------------------------------------------------------
    def admit(
        self,
        policy: LoginPolicy,
        ip_key: str,
        pair_key: str,
        account_key: str,
        known: int,
    ) -> tuple[float, float]:
        """(wait ms, lock-out ms if this attempt fails); (-1, 0) asks whether the address is
        known. Mirrors ``_ADMIT_LUA``."""
        now = self._now_ms()
        self._prune(now)
        pair = self._streak(pair_key, now, policy.reset_ms)
        account = self._streak(account_key, now, policy.reset_ms)

        wait = max(0.0, pair.locked_until_ms - now, self._window_wait(ip_key, policy.per_ip, now))
        if wait == 0 and account.count >= policy.account_threshold and known != 1:
            if known == ASK_KNOWN:
                return -1.0, 0.0
            over = account.count - policy.account_threshold + 1
            delay = min(policy.account_increment_ms * over, policy.account_max_delay_ms)
            wait = max(0.0, account.last_ms + delay - now)
        if wait > 0:
            return wait, 0.0

        self._count(ip_key, now)
        pair.count += 1
        pair.last_ms = now
        lock = 0.0
        if pair.count >= policy.threshold:
            lock = float(
                min(policy.increment_ms * (pair.count - policy.threshold + 1), policy.max_wait_ms)
            )
            pair.locked_until_ms = max(pair.locked_until_ms, now + lock)
        account.count += 1
        account.last_ms = now
        self._keep(pair_key, pair)
        self._keep(account_key, account)
        return 0.0, lock

    def forget(self, *failure_keys: str) -> None:
        for key in failure_keys:
            self._failures.pop(key, None)

    def _streak(self, key: str, now: float, reset_ms: int) -> _Failures:
        state = self._failures.get(key) or _Failures(0, 0.0)
        if now - state.last_ms >= reset_ms:
            state.count = 0
        return state

    def _keep(self, key: str, state: _Failures) -> None:
        self._failures.pop(key, None)
        self._failures[key] = state
        self._cap(self._failures)

    # --- bounds ---------------------------------------------------------------------------------
    def _prune(self, now: float) -> None:
        while self._windows:
            stamps = next(iter(self._windows.values()))
            if stamps and stamps[-1] > now - self._window_ms:
                break
            self._windows.popitem(last=False)
        while self._failures:
            state = next(iter(self._failures.values()))
            if state.last_ms + self._failures_kept_ms > now or state.locked_until_ms > now:
                break
            self._failures.popitem(last=False)

    def _cap(self, table: OrderedDict[str, deque[float]] | OrderedDict[str, _Failures]) -> None:
        while len(table) > self._max_keys:
            table.popitem(last=False)
