"""Logging set-up: one line per record, UTC timestamps, nothing clever."""

from __future__ import annotations

import logging
import time

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def configure_logging(level: str) -> None:
    """Install a single stderr handler on the ``src`` logger tree (idempotent across app builds)."""
    logger = logging.getLogger("src")
    logger.setLevel(level)
    if not any(getattr(h, "_ums", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(_UTCFormatter(_FORMAT))
        handler._ums = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    # Third-party clients retry loudly while a dependency is down; the supervisor says it once.
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
