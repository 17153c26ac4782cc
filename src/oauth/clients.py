"""OAuth clients: the applications that sign users in through this provider.

Registration rules live here (``redirect_uri_problem`` and ``check_registration``) so the admin
API and the command line refuse exactly the same things. Secrets are 256 random bits shown once;
only their SHA-256 is stored (``hash_token``), and they never reach a log line or an event.

Every client must use PKCE (S256) with the authorization code grant, public or confidential, so
there is nothing to register for it: the authorization endpoint simply refuses a request without.

What these functions need from the running service comes as a ``ClientDeps`` (settings and the
session cache), which ``src.auth.context.Security`` satisfies and the command line builds itself.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import SplitResult, urlsplit

from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from src.config.settings import Settings
from src.db.models import AuthorizationCode, OAuthClient, OAuthConsent, UserSession
from src.db.types import utcnow
from src.errors import Conflict, InvalidInput, NotFound, OAuthError
from src.events.outbox import EventType, record_event
from src.security.tokens import hash_token
from src.users.cache import UserCache
from src.users.repository import decode_cursor

if TYPE_CHECKING:
    from src.oauth.schemas import ClientCreate, ClientUpdate

logger = logging.getLogger(__name__)

# Scope -> what the consent page tells the user the application will get, in plain words.
SCOPES: dict[str, str] = {
    "openid": "Sign you in",
    "profile": "Your name",
    "email": "Your email address and whether it is verified",
    "offline_access": "Stay signed in (keep access when you are not using the app)",
}
GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials", "password")

CLIENT_ID_PATTERN = r"^[A-Za-z0-9._~-]{1,64}$"
# Unreserved characters, but as a URL path segment these two mean "here" and "up": a client
# named so could never be addressed at /clients/{client_id}.
DOT_SEGMENTS = frozenset({".", ".."})
_CLIENT_ID = re.compile(CLIENT_ID_PATTERN, re.ASCII)
MAX_URI_LENGTH = 2000
MAX_URIS = 10
NAME_MAX_LENGTH = 200
SECRET_BYTES = 32

# Visible ASCII only: URIs are ASCII (RFC 3986), and a space, a control character or a look-alike
# letter in a URI compared byte for byte would only ever hide what it really says.
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+", re.ASCII)
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*", re.ASCII)
_LOOPBACK_HOST = re.compile(r"(127\.0\.0\.1|\[::1\]|localhost)(:[0-9]{1,5})?", re.ASCII)
# A registered loopback URI, split around its port: RFC 8252 section 7.3 lets a native app pick
# any port at request time, since it cannot know in advance which one will be free.
_LOOPBACK_URI = re.compile(
    r"(http://(?:127\.0\.0\.1|\[::1\]))(?::([0-9]{1,5}))?([/?].*)?", re.ASCII | re.DOTALL
)
# Compared against when the client is unknown, so that case costs what a wrong secret costs.
_NO_SECRET_HASH = hash_token("no such client")


class ClientDeps(Protocol):
    """What client changes need from the running service (``src.auth.context.Security`` is one):
    settings, and the cache whose session entries a deletion must drop."""

    @property
    def settings(self) -> Settings: ...

    @property
    def cache(self) -> UserCache: ...


# --- registration rules -------------------------------------------------------------------------


def _split(uri: str) -> SplitResult | None:
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        return None
    return parts


def redirect_uri_problem(uri: str) -> str | None:
    """Why ``uri`` cannot be registered as a (post-logout) redirect URI, or ``None``.

    https anywhere; http only for the loopback IP literals (and ``localhost``, which
    ``check_registration`` refuses in production); or a private-use scheme named after a domain
    (RFC 8252 section 7.1). Never a fragment, a wildcard or user information: the URI is compared
    as an exact string, and each of those would make it mean something other than it looks.
    """
    if len(uri) > MAX_URI_LENGTH:
        return f"must be at most {MAX_URI_LENGTH} characters"
    if not _VISIBLE_ASCII.fullmatch(uri):
        return "must be printable ASCII, without spaces or control characters"
    if "*" in uri:
        return "must not contain a wildcard (*): redirect URIs are compared exactly"
    if "#" in uri:
        return "must not contain a fragment (#)"
    parts = _split(uri)
    if parts is None:
        return "is not a valid URI"
    scheme = uri.partition(":")[0]
    if not parts.scheme or not _SCHEME.fullmatch(scheme):
        return "must be an absolute URI with a lower-case scheme (https://...)"
    if "@" in parts.netloc:
        return "must not contain user information (user@host)"
    if scheme == "https":
        if not parts.hostname or not _valid_host(parts.hostname):
            return "must name a host: a DNS name (letters, digits, hyphens) or an IP address"
        return None
    if scheme == "http":
        if not _LOOPBACK_HOST.fullmatch(parts.netloc):
            return "may use http only with 127.0.0.1, [::1] or localhost; use https"
        return None
    if "." not in scheme:
        return (
            "must use https, http on a loopback address, or a private-use scheme named after "
            "a domain you own (com.example.app:/callback)"
        )
    if not parts.path.startswith("/"):
        return "with a private-use scheme must have a path (com.example.app:/callback)"
    return None


_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _valid_host(host: str) -> bool:
    """A host a browser and a Content-Security-Policy both read the same way: a DNS name of
    letter-digit-hyphen labels (IDNs in their xn-- form) or an IP address without a zone."""
    if "%" in host:  # an IPv6 zone (fe80::1%eth0) means something on one machine only
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.split(".")
    return len(host) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in labels)


def _uses_localhost(uri: str) -> bool:
    parts = _split(uri)
    return parts is not None and parts.scheme == "http" and parts.hostname == "localhost"


def check_registration(
    settings: Settings,
    client_type: str,
    grant_types: Sequence[str],
    redirect_uris: Sequence[str],
    post_logout_redirect_uris: Sequence[str],
) -> None:
    """The rules that span fields or depend on the settings (each field on its own was checked by
    ``src.oauth.schemas``): raise one InvalidInput naming every field that breaks one."""
    errors: list[dict[str, Any]] = []
    if client_type == "public" and "client_credentials" in grant_types:
        errors.append(
            {
                "loc": ["body", "grant_types"],
                "msg": "a public client cannot use client_credentials: it has no secret",
            }
        )
    if "authorization_code" in grant_types and not redirect_uris:
        errors.append(
            {
                "loc": ["body", "redirect_uris"],
                "msg": "at least one redirect URI is needed for authorization_code",
            }
        )
    if settings.is_production:
        # A name, not an address: something else on the machine (or a hosts file) can answer it.
        for field, uris in (
            ("redirect_uris", redirect_uris),
            ("post_logout_redirect_uris", post_logout_redirect_uris),
        ):
            errors += [
                {
                    "loc": ["body", field, index],
                    "msg": "http://localhost is not accepted in production; use 127.0.0.1",
                }
                for index, uri in enumerate(uris)
                if _uses_localhost(uri)
            ]
    if errors:
        fields = sorted({str(error["loc"][1]) for error in errors})
        raise InvalidInput(
            f"The client registration is not valid: {', '.join(fields)}.", errors=errors
        )


# --- matching at request time --------------------------------------------------------------------


def redirect_uri_allowed(client: OAuthClient, uri: str) -> bool:
    """Whether ``uri`` is one of the client's redirect URIs, compared as exact strings (RFC 9700
    section 4.1.3), except that a registered http://127.0.0.1 or http://[::1] URI matches with
    any port (RFC 8252 section 7.3). ``localhost`` gets no such exception."""
    if uri in client.redirect_uris:
        return True
    presented = _without_port(uri)
    return presented is not None and any(
        _without_port(registered) == presented for registered in client.redirect_uris
    )


def _without_port(uri: str) -> str | None:
    """A loopback IP URI with its port left out, or ``None`` for any other URI."""
    match = _LOOPBACK_URI.fullmatch(uri)
    if match is None:
        return None
    host, port, rest = match.groups()
    if port is not None and int(port) > 65535:
        return None
    return host + (rest or "")


def post_logout_redirect_allowed(client: OAuthClient, uri: str) -> bool:
    """Exact match only: nothing after a logout needs a port picked at run time."""
    return uri in client.post_logout_redirect_uris


# --- reading and authenticating ----------------------------------------------------------------


def _valid_client_id(client_id: str) -> bool:
    # Nothing else was ever registered, so nothing else needs a query (and a NUL or a megabyte
    # of text never reaches the database).
    return _CLIENT_ID.fullmatch(client_id) is not None and client_id not in DOT_SEGMENTS


async def get_client(db: AsyncSession, client_id: str) -> OAuthClient | None:
    if not _valid_client_id(client_id):
        return None
    result = await db.execute(select(OAuthClient).where(OAuthClient.client_id == client_id))
    return result.scalar_one_or_none()


class FirstPartyClients:
    """Whether a client is first-party, remembered for ``max_age_seconds``.

    The account API asks this for every request made with an application's token; without it,
    each such request costs a query. A client deleted or demoted is refused at most
    ``max_age_seconds`` later: the same bound as a cached session (AUTH_CACHE_MAX_AGE_SECONDS).
    """

    def __init__(
        self,
        max_age_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 1024,
    ) -> None:
        self._max_age = max_age_seconds
        self._clock = clock
        self._max_entries = max_entries
        self._known: dict[str, tuple[bool, float]] = {}

    async def check(self, sessions: async_sessionmaker[AsyncSession], client_id: str) -> bool:
        known = self._known.get(client_id)
        now = self._clock()
        if known is not None and now - known[1] <= self._max_age:
            return known[0]
        async with sessions() as db:
            client = await get_client(db, client_id)
        first_party = client is not None and client.first_party
        if len(self._known) >= self._max_entries:
            self._known.clear()  # only ever holds registered clients: a handful
        self._known[client_id] = (first_party, now)
        return first_party


async def authenticate_client(
    db: AsyncSession, client_id: str | None, client_secret: str | None
) -> OAuthClient:
    """The client making a token request: a confidential one must prove it with its secret, a
    public one must send none (or an empty one). Raises ``OAuthError("invalid_client", ...,
    401)`` otherwise, with the same answer (and the same work: one hash, one comparison) for an
    unknown client and a wrong secret.

    The client's row is share-locked (``FOR KEY SHARE``) until the caller's transaction ends: a
    deletion running meanwhile waits for it, so it sees, and revokes, any session this request
    opens. Call it before touching sessions, so the two never wait on each other's rows.
    """
    refused = OAuthError("invalid_client", "Client authentication failed.", 401)
    if not client_id:
        raise refused
    client: OAuthClient | None = None
    if _valid_client_id(client_id):
        result = await db.execute(
            select(OAuthClient)
            .where(OAuthClient.client_id == client_id)
            .with_for_update(key_share=True)
        )
        client = result.scalar_one_or_none()
    presented = hash_token(client_secret or "")
    expected = client.secret_hash if client is not None else None
    matches = hmac.compare_digest(presented, expected or _NO_SECRET_HASH)
    if client is None:
        logger.info("client authentication failed: reason=unknown_client")
        raise refused
    if client.client_type == "public":
        if client_secret:
            # A public client cannot keep a secret; one that sends something is misconfigured
            # or is not who it claims to be. (An empty one is HTTP Basic's "client_id:".)
            logger.info("client authentication failed: client=%s reason=public_secret", client_id)
            raise refused
        return client
    if not client_secret or expected is None or not matches:
        logger.info("client authentication failed: client=%s reason=bad_secret", client_id)
        raise refused
    return client


async def find_client(db: AsyncSession, client_id: str) -> OAuthClient:
    """The client, or a 404 problem."""
    client = await get_client(db, client_id)
    if client is None:
        raise NotFound("No such client.")
    return client


def _encode_cursor(client: OAuthClient) -> str:
    raw = f"{client.created_at.isoformat()}|{client.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def list_clients(
    db: AsyncSession, *, limit: int, cursor: str | None = None
) -> tuple[list[OAuthClient], str | None]:
    """Clients in registration order (created_at, id), a keyset page at a time: pass the
    returned cursor back to get the next page; ``None`` means there is none."""
    query = select(OAuthClient).order_by(OAuthClient.created_at, OAuthClient.id).limit(limit + 1)
    if cursor:
        try:
            after: tuple[datetime, uuid.UUID] = decode_cursor(cursor)
        except ValueError:
            raise InvalidInput("The cursor is not valid; start again without one.") from None
        query = query.where(tuple_(OAuthClient.created_at, OAuthClient.id) > after)
    rows = list((await db.execute(query)).scalars().all())
    page = rows[:limit]
    return page, (_encode_cursor(page[-1]) if len(rows) > limit else None)


# --- changes ------------------------------------------------------------------------------------


def snapshot(client: OAuthClient) -> dict[str, Any]:
    """The client as events carry it: everything but the secret's hash."""
    return {
        "id": client.id,
        "client_id": client.client_id,
        "name": client.name,
        "client_type": client.client_type,
        "redirect_uris": list(client.redirect_uris),
        "post_logout_redirect_uris": list(client.post_logout_redirect_uris),
        "grant_types": list(client.grant_types),
        "scopes": list(client.scopes),
        "first_party": client.first_party,
    }


