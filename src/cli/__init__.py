"""``user-service`` (or ``python -m src``): the operator's commands (docs/cli.md).

- ``serve``: the API under uvicorn, as the container runs it;
- ``migrate``: the database schema to head (``--check`` only reports);
- ``check``: the database, Redis and Kafka reachable with the service's settings;
- ``create-admin``: an administrator, or an existing user promoted;
- ``relay``: the outbox relay as a process of its own;
- ``users export|erase``: a person's rights of access and erasure (GDPR);
- ``keys``: the token signing keys; ``clients``: the OAuth clients.

Each command module registers its subcommands on the parser; commands read the same settings as
the service (environment and ``.env``) and talk to the same database, so they make exactly the
changes (and record exactly the events) the API would. Exit codes, the same for every command:
0 done; 1 refused or failed, the reason in one line on stderr, never a stack trace; 2 bad usage
or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from src.config.settings import SettingsError

# A command returns its exit code; most are coroutines, run here in one event loop (``serve``
# is not: uvicorn runs its own).
Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int] | int]

PROG = "user-service"
INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    from src.cli import admin, check, clients, keys, migrate, relay, serve, users

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Operate the User Management Service (also `python -m src`).",
        epilog="Exit codes: 0 done, 1 refused or failed (the reason on stderr), 2 bad usage or "
        "settings. `user-service COMMAND --help` explains each command; docs/cli.md has "
        "examples.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.register(commands)
    migrate.register(commands)
    check.register(commands)
    admin.register(commands)
    relay.register(commands)
    users.register(commands)
    keys.register(commands)
    clients.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Command = args.run
    try:
        outcome = run(args)
        return asyncio.run(outcome) if asyncio.iscoroutine(outcome) else int(outcome)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a stack trace
        # Each command turns the failures it expects into a sentence; this is for the rest.
        # Database errors never carry their parameters (hide_parameters), so the text is safe.
        reason = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"{PROG}: failed: {type(exc).__name__}{': ' + reason if reason else ''}",
            file=sys.stderr,
        )
        return 1
