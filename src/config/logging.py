"""Logging set-up: one line per record, UTC timestamps, and no floods.

A failing dependency or an overload makes the same warning happen for every request; written
each time, it buries everything else (and costs the CPU the service is short of). So a warning
or error repeated from the same place within ``LOG_REPEAT_INTERVAL_SECONDS`` is written once,
and the next one after the interval says how many were left out.

The audit trail (``src.auth.audit``: refused sign-ins, rate-limited password checks, refused
tokens) is never thinned: each line names a user and an address, and an attacker must not be
able to hide the next victim's line behind a first one of their own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Distinct places are a few dozen; a message built with an f-string would make many, so the
# memory is dropped when it grows past this (at worst a repeat is written once more).
_MAX_TRACKED = 1000
# Loggers whose every line is kept, whatever the interval.
NEVER_THINNED = ("src.auth.audit",)


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        left_out = getattr(record, "repeats_left_out", 0)
        if left_out:
            line += f" [{left_out} more like this left out]"
        return line


class RepeatFilter(logging.Filter):
    """Lets a warning or error through once per ``interval`` seconds per logger, level and
    message template (the text before its arguments are filled in)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        # (logger, level, template) -> [when the last line was written, lines left out since]
        self._seen: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            self.interval <= 0
            or record.levelno < logging.WARNING
            or record.name.startswith(NEVER_THINNED)
        ):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return False
        if seen is None and len(self._seen) >= _MAX_TRACKED:
            self._seen.clear()
        # An attribute our formatter prints; the record itself (shared with other handlers, and
        # with pytest's log capture) is left as it was.
        record.repeats_left_out = int(seen[1]) if seen is not None else 0
        self._seen[key] = [now, 0]
        return True


def configure_logging(level: str, repeat_interval: float = 10.0) -> None:
    """Install a single stderr handler on the ``src`` logger tree (idempotent across app builds)."""
    logger = logging.getLogger("src")
    logger.setLevel(level)
    handler = next((h for h in logger.handlers if getattr(h, "_ums", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.setFormatter(_UTCFormatter(_FORMAT))
        handler._ums = True  # type: ignore[attr-defined]
        handler.addFilter(RepeatFilter(repeat_interval))
        logger.addHandler(handler)
    for existing in handler.filters:
        if isinstance(existing, RepeatFilter):
            existing.interval = repeat_interval
    # Third-party clients retry loudly while a dependency is down; the supervisor says it once.
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
