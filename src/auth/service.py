"""Signing in and out: the password and refresh-token grants, sessions, resets and verification.

Every authentication outcome is logged with the user id (or ``unknown``), the client IP and a
reason, never with a password or a token.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.auth.browser import end_browser_session
from src.auth.context import Principal, Security
from src.auth.jwt import TokenError
from src.auth.passwords import enforce_password_policy
from src.auth.rate_limit import LoginDecision, client_key
from src.config.logging import audit_line
from src.db.models import RefreshToken, User, UserSession
from src.db.session import close_session
from src.db.types import utcnow
from src.errors import (
    Conflict,
    DomainError,
    NotAuthenticated,
    NotFound,
    OAuthError,
    TooManyRequests,
)
from src.events.outbox import EventType, record_event, record_notification
from src.security.tokens import hash_token, new_token
from src.services import metrics
from src.users import repository
from src.users.cache import SessionState
from src.users.emails import canonical_email
from src.users.schemas import SessionPublic, TokenResponse, UserCreate, UserPublic, UserRegister
from src.users.service import (
    EMAIL_VERIFICATION,
    PASSWORD_RESET,
    add_user,
    commit_change,
    ensure_email_free,
    record_verification_request,
    send_one_time_link,
    snapshot,
)

logger = logging.getLogger(__name__)
audit = logging.getLogger("src.auth.audit")

_INVALID_CREDENTIALS = "Invalid email or password."


@dataclass(frozen=True)
class ClientInfo:
    """Where a request comes from: a parsed IP address (see src.api.client_address)."""

    ip: str
    user_agent: str | None


def _guard_key(username: str) -> str:
    """What the login guard counts a username as: its canonical address when it is one."""
    return canonical_email(username) or username.strip().lower()


async def _admit(
    db: AsyncSession,
    sec: Security,
    key: str,
    user: User | None,
    client: ClientInfo,
    device_user: uuid.UUID | None = None,
) -> LoginDecision:
    """Ask the login guard before a password is checked (429 when refused). ``device_user``:
    the account this browser signed in to before (its known-device cookie), which counts as a
    known address wherever the browser is now."""

    async def known_address() -> bool:
        if user is not None and device_user == user.id:
            return True
        # The same query whether the account exists or not: its timing reveals nothing.
        user_id = user.id if user is not None else uuid.uuid4()
        network = client_key(client.ip)
        return (await repository.sign_in_history(db, user_id, network, _known_since(sec)))[1]

    decision = await sec.guard.admit(client.ip, key, known_address)
    if decision.wait is not None:
        who = user.id if user is not None else "unknown"
        audit_line(
            audit,
            "password check refused",
            level=logging.WARNING,
            user=who,
            ip=client.ip,
            reason="rate_limited",
        )
        raise TooManyRequests(decision.wait)
    return decision


async def release_connection(db: AsyncSession) -> None:
    """End the session's read-only transaction before argon2 runs, so its pooled connection
    serves others meanwhile: a hash takes tens of milliseconds, and the pool's few connections
    are shared by every request (and the relay). Loaded rows stay usable (the sessionmaker does
    not expire them on commit). A session with changes not yet written is left as it is."""
    if db.in_transaction() and not (db.new or db.dirty or db.deleted):
        await db.commit()


def _known_since(sec: Security) -> datetime:
    return utcnow() - timedelta(days=sec.settings.LOGIN_KNOWN_ADDRESS_DAYS)


async def verify_password(
    db: AsyncSession, sec: Security, user: User, password: str, client: ClientInfo
) -> bool:
    """Check a signed-in user's password under the login guard's limits (a re-authentication),
    so a stolen access token is no way around them. 429 when the guard refuses."""
    key = user.email
    await _admit(db, sec, key, user, client)
    if not await sec.hasher.verify(user.password_hash, password):
        audit_line(audit, "re-authentication failed", user=user.id, ip=client.ip)
        return False
    await sec.guard.succeeded(client.ip, key)
    return True


# --- password grant -------------------------------------------------------------------------------


# Runs work after the response has gone (FastAPI's BackgroundTasks.add_task fits).
Defer = Callable[[Callable[[], Awaitable[None]]], None]


async def complete_sign_in(
    db: AsyncSession,
    sec: Security,
    user: User,
    client: ClientInfo,
    client_id: str | None,
    *,
    amr: list[str],
    scope: str | None = None,
) -> TokenResponse:
    """The password grant's session, once every factor the account has was checked."""
    await notice_new_address(db, sec, user, client)
    session, refresh = await open_session(db, sec, user, client, client_id, amr=amr, scope=scope)
    record_sign_in(db, sec, session, client, "password_grant")
    await commit_change(db, sec, changed_users(db, user))
    audit_line(audit, "login succeeded", user=user.id, ip=client.ip, session=session.id)
    return token_response(sec, user, session, refresh)