def _new_secret() -> tuple[str, str]:
    """(the secret, to show once; its hash, to store)."""
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return secret, hash_token(secret)


async def create_client(
    db: AsyncSession, sec: ClientDeps, body: ClientCreate, *, actor_id: uuid.UUID | None
) -> tuple[OAuthClient, str | None]:
    """Register a client; return it and its secret (``None`` for a public client). The secret is
    not kept anywhere: this is the only time anyone sees it."""
    check_registration(
        sec.settings,
        body.client_type,
        body.grant_types,
        body.redirect_uris,
        body.post_logout_redirect_uris,
    )
    secret, secret_hash = _new_secret() if body.client_type == "confidential" else (None, None)
    now = utcnow()
    client = OAuthClient(
        id=uuid.uuid4(),
        client_id=body.client_id or secrets.token_urlsafe(16),
        name=body.name,
        client_type=body.client_type,
        secret_hash=secret_hash,
        redirect_uris=list(body.redirect_uris),
        post_logout_redirect_uris=list(body.post_logout_redirect_uris),
        grant_types=list(body.grant_types),
        scopes=list(body.scopes),
        first_party=body.first_party,
        created_at=now,
        updated_at=now,
    )
    db.add(client)
    try:
        await db.flush()
    except IntegrityError:
        # Two registrations of one client_id raced, or it was taken: the unique index decided.
        await db.rollback()
        raise Conflict("A client with this client_id already exists.") from None
    _record(db, sec, EventType.CLIENT_CREATED, client, actor_id)
    await db.commit()
    logger.info(
        "client created: client=%s type=%s actor=%s", client.client_id, client.client_type, actor_id
    )
    return client, secret


