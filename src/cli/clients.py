"""``python -m src clients``: register, list and delete OAuth clients from the operator's shell.

The same rules and the same events as the admin API (``src.oauth.clients``); the actor is nobody
(``actor_id`` null), since the shell has no signed-in user. Exit codes: 0 done; 1 refused (the
reason on stderr: a client_id taken or unknown, the database unreachable); 2 bad usage
(argparse's own code, kept for any value the registration rules refuse).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from src.cli.support import OK, USAGE, Connected, fail, guarded, where
from src.db.session import create_sessionmaker
from src.oauth import clients as client_service
from src.oauth.schemas import ClientCreate


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "clients",
        help="register, list and delete OAuth clients",
        description="Register, list and delete the applications that sign users in here.",
    )
    actions = parser.add_subparsers(dest="clients_command", required=True, metavar="ACTION")

    create = actions.add_parser(
        "create", help="register a client (prints its client_id, and its secret once)"
    )
    create.add_argument("--name", required=True, help="shown to users on the consent page")
    kind = create.add_mutually_exclusive_group()
    kind.add_argument(
        "--confidential",
        dest="client_type",
        action="store_const",
        const="confidential",
        help="a server-side application that keeps a secret (the default)",
    )
    kind.add_argument(
        "--public",
        dest="client_type",
        action="store_const",
        const="public",
        help="a browser or native application: no secret",
    )
    create.set_defaults(client_type="confidential")
    create.add_argument("--client-id", help="chosen by the service when left out")
    create.add_argument(
        "--redirect-uri", dest="redirect_uris", action="append", default=[], metavar="URI"
    )
    create.add_argument(
        "--post-logout-redirect-uri",
        dest="post_logout_redirect_uris",
        action="append",
        default=[],
        metavar="URI",
    )
    create.add_argument(
        "--grant-type",
        dest="grant_types",
        action="append",
        choices=client_service.GRANT_TYPES,
        help="repeat for several; default: authorization_code and refresh_token",
    )
    create.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        choices=tuple(client_service.SCOPES),
        help="repeat for several; default: openid, profile and email",
    )
    create.add_argument(
        "--first-party", action="store_true", help="the company's own application: no consent page"
    )
    create.set_defaults(run=create_client)

    listing = actions.add_parser("list", help="list every client, oldest first")
    listing.set_defaults(run=list_clients)

    remove = actions.add_parser(
        "delete", help="delete a client: its consents go and its sessions end at once"
    )
    remove.add_argument("client_id", metavar="CLIENT_ID")
    remove.set_defaults(run=delete_client)


async def _run(work: Callable[[AsyncSession, Connected], Awaitable[int]]) -> int:
    """Run ``work`` in one session on the service's own connections (``support.guarded``: a value
    the rules refuse is exit code 2, like any other bad usage; a refusal by the database's state —
    taken, not found —, an unreachable or unmigrated database 1)."""

    async def in_session(connection: Connected) -> int:
        async with create_sessionmaker(connection.engine)() as db:
            return await work(db, connection)

    return await guarded(in_session)


async def create_client(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {
        "name": args.name,
        "client_type": args.client_type,
        "redirect_uris": args.redirect_uris,
        "post_logout_redirect_uris": args.post_logout_redirect_uris,
        "first_party": args.first_party,
    }
    for name in ("client_id", "grant_types", "scopes"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    try:
        body = ClientCreate.model_validate(fields)
    except ValidationError as exc:
        lines = [f"  {where(error['loc'])}: {error['msg']}" for error in exc.errors()]
        return fail("invalid client:\n" + "\n".join(lines), USAGE)

    async def work(db: AsyncSession, deps: Connected) -> int:
        client, secret = await client_service.create_client(db, deps, body, actor_id=None)
        print(f"client_id: {client.client_id}")
        if secret is not None:
            print(f"client_secret: {secret}")
            print("Store the secret now: it is not shown again.", file=sys.stderr)
        return OK

    return await _run(work)


async def list_clients(args: argparse.Namespace) -> int:
    async def work(db: AsyncSession, deps: Connected) -> int:
        cursor: str | None = None
        while True:
            page, cursor = await client_service.list_clients(db, limit=200, cursor=cursor)
            for client in page:
                grants = ",".join(client.grant_types)
                print(f"{client.client_id}\t{client.client_type}\t{grants}\t{client.name}")
            if cursor is None:
                return OK

    return await _run(work)


async def delete_client(args: argparse.Namespace) -> int:
    client_id: str = args.client_id

    async def work(db: AsyncSession, deps: Connected) -> int:
        revoked = await client_service.delete_client(db, deps, client_id, actor_id=None)
        print(f"deleted {client_id}; {revoked} session(s) revoked")
        return OK

    return await _run(work)