# In the session's info: users whose password hash this transaction upgraded.
_REHASHED = "ums.rehashed_users"


def changed_users(db: AsyncSession, user: User) -> list[uuid.UUID]:
    """``[user.id]`` if the sign-in changed the user's row (a password rehash), so its cached
    copy must go; otherwise nothing: a sign-in alone leaves the cache warm."""
    return [user.id] if user.id in db.info.get(_REHASHED, ()) else []


def record_sign_in(
    db: AsyncSession, sec: Security, session: UserSession, client: ClientInfo, via: str
) -> None:
    """``user.logged_in`` for a new session: ``via`` is password_grant, sign_in_page or
    authorization_code. The first two complete a sign-in (after its second factor, if any)."""
    if via != "authorization_code":
        metrics.login("success")
    record_event(
        db,
        sec.settings,
        EventType.LOGGED_IN,
        session.user_id,
        {
            "id": session.user_id,
            "session_id": session.id,
            "ip": client.ip,
            "client_id": session.client_id,
            "via": via,
        },
    )


async def check_password(
    db: AsyncSession,
    sec: Security,
    username: str,
    password: str,
    client: ClientInfo,
    *,
    sessions: async_sessionmaker[AsyncSession],
    defer: Defer,
    device_user: uuid.UUID | None = None,
) -> User:
    """A sign-in's password check, for the password grant and the hosted sign-in page alike.

    A wrong password for an existing account and any password for an unknown one cost the same
    before the answer (one argon2 verification); the failure event of the former is recorded
    after it, so no write gives the account away. Raises OAuthError("invalid_grant") on failure
    and TooManyRequests when the login guard refuses. Nothing is committed here."""
    account = canonical_email(username)
    user = await repository.get_user_by_email(db, account) if account else None
    try:
        decision = await _admit(db, sec, _guard_key(username), user, client, device_user)
    except TooManyRequests:
        metrics.login("rate_limited")
        raise
    await release_connection(db)

    if user is None:
        # Spend the same hashing time as a real check so timing does not reveal accounts.
        await sec.hasher.verify_dummy(password)
        metrics.login("unknown_user")
        audit_line(
            audit, "login failed", user="unknown", ip=client.ip, reason="invalid_credentials"
        )
        raise OAuthError("invalid_grant", _INVALID_CREDENTIALS)

    if not await sec.hasher.verify(user.password_hash, password):
        locked_for = decision.lock_if_wrong
        failure = {
            "id": user.id,
            "ip": client.ip,
            "reason": "invalid_credentials",
            "locked_for_seconds": locked_for,
        }
        # A partial, not a lambda: Starlette awaits a coroutine function (partials included),
        # but would run a lambda in a thread and drop the coroutine it returns.
        defer(
            functools.partial(
                record_event_apart, sessions, sec, EventType.LOGIN_FAILED, user.id, failure
            )
        )
        metrics.login("bad_password")
        if locked_for:
            metrics.LOGIN_LOCKOUTS.inc()
        audit_line(
            audit,
            "login failed",
            user=user.id,
            ip=client.ip,
            reason="invalid_credentials",
            locked_for_seconds=round(locked_for) if locked_for else None,
        )
        raise OAuthError("invalid_grant", _INVALID_CREDENTIALS)

    if not user.is_active:
        metrics.login("inactive")
        audit_line(audit, "login failed", user=user.id, ip=client.ip, reason="inactive")
        raise OAuthError("invalid_grant", "This account is disabled.")

    await sec.guard.succeeded(client.ip, _guard_key(username))
    if sec.hasher.needs_rehash(user.password_hash):
        # Parameters were raised since this hash was made: upgrade it while we have the password.
        # The upgrade bumps the row's version (optimistic locking): the caller's commit_change
        # with the user's id drops a cached copy like any other change.
        user.password_hash = await sec.hasher.hash(password)
        db.info.setdefault(_REHASHED, set()).add(user.id)
    return user