async def update_client(
    db: AsyncSession,
    sec: ClientDeps,
    client_id: str,
    body: ClientUpdate,
    *,
    actor_id: uuid.UUID | None,
) -> OAuthClient:
    """Apply the fields sent in ``body``; the result must pass the same rules as a new client.

    Sessions and consents already granted stay as they are: narrowing scopes or grant types
    applies to what the client asks for from now on.
    """
    client = await find_client(db, client_id)
    sent = body.model_dump(exclude_unset=True)
    changes = {field: value for field, value in sent.items() if getattr(client, field) != value}
    if not changes:
        return client
    merged = {**snapshot(client), **changes}
    check_registration(
        sec.settings,
        client.client_type,
        merged["grant_types"],
        merged["redirect_uris"],
        merged["post_logout_redirect_uris"],
    )
    for field, value in changes.items():
        setattr(client, field, value)
    client.updated_at = utcnow()
    await _flush_or_conflict(db)
    _record(db, sec, EventType.CLIENT_UPDATED, client, actor_id, changes=sorted(changes))
    await db.commit()
    logger.info(
        "client updated: client=%s fields=%s actor=%s", client_id, sorted(changes), actor_id
    )
    return client


async def rotate_secret(
    db: AsyncSession, sec: ClientDeps, client_id: str, *, actor_id: uuid.UUID | None
) -> str:
    """Give a confidential client a new secret (shown once); the old one stops working now."""
    client = await find_client(db, client_id)
    if client.client_type != "confidential":
        raise Conflict("A public client has no secret to rotate.")
    secret, client.secret_hash = _new_secret()
    client.updated_at = utcnow()
    await _flush_or_conflict(db)
    _record(db, sec, EventType.CLIENT_SECRET_ROTATED, client, actor_id)
    await db.commit()
    logger.info("client secret rotated: client=%s actor=%s", client_id, actor_id)
    return secret


