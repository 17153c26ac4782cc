"""``user-service relay``: the outbox relay as a process of its own.

Exactly what ``python -m src.events.relay`` runs (``src.events.relay``): for deployments that set
OUTBOX_RELAY_IN_PROCESS=false on the API and scale the relay apart. It publishes committed
outbox rows to Kafka, in order per user, at least once, until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse

from src.cli.support import OK
from src.events import relay


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "relay",
        help="publish the outbox to Kafka, as a process of its own",
        description="Run the outbox relay on its own (what `python -m src.events.relay` runs): "
        "it publishes the events committed to the outbox table of DATABASE_URL to "
        "KAFKA_USER_EVENTS_TOPIC and KAFKA_NOTIFICATIONS_TOPIC, in order per user, at least once, "
        "and prunes published rows after OUTBOX_RETENTION_HOURS. While Kafka is away it waits "
        "and reconnects; nothing is lost. Several relays may run at once on PostgreSQL. Set "
        "OUTBOX_RELAY_IN_PROCESS=false on the API instances when running it. SIGTERM or Ctrl-C "
        "stops it; an interrupted batch is sent again later.",
        epilog="Exit codes: 0 stopped by SIGTERM, 130 stopped by Ctrl-C, 2 bad usage or "
        "settings. See docs/cli.md.",
    )
    parser.set_defaults(run=relay_command)


async def relay_command(args: argparse.Namespace) -> int:
    # The module's own process entry point, so the two ways of running it cannot drift apart.
    await relay._main()
    return OK