async def record_event_apart(
    sessions: async_sessionmaker[AsyncSession],
    sec: Security,
    event_type: EventType,
    user_id: uuid.UUID,
    data: dict[str, Any],
) -> None:
    """An event in a transaction of its own, for a refusal: the refused request writes nothing
    (or, after the answer, nothing a timing could tell). A failure here is logged, not raised:
    the answer stands and the audit log line remains."""
    try:
        async with sessions() as db:
            record_event(db, sec.settings, event_type, user_id, data)
            await db.commit()
    except Exception as exc:  # noqa: BLE001 - see the docstring
        logger.warning(
            "%s event not recorded (%s): user=%s", event_type, type(exc).__name__, user_id
        )


async def notice_new_address(
    db: AsyncSession, sec: Security, user: User, client: ClientInfo
) -> None:
    """Mail the user when a sign-in comes from an address it has not used lately (not on the
    very first sign-in: that one the user expects)."""
    if not sec.settings.NOTIFY_NEW_SIGN_IN:
        return
    ever, from_here = await repository.sign_in_history(
        db, user.id, client_key(client.ip), _known_since(sec)
    )
    if not ever or from_here:
        return
    record_notification(
        db,
        sec.settings,
        sec.sealer,
        EventType.NEW_SIGN_IN,
        user.id,
        {
            "user_id": user.id,
            "email": user.email,
            "ip": client.ip,
            # As much as a session keeps: the header is the client's text, up to 16 KB of it.
            "user_agent": (client.user_agent or "")[:512] or None,
            "time": utcnow(),
        },
    )


async def open_session(
    db: AsyncSession,
    sec: Security,
    user: User,
    client: ClientInfo,
    client_id: str | None,
    *,
    amr: list[str],
    scope: str | None = None,
    auth_time: datetime | None = None,
    parent_id: uuid.UUID | None = None,
    kind: str = "token",
) -> tuple[UserSession, str]:
    """A new session and its first secret: a refresh token, or for a browser session the value
    of its cookie (``kind="browser"``). Flushed, not committed."""
    now = utcnow()
    absolute = now + timedelta(days=sec.settings.SESSION_MAX_LIFETIME_DAYS)
    session = UserSession(
        id=uuid.uuid4(),
        user_id=user.id,
        rotation_counter=0,
        created_at=now,
        last_used_at=now,
        expires_at=min(now + timedelta(days=sec.settings.REFRESH_TOKEN_EXPIRE_DAYS), absolute),
        absolute_expires_at=absolute,
        ip_address=client.ip,
        user_agent=(client.user_agent or "")[:512] or None,
        client_id=client_id,
        sign_in_network=client_key(client.ip),
        kind=kind,
        parent_id=parent_id,
        auth_time=auth_time or now,
        amr=" ".join(amr),
        scope=scope,
    )
    if kind == "browser":
        secret = new_token()
        session.cookie_hash = hash_token(secret)
        db.add(session)
        await db.flush()
        return session, secret
    db.add(session)
    # The tables have no ORM relationships, so the session row must exist before its token's.
    await db.flush()
    refresh = _new_refresh_token(db, session, now)
    return session, refresh


