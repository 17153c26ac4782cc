"""``python -m src keys``: list, rotate and prune the token signing keys (docs/signing-keys.md).

The keys live in the database, sealed with ENCRYPTION_KEY, so these commands need the same
settings as the service. Exit codes: 0 done; 1 refused (the reason on stderr: the next key is too
young to sign, the key ring is unusable, the database unreachable or not migrated); 2 bad usage
or settings.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from src.auth.keys import (
    KeyInfo,
    KeyRingError,
    RotationRefused,
    iso,
    list_keys,
    promotion_delay,
    prune_expired,
    rotate,
)
from src.config.settings import Settings, load_settings
from src.db.session import (
    DATABASE_UNAVAILABLE,
    create_engine,
    create_sessionmaker,
    describe,
    migration_status,
)
from src.security.sealing import Sealer, load_sealer

OK, REFUSED = 0, 1

_ROTATE_HELP = """\
Promote the next key (published in the JWKS ahead of use) to sign, retire the active key (it
stays published until every token it signed has expired), publish a new next key, and delete
expired keys. Refused while the next key has been published for less than
JWKS_MAX_AGE_SECONDS + SIGNING_KEY_REFRESH_SECONDS (6 minutes by default): until then some
verifiers or instances may not know it. Every instance signs with the new key within
SIGNING_KEY_REFRESH_SECONDS.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "keys",
        help="list, rotate and prune the token signing keys",
        description="List, rotate and prune the keys that sign access and ID tokens.",
        epilog="Exit codes: 0 done, 1 refused (the reason on stderr), 2 bad usage or settings. "
        "See docs/signing-keys.md.",
    )
    actions = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    listing = actions.add_parser(
        "list", help="show every key: kid, algorithm, state and its dates (never the key)"
    )
    listing.set_defaults(run=list_command)

    rotation = actions.add_parser(
        "rotate", help="sign with the next key from now on", description=_ROTATE_HELP
    )
    rotation.add_argument(
        "--force",
        action="store_true",
        help="rotate even if the next key is too young (a compromised key): tokens it signs may "
        "be refused until verifiers fetch the JWKS again",
    )
    rotation.set_defaults(run=rotate_command)

    pruning = actions.add_parser("prune", help="delete retired keys whose tokens have all expired")
    pruning.set_defaults(run=prune_command)


class _NotMigrated(Exception):
    pass


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return REFUSED


@asynccontextmanager
async def _connected() -> AsyncIterator[tuple[AsyncSession, Settings, Sealer]]:
    """One session on the configured database, the settings and the sealer; closed after."""
    settings = load_settings()
    sealer = load_sealer(settings)
    engine = create_engine(settings)
    try:
        current, head = await migration_status(engine)
        if current != head:
            # Say so, rather than fail on a missing table.
            raise _NotMigrated(
                f"the database is not migrated (at {sorted(current) or 'nothing'}, head is "
                f"{sorted(head)}): run `alembic upgrade head`"
            )
        async with create_sessionmaker(engine)() as db:
            yield db, settings, sealer
    finally:
        await engine.dispose()


async def _run(work: Callable[[AsyncSession, Settings, Sealer], Awaitable[int]]) -> int:
    try:
        async with _connected() as (db, settings, sealer):
            return await work(db, settings, sealer)
    except (RotationRefused, KeyRingError) as exc:
        return _fail(f"refused: {exc}")
    except _NotMigrated as exc:
        return _fail(str(exc))
    except DATABASE_UNAVAILABLE as exc:
        return _fail(f"the database is unavailable: {describe(exc)}")


def _when(moment: datetime | None) -> str:
    return iso(moment) if moment is not None else "-"


def _row(key: KeyInfo) -> str:
    dates = (key.created_at, key.activated_at, key.retired_at, key.expires_at)
    return "\t".join([key.kid, key.algorithm, key.state, *(_when(d) for d in dates)])


async def list_command(args: argparse.Namespace) -> int:
    async def work(db: AsyncSession, settings: Settings, sealer: Sealer) -> int:
        keys = await list_keys(db)
        if not keys:
            print("No signing keys yet: the service creates them when it starts.", file=sys.stderr)
            return OK
        print("kid\talgorithm\tstate\tcreated\tactivated\tretired\texpires")
        for key in keys:
            print(_row(key))
        return OK

    return await _run(work)


async def rotate_command(args: argparse.Namespace) -> int:
    force: bool = args.force

    async def work(db: AsyncSession, settings: Settings, sealer: Sealer) -> int:
        rotation = await rotate(db, sealer, settings, force=force)
        retired = rotation.retired
        print(f"active\t{rotation.active.kid}\t{rotation.active.algorithm}")
        print(f"next\t{rotation.next.kid}\t{rotation.next.algorithm}")
        print(f"retired\t{retired.kid}\tpublished until {_when(retired.expires_at)}")
        ready = iso(rotation.next.created_at + promotion_delay(settings))
        print(
            f"Every instance signs with {rotation.active.kid} within "
            f"SIGNING_KEY_REFRESH_SECONDS ({settings.SIGNING_KEY_REFRESH_SECONDS:g} s); "
            f"the next rotation is possible from {ready}.",
            file=sys.stderr,
        )
        return OK

    return await _run(work)


async def prune_command(args: argparse.Namespace) -> int:
    async def work(db: AsyncSession, settings: Settings, sealer: Sealer) -> int:
        deleted = await prune_expired(db)
        for kid in deleted:
            print(f"deleted\t{kid}")
        print(f"{len(deleted)} expired key(s) deleted", file=sys.stderr)
        return OK

    return await _run(work)
