"""Check that this service can reach Redis and Kafka with its own settings.

    python test_connections.py [--timeout SECONDS] [--verbose]

Settings come from the environment and ``.env``, exactly as the service reads them, and the
connections are built by the service's own code, so a pass here means the service would connect
too. Redis gets a PING and a SET/GET/TTL/DEL of a temporary key; Kafka gets a metadata request
and one message sent to a scratch topic. One line per service, then exit 0 only when every enabled
service passed. Every network wait is bounded: a host that never answers costs seconds, not the
40 s of aiokafka's defaults. ``user-service check`` runs the same checks, and the database's too.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from src.cli.check import (
    DEFAULT_TIMEOUT,
    KAFKA_CHECK_TOPIC,
    REDIS_KEY_PREFIX,
    REDIS_KEY_TTL_SECONDS,
    Result,
    Status,
    StepFailed,
    check_kafka,
    check_redis,
    report,
    run_checks,
)
from src.config.settings import load_settings

# The checks live in the package (``user-service check`` runs them too, with the database);
# these names stay importable from here for anyone who used them.
__all__ = [
    "DEFAULT_TIMEOUT",
    "KAFKA_CHECK_TOPIC",
    "REDIS_KEY_PREFIX",
    "REDIS_KEY_TTL_SECONDS",
    "Result",
    "Status",
    "StepFailed",
    "check_kafka",
    "check_redis",
    "main",
    "run_checks",
]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds each network step may take (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--verbose", action="store_true", help="show the client libraries' logs")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # The clients retry loudly while a host is down; the summary line already says so.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL)
    settings = load_settings()  # raises SettingsError (exit 1, one line per bad variable)
    started = time.perf_counter()
    return report(asyncio.run(run_checks(settings, args.timeout)), started)


if __name__ == "__main__":
    sys.exit(main())