def _new_refresh_token(db: AsyncSession, session: UserSession, now: datetime) -> str:
    token = new_token()
    db.add(
        RefreshToken(
            token_hash=hash_token(token),
            session_id=session.id,
            generation=session.rotation_counter,
            issued_at=now,
        )
    )
    return token


def token_response(
    sec: Security, user: User, session: UserSession, refresh_token: str | None
) -> TokenResponse:
    """The access token for a session, with what the session was granted (client and scope)."""
    access, expires_in = sec.tokens.issue(
        user.id,
        session.id,
        user.role,
        client_id=session.client_id,
        scope=session.scope,
        amr=(session.amr or "").split() or None,
        auth_time=int((session.auth_time or session.created_at).timestamp()),
    )
    return TokenResponse(
        access_token=access,
        expires_in=expires_in,
        refresh_token=refresh_token,
        scope=session.scope,
    )


# --- refresh-token grant --------------------------------------------------------------------------


async def refresh(
    db: AsyncSession,
    sec: Security,
    refresh_token: str,
    client: ClientInfo,
    client_id: str | None = None,
) -> TokenResponse:
    """Rotate the refresh token; a token presented twice ends its whole session (reuse).

    A refresh token works only for the client that obtained it (RFC 9700 section 4.14): one
    stolen from a client is useless to another.
    """
    invalid = OAuthError("invalid_grant", "The refresh token is invalid or expired.")
    row = await repository.get_refresh_token(db, hash_token(refresh_token))
    if row is None:
        audit_line(audit, "refresh failed", user="unknown", ip=client.ip, reason="unknown_token")
        raise invalid
    session = await repository.get_session(db, row.session_id)
    if session is None:
        audit_line(audit, "refresh failed", user="unknown", ip=client.ip, reason="session_gone")
        raise invalid
    now = utcnow()
    if row.used_at is not None:
        if session.revoked_at is None:
            session.revoked_at, session.revoked_reason = now, "refresh_reuse"
            await commit_change(db, sec, session_ids=[session.id])
        audit_line(
            audit,
            "refresh token reuse",
            level=logging.WARNING,
            user=session.user_id,
            ip=client.ip,
            session=session.id,
            session_revoked=True,
        )
        raise invalid
    if session.client_id != client_id:
        audit_line(
            audit,
            "refresh failed",
            level=logging.WARNING,
            user=session.user_id,
            ip=client.ip,
            reason="wrong_client",
        )
        raise invalid
    if session.revoked_at is not None or session.expires_at <= now:
        audit_line(
            audit, "refresh failed", user=session.user_id, ip=client.ip, reason="session_ended"
        )
        raise invalid
    user = await repository.get_user(db, session.user_id)
    if user is None or not user.is_active:
        audit_line(audit, "refresh failed", user=session.user_id, ip=client.ip, reason="inactive")
        raise invalid

    row.used_at = now
    session.rotation_counter += 1
    session.last_used_at = now
    session.expires_at = min(
        now + timedelta(days=sec.settings.REFRESH_TOKEN_EXPIRE_DAYS), session.absolute_expires_at
    )
    session.ip_address = client.ip
    new_refresh = _new_refresh_token(db, session, now)
    await db.commit()
    audit_line(audit, "refresh succeeded", user=user.id, ip=client.ip, session=session.id)
    metrics.token_issued("refresh_token")
    return token_response(sec, user, session, new_refresh)


# --- access tokens (the strategy half of "transport + strategy") ------------------------------


