"""``user-service create-admin EMAIL``: an administrator from the operator's shell.

A new account is made by ``create_account``, the path registration takes: the same address
checks, the same password policy, the same ``user.registered`` event (``actor_id`` null: the
shell has no signed-in user). An existing account is promoted by ``update_user``, the path the
admin API takes (``user.role_changed``), and keeps its password. The password never comes from
the command line, where shell history and ``ps`` would keep it: it is asked for twice on the
terminal, or read from the first line of standard input with ``--password-stdin``.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from src.auth.context import Security
from src.auth.jwt import AccessTokenCodec, generate_signing_key
from src.auth.passwords import PasswordHasher
from src.auth.rate_limit import LoginGuard, RequestThrottle
from src.auth.service import create_account
from src.cli.support import OK, REFUSED, USAGE, Connected, fail, guarded, where
from src.db.models import User
from src.db.session import create_sessionmaker
from src.users import repository
from src.users.emails import canonical_email
from src.users.schemas import UserCreate, UserUpdate
from src.users.service import update_user


class PasswordUnavailable(Exception):
    """No password could be read: no terminal to ask on, the two entries differ, or none."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "create-admin",
        help="create an administrator, or promote an existing user",
        description="Create an administrator account for EMAIL (verified, active), or promote "
        "the existing account of EMAIL to administrator (its password is kept, nothing is "
        "asked). The password of a new account is asked for twice on the terminal, or read "
        "from the first line of standard input with --password-stdin; never give it as an "
        "argument. The registration rules apply: the password policy (at least 12 characters, "
        "not a common password, not the address) and, with EMAIL_REFUSE_CONFUSABLE, no "
        "look-alike address. Records user.registered or user.role_changed (actor_id null).",
        epilog="Exit codes: 0 created, promoted or already an admin; 1 refused or failed (the "
        "passwords differ, the database is unreachable or not migrated); 2 bad usage or "
        "settings, or an address or password the rules refuse. See docs/cli.md.",
    )
    parser.add_argument("email", metavar="EMAIL", help="the administrator's email address")
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input (for scripts: "
        "printf '%%s\\n' \"$PASSWORD\" | user-service create-admin EMAIL --password-stdin)",
    )
    parser.add_argument("--full-name", help="the new account's name (optional)")
    parser.set_defaults(run=create_admin_command)


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            raise PasswordUnavailable("no password on standard input")
        return password
    if not sys.stdin.isatty():
        raise PasswordUnavailable("no terminal to ask for the password on: use --password-stdin")
    first = getpass.getpass("Password for the new administrator: ")
    if getpass.getpass("The same password again: ") != first:
        raise PasswordUnavailable("the two passwords differ; nothing was created")
    return first


def _security(connection: Connected) -> Security:
    """What ``create_account`` takes; only its settings, hasher, cache and sealer are used."""
    settings = connection.settings
    redis = connection.redis
    return Security(
        settings=settings,
        hasher=PasswordHasher(settings),
        # Never used to sign here: a throwaway key, so the signing key ring and the development
        # key file are left alone.
        tokens=AccessTokenCodec(generate_signing_key("EdDSA"), settings),
        guard=LoginGuard(settings, lambda: redis),
        throttle=RequestThrottle(settings, lambda: redis),
        cache=connection.cache,
        sealer=connection.sealer,
    )


async def create_admin_command(args: argparse.Namespace) -> int:
    email = canonical_email(args.email)
    if email is None:
        return fail(f"invalid: {args.email!r} is not an email address", USAGE)

    async def work(connection: Connected) -> int:
        async with create_sessionmaker(connection.engine)() as db:
            existing = await repository.get_user_by_email(db, email)
            if existing is not None:
                if args.password_stdin:
                    print(
                        "note: the account exists; the password given was not used", file=sys.stderr
                    )
                return await _promote(db, connection, existing)
            # No transaction stays open while a person types.
            await db.rollback()
            return await _create(db, connection, email, args)

    return await guarded(work)


async def _promote(db: AsyncSession, connection: Connected, user: User) -> int:
    if user.role == "admin":
        print(f"{user.email} ({user.id}) is already an administrator; nothing changed")
        return OK
    await update_user(db, connection, user.id, UserUpdate(role="admin"), actor_id=None)
    print(
        f"promoted the existing user {user.email} ({user.id}) to administrator; "
        "their password is unchanged"
    )
    if not user.is_active:
        print(
            "note: the account is deactivated; it cannot sign in until an administrator "
            "activates it",
            file=sys.stderr,
        )
    return OK


async def _create(
    db: AsyncSession, connection: Connected, email: str, args: argparse.Namespace
) -> int:
    try:
        password = read_password(args.password_stdin)
    except PasswordUnavailable as exc:
        return fail(str(exc), REFUSED)
    try:
        body = UserCreate(
            email=email,
            password=password,
            full_name=args.full_name,
            role="admin",
            email_verified=True,
        )
    except ValidationError as exc:
        # The messages only: pydantic's own text would repeat the input (the password).
        lines = [f"  {where(e['loc'])}: {e['msg']}" for e in exc.errors()]
        return fail("invalid:\n" + "\n".join(lines), USAGE)
    sec = _security(connection)
    try:
        user = await create_account(db, sec, body)
    finally:
        sec.close()
    print(f"created the administrator {email} ({user.id})")
    return OK
