"""``user-service users export|erase EMAIL``: a person's rights of access and erasure (GDPR).

Thin: the work is ``src.users.privacy`` (what is exported, what an erasure removes and keeps).
The export is JSON on standard output, for the operator to hand over; the erasure asks for the
address to be typed again unless ``--yes`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata

from src.cli.support import OK, USAGE, Connected, fail, guarded
from src.db.session import create_sessionmaker
from src.users import privacy
from src.users.emails import canonical_email

_ERASE_HELP = """\
Erase the account of EMAIL and the personal data kept about it: the account is deleted the way
the API deletes one (its sessions end at once, its second factors, consents and pending links go,
user.deleted is recorded), then in the rows that outlive it (the outbox, the audit trail, the
mail deliveries) addresses, names, IP addresses, user agents and factor names are replaced,
keeping each row, its type and its time. Finally user.erased is recorded: the other services
must erase what they hold about its subject. One transaction: all of it happens, or nothing.
Not removed: Kafka messages already published (consumers act on user.erased), backups, and
log files. See docs/cli.md.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "users",
        help="export or erase everything stored about a user (GDPR)",
        description="A person's rights of access (export) and erasure (erase).",
        epilog="Exit codes: 0 done, 1 no such user, not confirmed or refused (the reason on "
        "stderr), 2 bad usage or settings. See docs/cli.md.",
    )
    actions = parser.add_subparsers(dest="users_command", required=True, metavar="ACTION")

    export = actions.add_parser(
        "export",
        help="print everything stored about a user as JSON",
        description="Print everything stored about the account of EMAIL as one JSON document: "
        "the profile, sessions, second factors and passkeys (names and dates), recovery codes "
        "(dates), consents, pending links, audit trail events, outbox events and mail "
        "deliveries. Never a password hash, a token hash, a TOTP secret, a passkey's key or a "
        "sealed link.",
        epilog="Exit codes: 0 printed, 1 no such user or the database unavailable, 2 bad usage "
        "or settings. See docs/cli.md.",
    )
    export.add_argument("email", metavar="EMAIL")
    export.set_defaults(run=export_command)

    erase = actions.add_parser(
        "erase",
        help="delete a user and scrub their personal data from the kept records",
        description=_ERASE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 erased, 1 no such user (also when erased already), not confirmed, "
        "refused (the last active admin) or the database unavailable, 2 bad usage or settings.",
    )
    erase.add_argument("email", metavar="EMAIL")
    erase.add_argument(
        "--yes", action="store_true", help="do not ask for the address to be typed again"
    )
    erase.set_defaults(run=erase_command)


def _address(text: str) -> str | None:
    return canonical_email(text)


def _escape(char: str) -> str:
    """``char`` as a JSON escape (a surrogate pair above U+FFFF)."""
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def terminal_safe_json(document: object) -> str:
    """``document`` as readable JSON (letters of any script kept) in which no control or
    formatting character is left raw: names and user agents are chosen by callers, and a C1
    control (a one-byte CSI or OSC) or a bidirectional override printed to the operator's
    terminal could rewrite the screen or what it appears to say. Escaped, they mean the same to
    any JSON reader."""
    text = json.dumps(document, indent=2, ensure_ascii=False)
    # json.dumps escapes C0 controls inside strings already: a raw newline is indentation.
    return "".join(
        _escape(char) if char != "\n" and unicodedata.category(char) in ("Cc", "Cf") else char
        for char in text
    )


async def export_command(args: argparse.Namespace) -> int:
    if _address(args.email) is None:
        return fail(f"invalid: {args.email!r} is not an email address", USAGE)

    async def work(connection: Connected) -> int:
        async with create_sessionmaker(connection.engine)() as db:
            try:
                document = await privacy.export_user(db, args.email)
            except privacy.NoSuchUser:
                return fail(f"no such user: {args.email}")
        print(terminal_safe_json(document))
        return OK

    return await guarded(work)


def _confirmed(email: str) -> bool:
    print(
        f"This erases {email} for good. Type the address again to confirm: ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    answer = sys.stdin.readline().strip()
    if not sys.stdin.isatty():
        print(file=sys.stderr)  # nothing was echoed: end the prompt's line
    return _address(answer) == email if answer else False


async def erase_command(args: argparse.Namespace) -> int:
    email = _address(args.email)
    if email is None:
        return fail(f"invalid: {args.email!r} is not an email address", USAGE)

    async def work(connection: Connected) -> int:
        async with create_sessionmaker(connection.engine)() as db:
            try:
                await privacy.find_user(db, email)
            except privacy.NoSuchUser:
                return fail(f"no such user: {email}")
        if not args.yes and not _confirmed(email):
            return fail("not confirmed: nothing was erased")
        try:
            erasure = await privacy.erase_user(connection.engine, connection, email)
        except privacy.NoSuchUser:
            return fail(f"no such user: {email}")
        print(
            f"erased user {erasure.user_id}: account deleted; personal data replaced in "
            f"{erasure.outbox_rows} outbox, {erasure.audit_rows} audit and "
            f"{erasure.mail_deliveries} mail delivery row(s); user.erased recorded"
        )
        return OK

    return await guarded(work)
