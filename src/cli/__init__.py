"""``python -m src``: the operator's commands (signing keys, OAuth clients).

Each command module registers its subcommands on the parser; commands read the same settings as
the service (environment and ``.env``) and talk to the same database.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from src.config.settings import SettingsError

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def build_parser() -> argparse.ArgumentParser:
    from src.cli import clients, keys

    parser = argparse.ArgumentParser(
        prog="python -m src", description="Operate the User Management Service."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keys.register(commands)
    clients.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Command = args.run
    try:
        return asyncio.run(run(args))
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
