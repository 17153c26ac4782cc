"""``user-service migrate``: bring the database schema to the head of ``src/db/migrations``.

Alembic's own ``upgrade head`` (the scripts ship inside the package, so no alembic.ini is needed),
against DATABASE_URL. ``--check`` only reports: a deployment can refuse to roll out, or a
readiness gate wait, until the schema is at head.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from src.cli.support import OK, REFUSED, fail
from src.config.settings import load_settings
from src.db.session import create_engine, describe, migration_status, upgrade_database


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "migrate",
        help="apply the database migrations (alembic upgrade head)",
        description="Apply every database migration not applied yet (alembic upgrade head) to "
        "DATABASE_URL; a database already at head is left alone. Run it before starting a new "
        "version: the service refuses to start on a database that is not at head.",
        epilog="Exit codes: 0 at head (migrated, or already there), 1 not at head with --check, "
        "or the database unreachable or the migration failed (the reason on stderr), 2 bad "
        "usage or settings. See docs/cli.md.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing: report whether the database is at head (exit 1 when it is not)",
    )
    parser.set_defaults(run=migrate_command)


def failure(exc: BaseException) -> str:
    """One line about a failed migration or connection: the error's first line, no stack."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{describe(exc)}: {first_line}" if first_line else describe(exc)


def _revisions(revisions: set[str]) -> str:
    return ", ".join(sorted(revisions)) or "nothing"


async def migrate_command(args: argparse.Namespace) -> int:
    settings = load_settings()
    engine = create_engine(settings)
    try:
        try:
            current, head = await migration_status(engine)
        except Exception as exc:  # noqa: BLE001 - reported in one line, no stack trace
            return fail(f"the database is unavailable: {failure(exc)}")
        if args.check:
            if current == head:
                print(f"at head ({_revisions(head)})")
                return OK
            return fail(f"not at head: at {_revisions(current)}, head is {_revisions(head)}")
        if current == head:
            print(f"already at head ({_revisions(head)}); nothing to do")
            return OK
        try:
            # Alembic runs its own event loop (src/db/migrations/env.py): not in this one.
            await asyncio.to_thread(upgrade_database, settings.DATABASE_URL)
            after, _ = await migration_status(engine)
        except Exception as exc:  # noqa: BLE001 - reported in one line, no stack trace
            return fail(f"migration failed: {failure(exc)}")
        print(f"migrated from {_revisions(current)} to {_revisions(after)}")
        if after != head:
            print(f"warning: head is {_revisions(head)}", file=sys.stderr)
            return REFUSED
        return OK
    finally:
        await engine.dispose()
