"""A pytest plugin: the whole test session's log output is scanned for secrets.

Why: a password, a token or a hash in a log line is a leak to whoever reads the logs (often many
more people than may read the database), and such a line is easy to add and hard to spot in a
review. The suite exercises every route with known secrets (the passwords and tokens of
``tests.support``), so a handler on the root logger for the whole session sees every line the
service writes while serving them; any line holding one of them, or anything shaped like a
token, fails the run at the end, naming the logger, the test and a redacted excerpt.

It listens at DEBUG without changing any logger's level: it sees what the service would write
with the levels the tests configure (and the DEBUG lines of tests that turn DEBUG on). Only the
service's own loggers (``src``) are scanned: the harness's clients log what they send.

Registered from ``tests/conftest.py`` (``pytest_plugins``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import pytest

from src.config.logging import make_formatter
from tests.support.app import OPERATOR_TOKEN, PASSWORD
from tests.support.oidc import ADMIN_PASSWORD

# Exact values the suite uses as secrets (the operator token is HEALTH_DETAILS_TOKEN in every
# app the suite builds), then what any secret of the kind looks like.
KNOWN_SECRETS = {
    "test password": PASSWORD,
    "test admin password": ADMIN_PASSWORD,
    "health details token": OPERATOR_TOKEN,
}
SHAPES = {
    "bearer JWT": r"Bearer ey",
    "JWT": r"eyJ[A-Za-z0-9_-]{10,}\.eyJ",
    "Authorization header": r"(?i)authorization:",
    "password hash column": r"password_hash",
    "argon2 hash": r"\$argon2id\$",
}
PATTERNS: dict[str, re.Pattern[str]] = {
    **{name: re.compile(re.escape(value)) for name, value in KNOWN_SECRETS.items()},
    **{name: re.compile(shape) for name, shape in SHAPES.items()},
}
_EXCERPT = 240  # characters of a line shown in a finding
_MAX_FINDINGS = 50  # the first ones say enough; a loop must not fill the memory


def find_secrets(line: str) -> list[str]:
    """The names of the patterns ``line`` matches (empty when it is clean)."""
    return [name for name, pattern in PATTERNS.items() if pattern.search(line)]


def redact(line: str) -> str:
    """``line`` with every match replaced and cut to an excerpt: the report must not leak too."""
    for name, pattern in PATTERNS.items():
        line = pattern.sub(f"[{name.upper()} REDACTED]", line)
    first = line.splitlines()[0] if line else ""
    # The first line (the message), plus a mention that a traceback followed.
    excerpt = first[:_EXCERPT] + ("..." if len(first) > _EXCERPT else "")
    return excerpt + (" (+ traceback)" if "\n" in line else "")


@dataclass(frozen=True)
class Finding:
    logger: str
    level: str
    patterns: tuple[str, ...]
    excerpt: str
    test: str | None

    def describe(self) -> str:
        where = f" during {self.test}" if self.test else ""
        found = ", ".join(self.patterns)
        return f"{self.level} on logger {self.logger!r}{where}: {found}\n    {self.excerpt}"


class SecretScanHandler(logging.Handler):
    """Formats every record of the ``src`` loggers as the service would and looks for secrets."""

    def __init__(self, prefix: str = "src") -> None:
        super().__init__(logging.DEBUG)
        # The text format: message, context, extras and traceback, all that a line can carry.
        self.setFormatter(make_formatter("text"))
        self.prefix = prefix
        self.scanned = 0
        self.findings: list[Finding] = []
        self.current_test: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != self.prefix and not record.name.startswith(self.prefix + "."):
            return
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - what every logging handler does: log, don't crash
            self.handleError(record)
            return
        self.scanned += 1
        found = find_secrets(line)
        if found and len(self.findings) < _MAX_FINDINGS:
            self.findings.append(
                Finding(
                    record.name, record.levelname, tuple(found), redact(line), self.current_test
                )
            )

    def report(self) -> str | None:
        """What to tell at the end of the session, or None when no line held a secret."""
        if not self.findings:
            return None
        lines = [f"{len(self.findings)} log line(s) hold a secret (of {self.scanned} scanned):"]
        lines.extend(finding.describe() for finding in self.findings)
        return "\n".join(lines)


_SCAN = pytest.StashKey[SecretScanHandler]()


def pytest_configure(config: pytest.Config) -> None:
    handler = SecretScanHandler()
    config.stash[_SCAN] = handler
    logging.getLogger().addHandler(handler)


def pytest_unconfigure(config: pytest.Config) -> None:
    handler = config.stash.get(_SCAN, None)
    if handler is not None:
        logging.getLogger().removeHandler(handler)


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    # Hooks have no config here; the handler on the root logger is found by type.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, SecretScanHandler):
            handler.current_test = nodeid


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    handler = session.config.stash.get(_SCAN, None)
    if handler is not None and handler.report() is not None:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    handler = config.stash.get(_SCAN, None)
    report = handler.report() if handler is not None else None
    if report is not None:
        terminalreporter.section("secrets in log lines", sep="=", red=True, bold=True)
        terminalreporter.line(report, red=True)