async def authenticate(
    sessions: async_sessionmaker[AsyncSession], sec: Security, token: str
) -> Principal:
    """Check an access token and its session: the cache answers when it can, else one database
    read (shared by the requests that miss together), which refills the cache."""
    try:
        claims = sec.tokens.decode(token)
        user_id, session_id = uuid.UUID(claims.sub), uuid.UUID(claims.sid)
    except (TokenError, ValueError) as exc:
        audit_line(audit, "token refused", reason=str(exc))
        raise NotAuthenticated("The access token is invalid or expired.") from None

    load = functools.partial(_load_auth, sessions, sec, user_id, session_id)
    cached = await sec.cache.get_auth(user_id, session_id)
    if cached is None:
        user, state = await sec.cache.load_once(user_id, session_id, load)
    else:
        user, state = cached
        if sec.cache.ageing(state):
            sec.cache.refresh_soon(user_id, session_id, load)
    if state.revoked or state.expires_at <= utcnow() or state.user_id != user_id:
        audit_line(audit, "token refused", user=user_id, reason="session_ended")
        raise NotAuthenticated("The session has ended.")
    if not user.is_active:
        audit_line(audit, "token refused", user=user_id, reason="inactive")
        raise NotAuthenticated("This account is disabled.")
    return Principal(
        user=user,
        session_id=session_id,
        client_id=claims.client_id,
        scope=claims.scope,
        amr=claims.amr,
        auth_time=claims.auth_time,
    )


async def _load_auth(
    sessions: async_sessionmaker[AsyncSession],
    sec: Security,
    user_id: uuid.UUID,
    session_id: uuid.UUID,
) -> tuple[UserPublic, SessionState]:
    # The moment before the read: an answer is never believed longer than the bound allows.
    checked_at = utcnow()
    db = sessions()
    try:
        found = await repository.get_user_and_session(db, user_id, session_id)
        if found is None:
            raise NotAuthenticated("The session has ended.")
        user_row, session_row = found
        user = UserPublic.model_validate(user_row)
        state = SessionState(
            user_id=user_id,
            expires_at=session_row.expires_at,
            revoked=session_row.revoked_at is not None,
            checked_at=checked_at,
        )
    finally:
        await close_session(db, sec.settings.DATABASE_CLOSE_TIMEOUT)
    await sec.cache.store(user, session_id, state)
    return user, state


# --- sessions -------------------------------------------------------------------------------------


async def logout(db: AsyncSession, sec: Security, principal: Principal) -> None:
    session = await repository.get_session(db, principal.session_id)
    if session is not None and session.revoked_at is None:
        session.revoked_at, session.revoked_reason = utcnow(), "logout"
    await commit_change(db, sec, session_ids=[principal.session_id])
    audit_line(audit, "logout", user=principal.id, session=principal.session_id)


async def logout_all(db: AsyncSession, sec: Security, principal: Principal) -> int:
    revoked = await repository.revoke_sessions(db, principal.id, utcnow(), "logout_all")
    await commit_change(db, sec, session_ids=revoked)
    audit_line(audit, "logout everywhere", user=principal.id, sessions=len(revoked))
    return len(revoked)


async def list_sessions(db: AsyncSession, principal: Principal) -> list[SessionPublic]:
    sessions = await repository.list_active_sessions(db, principal.id, utcnow())
    return [
        SessionPublic.model_validate(s).model_copy(update={"current": s.id == principal.session_id})
        for s in sessions
    ]


async def revoke_session(
    db: AsyncSession, sec: Security, principal: Principal, session_id: uuid.UUID
) -> None:
    session = await repository.get_session(db, session_id)
    if session is None or session.user_id != principal.id or session.revoked_at is not None:
        raise NotFound("No such session.")
    # A browser session takes the applications' sessions opened through it along.
    await end_browser_session(db, sec, session_id, reason="revoked")
    audit_line(audit, "session revoked", user=principal.id, session=session_id)


