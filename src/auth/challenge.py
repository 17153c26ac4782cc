"""The step between a right password and a session, for accounts with a second factor.

A right password earns a *ticket*: sealed (src.security.sealing) so nobody can make or alter one,
short-lived, and bound to where the sign-in happens (an OAuth client, or the hosted pages). The
second factor is then checked against the ticket's user. Nothing is stored: a ticket replayed
within its lifetime still needs a valid code, and each code works once.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from src.auth.context import Security
from src.db.types import utcnow
from src.security.sealing import UnsealError
from src.services import metrics

TICKET_SECONDS = 300
MAX_TICKET_LENGTH = 1024
_PURPOSE = b"second-factor-ticket"
BROWSER = "hosted-pages"


@dataclass(frozen=True)
class Ticket:
    user_id: uuid.UUID
    # The OAuth client the sign-in is for, or BROWSER for the hosted pages.
    audience: str
    scope: str | None
    expires: int


def issue_ticket(
    sec: Security,
    user_id: uuid.UUID,
    audience: str,
    scope: str | None = None,
    now: datetime | None = None,
) -> str:
    # Issued exactly when a right password must be followed by a second factor, wherever the
    # sign-in happens (the password grant or the hosted page): that attempt's outcome.
    metrics.login("mfa_required")
    expires = int((now or utcnow()).timestamp()) + TICKET_SECONDS
    body = {"u": str(user_id), "a": audience, "s": scope, "e": expires}
    return sec.sealer.seal(json.dumps(body).encode(), _PURPOSE)


def open_ticket(
    sec: Security, ticket: str | None, audience: str, now: datetime | None = None
) -> Ticket | None:
    """The ticket's content if it is ours, unexpired and for this audience; None otherwise."""
    if not ticket or len(ticket) > MAX_TICKET_LENGTH:
        return None
    try:
        body = json.loads(sec.sealer.unseal(ticket, _PURPOSE))
        opened = Ticket(
            user_id=uuid.UUID(body["u"]),
            audience=str(body["a"]),
            scope=body["s"],
            expires=int(body["e"]),
        )
    except (UnsealError, ValueError, KeyError, TypeError):
        return None
    if opened.audience != audience or opened.expires <= int((now or utcnow()).timestamp()):
        return None
    return opened


def amr_for(method: str) -> list[str]:
    """RFC 8176 values for a password plus a second factor: ``otp`` for an authenticator app's
    code; a recovery code is a second factor of no registered kind, so only ``mfa``."""
    return ["pwd", "otp", "mfa"] if method == "otp" else ["pwd", "mfa"]
