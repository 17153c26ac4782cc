"""Logging set-up: one line per record, UTC timestamps, and no floods.

A failing dependency or an overload makes the same warning happen for every request; written
each time, it buries everything else (and costs the CPU the service is short of). So a warning
or error repeated from the same place within ``LOG_REPEAT_INTERVAL_SECONDS`` is written once,
and the next one after the interval says how many were left out.

The audit trail (``src.auth.audit``: refused sign-ins, rate-limited password checks, refused
tokens) is never thinned: each line names a user and an address, and an attacker must not be
able to hide the next victim's line behind a first one of their own. Its lines are written with
``audit_line``: the message is a short stable phrase (``login failed``), the key ``audit`` holds
the same phrase as one token (``login_failed``) for a collector to filter on, and what the line is
about (``user``, ``ip``, ``reason``...) are fields of their own, so nobody has to parse prose.

Every line carries the request it was written for (``request_id``, set by
``src.api.middleware.RequestIdMiddleware`` and echoed to the client in ``X-Request-ID``), and the
signed-in user and client once authentication has succeeded: an operator given an id by a user
finds every line of that request, and a collector can group by user. The ids live in context
variables here, under everything, so any module can log without passing them around.

Two formats (``LOG_FORMAT``): ``json``, one object per line for a log collector, and ``text`` for
a person at a terminal. A traceback appears in JSON only at ERROR and above (as ``traceback``);
a lower-level line with an exception carries its type (``exc_type``) and nothing more. None of
this ever reaches a client: responses are built in ``src.api.errors``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Literal

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Distinct places are a few dozen; a message built with an f-string would make many, so the
# memory is dropped when it grows past this (at worst a repeat is written once more).
_MAX_TRACKED = 1000
# Loggers whose every line is kept, whatever the interval.
NEVER_THINNED = ("src.auth.audit",)

# Who and what the current request is about. A context variable, not a global: each request is
# its own asyncio task with its own copy, so concurrent requests never see each other's ids.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
user_id_var: ContextVar[str | None] = ContextVar("user_id", default=None)
client_id_var: ContextVar[str | None] = ContextVar("client_id", default=None)
_CONTEXT = (("request_id", request_id_var), ("user_id", user_id_var), ("client_id", client_id_var))
_CONTEXT_NAMES = frozenset(name for name, _ in _CONTEXT)

# What every LogRecord has; anything else on a record came from ``extra=`` and is written out.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "repeats_left_out",
}


# The key of an audit line that names its action (see ``audit_line``).
AUDIT_KEY = "audit"
# Names an audit field cannot take: a record's own attributes (logging refuses to overwrite them,
# and a formatter would not write them), the request's ids (they come from the context variables:
# a field of the same name would silently replace them) and the action's key.
_RESERVED_FIELDS = _STANDARD | _CONTEXT_NAMES | {AUDIT_KEY}


def audit_line(
    logger: logging.Logger, action: str, *, level: int = logging.INFO, **fields: object
) -> None:
    """Write one audit line: ``action`` as the message and in ``audit`` (spaces as underscores,
    so a text line stays ``key=value`` pairs), each field as a key of its own.

    Structured rather than prose so a collector filters on ``audit``, ``user``, ``ip`` or
    ``reason`` without a pattern per message, and a field added later breaks no parser. A field
    given as None is left out (the conditional parts of a line); other values are written as
    they are when a number, a string or a boolean, and as text otherwise (ids). Never pass a
    secret: the fields are written whatever the format. A reserved name (``name``, ``args``,
    ``user_id``...) raises ValueError: it is a mistake in the calling code, which every test
    through that line finds.
    """
    clash = _RESERVED_FIELDS.intersection(fields)
    if clash:
        raise ValueError(f"audit field names reserved by logging: {sorted(clash)}")
    extra: dict[str, object] = {AUDIT_KEY: action.replace(" ", "_")}
    extra.update({key: _plain(value) for key, value in fields.items() if value is not None})
    # stacklevel: the record's module, function and line are the caller's, not this helper's.
    logger.log(level, action, extra=extra, stacklevel=2)


def _plain(value: object) -> object:
    return value if isinstance(value, str | int | float | bool) else str(value)


def _utc(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


def _context(record: logging.LogRecord) -> dict[str, Any]:
    """The request's ids (an ``extra=`` of the same name wins), leaving out those not known."""
    found: dict[str, Any] = {}
    for name, var in _CONTEXT:
        value = getattr(record, name, None) or var.get()
        if value is not None:
            found[name] = value
    return found


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD and not key.startswith("_") and key not in _CONTEXT_NAMES
    }


class _UTCFormatter(logging.Formatter):
    """The text format: the classic line, then ``key=value`` for the request id and extras."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tail = "".join(f" {k}={v}" for k, v in (_context(record) | _extras(record)).items())
        if tail:
            # After the message, before a traceback (which starts on the next line).
            first, newline, rest = line.partition("\n")
            line = first + tail + newline + rest
        left_out = getattr(record, "repeats_left_out", 0)
        if left_out:
            line += f" [{left_out} more like this left out]"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what a log collector parses without any pattern to maintain."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context(record))
        entry.update(_extras(record))
        left_out = getattr(record, "repeats_left_out", 0)
        if left_out:
            entry["repeats_left_out"] = left_out
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            if record.levelno >= logging.ERROR:
                entry["traceback"] = self.formatException(record.exc_info)
        # default=str: an extra of any type (a UUID, a datetime) is written rather than lost.
        return json.dumps(entry, default=str, ensure_ascii=False)


def resolve_format(log_format: str, production: bool) -> Literal["json", "text"]:
    """``auto`` is json in production (a collector reads the lines), text elsewhere."""
    if log_format == "auto":
        return "json" if production else "text"
    if log_format not in ("json", "text"):
        raise ValueError(f"unknown log format {log_format!r}")
    return "json" if log_format == "json" else "text"


def make_formatter(log_format: str, production: bool = False) -> logging.Formatter:
    if resolve_format(log_format, production) == "json":
        return JsonFormatter()
    return _UTCFormatter(_FORMAT)


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


def configure_logging(
    level: str,
    repeat_interval: float = 10.0,
    log_format: str = "text",
    *,
    production: bool = False,
) -> None:
    """Install a single stderr handler on the ``src`` logger tree (idempotent across app builds:
    a second call changes the level, interval and format of the handler the first installed)."""
    logger = logging.getLogger("src")
    logger.setLevel(level)
    handler = next((h for h in logger.handlers if getattr(h, "_ums", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler._ums = True  # type: ignore[attr-defined]
        handler.addFilter(RepeatFilter(repeat_interval))
        logger.addHandler(handler)
    handler.setFormatter(make_formatter(log_format, production))
    for existing in handler.filters:
        if isinstance(existing, RepeatFilter):
            existing.interval = repeat_interval
    # Third-party clients retry loudly while a dependency is down; the supervisor says it once.
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