async def list_user_sessions(db: AsyncSession, user_id: uuid.UUID) -> list[SessionPublic]:
    """Another user's live sessions, for an administrator (404 for an unknown user)."""
    if await repository.get_user(db, user_id) is None:
        raise NotFound("No such user.")
    sessions = await repository.list_active_sessions(db, user_id, utcnow())
    return [SessionPublic.model_validate(s) for s in sessions]


async def revoke_user_session(
    db: AsyncSession,
    sec: Security,
    user_id: uuid.UUID,
    session_id: uuid.UUID,
    *,
    actor_id: uuid.UUID,
) -> None:
    """An administrator ends one of a user's sessions (and what an application obtained through
    it). Unlike the user's own sign-out this is an event (``user.session_revoked``) naming the
    administrator, so the user's trail shows who did it. The row is locked first: of two
    revocations at once, the second waits and then finds it revoked (404), so one event."""
    session = await db.get(UserSession, session_id, with_for_update=True)
    if session is None or session.user_id != user_id or session.revoked_at is not None:
        raise NotFound("No such session.")
    data = {"id": user_id, "session_id": session_id, "kind": session.kind, "actor_id": actor_id}
    record_event(db, sec.settings, EventType.SESSION_REVOKED, user_id, data)
    await end_browser_session(db, sec, session_id, reason="revoked_by_admin")
    audit_line(audit, "session revoked", user=user_id, session=session_id, actor=actor_id)


async def send_password_reset(
    db: AsyncSession, sec: Security, user_id: uuid.UUID, *, actor_id: uuid.UUID
) -> None:
    """An administrator has a reset link mailed to the account's address (earlier links stop
    working); the notification names the administrator. Not throttled like the public request:
    only an administrator can ask, and it is an answer to someone asking for help."""
    user = await repository.get_user(db, user_id)
    if user is None:
        raise NotFound("No such user.")
    if not user.is_active:
        raise Conflict("The account is deactivated: activate it before sending a reset link.")
    await send_one_time_link(
        db,
        sec,
        user,
        EventType.PASSWORD_RESET_REQUESTED,
        PASSWORD_RESET,
        "account/reset-password",
        extra={"actor_id": actor_id},
    )
    await db.commit()
    audit_line(audit, "password reset sent", user=user_id, actor=actor_id)


# --- password reset and email verification --------------------------------------------------------


async def register(db: AsyncSession, sec: Security, body: UserRegister, client: ClientInfo) -> User:
    """Self-registration, throttled per client address and per address registered (429)."""
    wait = await sec.throttle.hit("register", client.ip, body.email)
    if wait is not None:
        audit_line(
            audit,
            "registration refused",
            level=logging.WARNING,
            ip=client.ip,
            reason="rate_limited",
        )
        raise TooManyRequests(wait)
    return await create_account(db, sec, UserCreate.model_validate(body.model_dump()))


async def create_account(
    db: AsyncSession, sec: Security, body: UserCreate, *, actor_id: uuid.UUID | None = None
) -> User:
    """A new account with a password: the cheap checks, the policy, then the (slow) hash."""
    await ensure_email_free(db, sec.settings, body.email)
    enforce_password_policy(body.password, body.email)
    await release_connection(db)
    password_hash = await sec.hasher.hash(body.password)
    return await add_user(db, sec, body, password_hash, actor_id=actor_id)


async def set_password(
    db: AsyncSession,
    sec: Security,
    user: User,
    password: str,
    *,
    reason: str,
    keep_session: uuid.UUID | None = None,
) -> None:
    """Store a new password (checked by the caller) and end the user's other sessions."""
    user.password_hash = await sec.hasher.hash(password)
    user.updated_at = utcnow()
    revoked = await repository.revoke_sessions(
        db, user.id, utcnow(), f"password_{reason}", except_session=keep_session
    )
    record_event(
        db,
        sec.settings,
        EventType.PASSWORD_CHANGED,
        user.id,
        {"id": user.id, "reason": reason, "sessions_revoked": len(revoked)},
    )
    await commit_change(db, sec, [user.id], revoked)
    logger.info("password %s: user=%s sessions_revoked=%d", reason, user.id, len(revoked))