async def delete_client(
    db: AsyncSession, sec: ClientDeps, client_id: str, *, actor_id: uuid.UUID | None
) -> int:
    """Remove a client and everything it was given: its consents and unused authorization codes
    are deleted, and every session it obtained is revoked, so its tokens stop working at once.
    Returns the number of sessions revoked."""
    if not _valid_client_id(client_id):
        raise NotFound("No such client.")
    # Locked first: a token request that authenticated this client holds a share lock on the row
    # until it commits, so the sessions it opens are there to revoke once the lock is ours.
    result = await db.execute(
        select(OAuthClient).where(OAuthClient.client_id == client_id).with_for_update()
    )
    client = result.scalar_one_or_none()
    if client is None:
        raise NotFound("No such client.")
    now = utcnow()
    revoked = await db.execute(
        update(UserSession)
        .where(UserSession.client_id == client_id, UserSession.revoked_at.is_(None))
        .values(revoked_at=now, revoked_reason="client_deleted")
        .returning(UserSession.id),
        execution_options={"synchronize_session": False},
    )
    session_ids = list(revoked.scalars().all())
    await db.execute(delete(OAuthConsent).where(OAuthConsent.client_id == client_id))
    # A later client registered under the same client_id must not redeem this one's codes.
    await db.execute(delete(AuthorizationCode).where(AuthorizationCode.client_id == client_id))
    _record(
        db,
        sec,
        EventType.CLIENT_DELETED,
        client,
        actor_id,
        sessions_revoked=len(session_ids),
        deleted_at=now,
    )
    await db.delete(client)
    await _commit_dropping_sessions(db, sec, session_ids)
    logger.info(
        "client deleted: client=%s sessions_revoked=%d actor=%s",
        client_id,
        len(session_ids),
        actor_id,
    )
    return len(session_ids)


def _record(
    db: AsyncSession,
    sec: ClientDeps,
    event_type: EventType,
    client: OAuthClient,
    actor_id: uuid.UUID | None,
    **extra: Any,
) -> None:
    record_event(
        db, sec.settings, event_type, client.id, {**snapshot(client), "actor_id": actor_id, **extra}
    )


async def _commit_dropping_sessions(
    db: AsyncSession, sec: ClientDeps, session_ids: Sequence[uuid.UUID]
) -> None:
    """``src.users.service.commit_change`` for session entries only (that one also wants the
    sealer, which nothing here needs): drop them before the commit, so no reader is served a
    stale "live" entry after the event can be published, and after it, so a read racing the
    commit cannot put the old state back."""
    await db.flush()
    await sec.cache.invalidate(session_ids=session_ids)
    await db.commit()
    await sec.cache.invalidate(session_ids=session_ids)


async def _flush_or_conflict(db: AsyncSession) -> None:
    try:
        await db.flush()
    except StaleDataError:
        await db.rollback()
        raise Conflict("The client was changed concurrently; fetch it again.") from None


# --- the admin console ----------------------------------------------------------------------------

# The admin console (src/web/admin) signs admins in through the authorization code flow like any
# application: a public, first-party client (no consent page, PKCE), ensured at every start-up.
CONSOLE_CLIENT_ID = "admin-console"
CONSOLE_CALLBACK_PATH = "/admin/callback"


def console_redirect_uri(settings: Settings) -> str:
    return settings.PUBLIC_BASE_URL.rstrip("/") + CONSOLE_CALLBACK_PATH


async def ensure_console_client(db: AsyncSession, settings: Settings) -> None:
    """Register the console's client, or bring it back to what the console needs (idempotent):
    its redirect URI follows PUBLIC_BASE_URL, and an operator's edits to it are undone. No event:
    it is the service's own wiring, not an administrator's change."""
    wanted = {
        "name": "Admin console",
        "client_type": "public",
        "secret_hash": None,
        "redirect_uris": [console_redirect_uri(settings)],
        "post_logout_redirect_uris": [],
        "grant_types": ["authorization_code", "refresh_token"],
        "scopes": ["openid", "profile", "email"],
        "first_party": True,
    }
    client = await get_client(db, CONSOLE_CLIENT_ID)
    if client is None:
        now = utcnow()
        db.add(
            OAuthClient(
                id=uuid.uuid4(),
                client_id=CONSOLE_CLIENT_ID,
                created_at=now,
                updated_at=now,
                **wanted,
            )
        )
    elif any(getattr(client, field) != value for field, value in wanted.items()):
        for field, value in wanted.items():
            setattr(client, field, value)
        client.updated_at = utcnow()
    else:
        return
    try:
        await db.commit()
    except (IntegrityError, StaleDataError):
        await db.rollback()  # another instance starting at the same moment did it first
        return
    logger.info("admin console client ensured: client=%s", CONSOLE_CLIENT_ID)