async def request_password_reset(
    sessions: async_sessionmaker[AsyncSession], sec: Security, email: str, client: ClientInfo
) -> None:
    """Mail a reset link if the address has an active account.

    Runs after the response (the endpoint always answers 202 at once), so neither the answer nor
    its timing tells whether the account exists, nor whether the request was throttled.
    """

    async def work() -> None:
        async with sessions() as db:
            user = await repository.get_user_by_email(db, email)
            if user is None or not user.is_active:
                logger.info("password reset requested for no active account")
                return
            await send_one_time_link(
                db,
                sec,
                user,
                EventType.PASSWORD_RESET_REQUESTED,
                PASSWORD_RESET,
                "account/reset-password",
            )
            await db.commit()
        logger.info("password reset requested: user=%s", user.id)

    await _after_the_answer(sec, "password_reset", email, client, work)


async def _after_the_answer(
    sec: Security,
    action: str,
    email: str,
    client: ClientInfo,
    work: Callable[[], Awaitable[None]],
) -> None:
    """The part of a mail request that runs after its 202: throttled, bounded, never raising.

    At most ``MAIL_REQUESTS_IN_FLIGHT`` run at once; beyond that a request is dropped (the
    answer was the same 202 either way), so a flood cannot pile up work behind the answers.
    """
    if sec.mail_requests.locked():
        logger.warning("%s request dropped: ip=%s reason=busy", action, client.ip)
        return
    async with sec.mail_requests:
        try:
            if await sec.throttle.hit(action, client.ip, email) is not None:
                logger.warning("%s request dropped: ip=%s reason=rate_limited", action, client.ip)
                return
            await work()
        except Exception as exc:  # noqa: BLE001 - nobody is waiting for an answer any more
            logger.warning("%s request failed (%s): ip=%s", action, type(exc).__name__, client.ip)


async def _spend_token(db: AsyncSession, token: str, purpose: str) -> User:
    row = await repository.get_one_time_token(db, hash_token(token), purpose)
    now = utcnow()
    if row is None or row.used_at is not None or row.expires_at <= now:
        raise DomainError("The token is invalid, expired or already used.")
    user = await repository.get_user(db, row.user_id)
    if user is None or not user.is_active:
        raise DomainError("The token is invalid, expired or already used.")
    await repository.spend_one_time_tokens(db, user.id, purpose, now)
    return user


async def confirm_password_reset(
    db: AsyncSession, sec: Security, token: str, new_password: str
) -> None:
    """Set the new password and end every session; the user then signs in as usual."""
    user = await _spend_token(db, token, PASSWORD_RESET)
    enforce_password_policy(new_password, user.email)
    await set_password(db, sec, user, new_password, reason="reset")
    await sec.guard.forget_account(user.email)


async def request_email_verification(
    sessions: async_sessionmaker[AsyncSession], sec: Security, email: str, client: ClientInfo
) -> None:
    """Mail a new verification link; runs after the response, like a reset request."""

    async def work() -> None:
        async with sessions() as db:
            user = await repository.get_user_by_email(db, email)
            if user is None or not user.is_active or user.email_verified:
                return
            await record_verification_request(db, sec, user)
            await db.commit()

    await _after_the_answer(sec, "verification", email, client, work)


async def confirm_email_verification(db: AsyncSession, sec: Security, token: str) -> User:
    user = await _spend_token(db, token, EMAIL_VERIFICATION)
    if not user.email_verified:
        user.email_verified = True
        user.updated_at = utcnow()
        await db.flush()
        record_event(db, sec.settings, EventType.EMAIL_VERIFIED, user.id, snapshot(user))
    await commit_change(db, sec, [user.id])
    return user
