"""Second factors: TOTP authenticators (RFC 6238) and single-use recovery codes.

An authenticator is enrolled in two steps: ``start_totp_enrolment`` makes a secret (shown once,
with an ``otpauth://`` URI and its QR code drawn here as SVG) and ``confirm_totp`` counts it once
a first code proves the app holds it. The secret is stored sealed with ``ENCRYPTION_KEY``, bound
to the factor's id: a database reader cannot compute codes, and a sealed secret copied onto
another row does not open. The first confirmed factor comes with ten recovery codes, shown once
and stored as SHA-256 hashes (80 random bits each, so a fast hash is safe).

Every code check passes the login guard exactly like a password (``mfa:<user id>`` is the
account it counts for): per client address, per (account, address) with escalating lock-outs,
and per account. A TOTP code is accepted for ``TOTP_DRIFT_STEPS`` steps either side of now, and
each step works once per factor (RFC 6238 section 5.2): the factor's row is locked while it is
checked, so two uses of one code cannot both succeed. A recovery code is spent by a single
``UPDATE ... WHERE used_at IS NULL``.

Removing a factor needs the current password or a valid code; regenerating the recovery codes
needs the password. Every change records its event in the same transaction; no event carries a
secret, a code or a hash.
"""

from __future__ import annotations

import base64
import functools
import hmac
import io
import logging
import re
import secrets
import unicodedata
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import pyotp
import segno
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.auth import service as auth_service
from src.auth.context import Security
from src.auth.rate_limit import LoginDecision, client_key
from src.auth.service import ClientInfo
from src.config.logging import audit_line
from src.config.settings import Settings
from src.db.models import MfaFactor, RecoveryCode, User
from src.db.types import utcnow
from src.errors import Conflict, DomainError, InvalidInput, NotFound, TooManyRequests
from src.events.outbox import EventType, record_event
from src.security.sealing import UnsealError
from src.security.tokens import hash_token
from src.users import repository
from src.users.service import commit_change

logger = logging.getLogger(__name__)
audit = logging.getLogger("src.auth.audit")

TOTP_PERIOD = 30
TOTP_DIGITS = 6
TOTP_DRIFT_STEPS = 1
TOTP = "totp"

# What verify_second_factor answers: which kind of code signed the user in (the amr follows).
METHOD_OTP = "otp"
METHOD_RECOVERY_CODE = "recovery_code"

RECOVERY_CODE_COUNT = 10
RECOVERY_CODE_BYTES = 10  # 80 bits: 16 base32 characters, shown as 4 groups of 4
MAX_CODE_LENGTH = 64
MAX_NAME_LENGTH = 100
DEFAULT_NAME = "Authenticator"
# An enrolment not confirmed within this is forgotten (and deleted when the next one starts).
ENROLMENT_LIFETIME = timedelta(minutes=10)
# Bounds on what one account can make the service store.
MAX_FACTORS = 10
MAX_PENDING_ENROLMENTS = 5

_REFUSED = "The code is not valid."
_WRONG_PASSWORD = "The current password is not correct."
_NO_SUCH_FACTOR = "No such authenticator."
_TOTP_CODE = re.compile(rf"[0-9]{{{TOTP_DIGITS}}}", re.ASCII)
_RECOVERY_CODE = re.compile(r"[A-Z2-7]{16}", re.ASCII)

# Runs work after the response has gone (FastAPI's BackgroundTasks.add_task fits).
Defer = Callable[[Callable[[], Awaitable[None]]], None]


class SecondFactorRefused(DomainError):
    """A code that does not sign in: wrong, already used, or for no factor. One message for all."""

    def __init__(self, detail: str = _REFUSED) -> None:
        super().__init__(detail)


# --- names and codes ------------------------------------------------------------------------------

# Zero-width (non-)joiners hold emoji sequences and some scripts together; other format
# characters (bidi overrides among them) only disguise a name.
_ALLOWED_FORMAT = frozenset({"\u200c", "\u200d"})
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def factor_name(name: str | None) -> str:
    """The name a factor is listed under: trimmed, 1-100 characters, no control or format
    characters (``InvalidInput`` otherwise); ``DEFAULT_NAME`` when none is given."""
    if name is None:
        return DEFAULT_NAME
    text = name.strip()
    if not 1 <= len(text) <= MAX_NAME_LENGTH:
        raise InvalidInput(f"The name must have 1 to {MAX_NAME_LENGTH} characters.")
    if any(
        unicodedata.category(char) in _REFUSED_CATEGORIES and char not in _ALLOWED_FORMAT
        for char in text
    ):
        raise InvalidInput("The name must not contain control or format characters.")
    return text


def _totp_digits(code: str) -> str | None:
    """Six ASCII digits once spaces are removed (``123 456`` is how apps show them), or None."""
    digits = code.replace(" ", "")
    return digits if _TOTP_CODE.fullmatch(digits) else None


def normalise_recovery_code(code: str) -> str | None:
    """The stored form of a recovery code (upper case, no dashes or spaces), or None when the
    text cannot be one."""
    text = code.replace("-", "").replace(" ", "").upper()
    return text if _RECOVERY_CODE.fullmatch(text) else None


def _new_recovery_code() -> str:
    text = base64.b32encode(secrets.token_bytes(RECOVERY_CODE_BYTES)).decode("ascii")
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


def _step(moment: datetime) -> int:
    return int(moment.timestamp()) // TOTP_PERIOD


def _totp(secret: str) -> pyotp.TOTP:
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD)


def _matching_steps(secret: str, digits: str, now: datetime) -> list[int]:
    """The time steps within the drift whose code is ``digits``, oldest first."""
    totp, current = _totp(secret), _step(now)
    return [
        step
        for step in range(current - TOTP_DRIFT_STEPS, current + TOTP_DRIFT_STEPS + 1)
        if hmac.compare_digest(totp.generate_otp(step), digits)
    ]


def _associated_data(factor_id: uuid.UUID) -> bytes:
    return f"totp:{factor_id}".encode()


def _open_secret(sec: Security, factor: MfaFactor) -> str | None:
    if factor.secret is None:
        return None
    try:
        return sec.sealer.unseal(factor.secret, _associated_data(factor.id)).decode("ascii")
    except (UnsealError, UnicodeDecodeError):
        # Sealed with a key no longer in ENCRYPTION_KEY, or not this factor's: it cannot match.
        logger.warning("second factor secret does not open: factor=%s", factor.id)
        return None


def provisioning_uri(sec: Security, user: User, secret: str) -> str:
    """``otpauth://totp/<issuer>:<email>?secret=...&issuer=<issuer>`` (Google's key URI format)."""
    return _totp(secret).provisioning_uri(name=user.email, issuer_name=sec.settings.PROJECT_NAME)


def qr_svg(uri: str) -> str:
    """The URI as a QR code: a standalone SVG document drawn here, referring to nothing else."""
    buffer = io.BytesIO()
    segno.make(uri, error="m").save(buffer, kind="svg", scale=4, border=4, xmldecl=False)
    return buffer.getvalue().decode("utf-8")


# --- reading --------------------------------------------------------------------------------------


def _pending_expired(factor: MfaFactor, now: datetime) -> bool:
    return factor.confirmed_at is None and factor.created_at <= now - ENROLMENT_LIFETIME


async def has_second_factor(db: AsyncSession, user_id: uuid.UUID) -> bool:
    """Whether the user has a confirmed factor (and so must give a code to sign in)."""
    query = select(
        select(MfaFactor.id)
        .where(MfaFactor.user_id == user_id, MfaFactor.confirmed_at.is_not(None))
        .exists()
    )
    return bool((await db.execute(query)).scalar())


async def list_factors(
    db: AsyncSession, user_id: uuid.UUID, *, now: datetime | None = None
) -> list[MfaFactor]:
    """The user's factors, oldest first: confirmed ones and enrolments still open."""
    now = now or utcnow()
    query = (
        select(MfaFactor)
        .where(
            MfaFactor.user_id == user_id,
            MfaFactor.confirmed_at.is_not(None) | (MfaFactor.created_at > now - ENROLMENT_LIFETIME),
        )
        .order_by(MfaFactor.created_at, MfaFactor.id)
    )
    return list((await db.execute(query)).scalars().all())


async def recovery_codes_left(db: AsyncSession, user_id: uuid.UUID) -> int:
    query = select(func.count()).where(
        RecoveryCode.user_id == user_id, RecoveryCode.used_at.is_(None)
    )
    return int((await db.execute(query)).scalar_one())


async def _lock_factors(
    db: AsyncSession, user_id: uuid.UUID, *, confirmed_only: bool = False
) -> list[MfaFactor]:
    """The user's factors, locked until the transaction ends, as they are now (a row another
    transaction changed while this one waited is read again, not taken from the session)."""
    query = select(MfaFactor).where(MfaFactor.user_id == user_id)
    if confirmed_only:
        query = query.where(MfaFactor.confirmed_at.is_not(None))
    # One locking order for everyone: no deadlock between two changes of one user's factors.
    query = query.order_by(MfaFactor.id).with_for_update()
    result = await db.execute(query.execution_options(populate_existing=True))
    return list(result.scalars().all())


# --- the login guard ------------------------------------------------------------------------------


def guard_key(user_id: uuid.UUID) -> str:
    """What the login guard counts second-factor guesses as: apart from the password's."""
    return f"mfa:{user_id}"


async def admit_guess(
    db: AsyncSession, sec: Security, user: User, client: ClientInfo
) -> LoginDecision:
    """Ask the login guard before a code is checked (429 when refused), as for a password."""

    async def known_address() -> bool:
        since = utcnow() - timedelta(days=sec.settings.LOGIN_KNOWN_ADDRESS_DAYS)
        network = client_key(client.ip)
        return (await repository.sign_in_history(db, user.id, network, since))[1]

    decision = await sec.guard.admit(client.ip, guard_key(user.id), known_address)
    if decision.wait is not None:
        audit_line(
            audit,
            "second factor check refused",
            level=logging.WARNING,
            user=user.id,
            ip=client.ip,
            reason="rate_limited",
        )
        raise TooManyRequests(decision.wait)
    return decision


# --- checking a code ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    method: str
    reason: str  # invalid_code | replayed_code


async def verify_second_factor(
    db: AsyncSession,
    sec: Security,
    user: User,
    code: str,
    client: ClientInfo,
    *,
    now: datetime | None = None,
    sessions: async_sessionmaker[AsyncSession] | None = None,
    defer: Defer | None = None,
) -> str:
    """Check a TOTP code of any confirmed factor or an unused recovery code; return the method
    (``"otp"`` or ``"recovery_code"``).

    Counted by the login guard first (``TooManyRequests`` when it refuses). A TOTP code is
    accepted within ``TOTP_DRIFT_STEPS`` steps of ``now`` and once per step: the factor's row
    is locked and its ``last_used_step`` moved on. A recovery code is spent and
    ``user.recovery_code_used`` recorded. Flushes, does not commit: the caller commits with its
    change (the session it opens). ``SecondFactorRefused`` for anything else; with ``sessions``
    and ``defer``, the ``user.mfa_failed`` event is then recorded after the answer, in a
    transaction of its own (the caller's is not committed after a refusal).
    """
    now = now or utcnow()
    decision = await admit_guess(db, sec, user, client)
    outcome = await _check(db, sec, user, code, client, now)
    if isinstance(outcome, _Failure):
        locked_for = decision.lock_if_wrong
        audit_line(
            audit,
            "second factor failed",
            user=user.id,
            ip=client.ip,
            method=outcome.method,
            reason=outcome.reason,
            locked_for_seconds=round(locked_for) if locked_for else None,
        )
        if sessions is not None and defer is not None:
            failure = {
                "id": user.id,
                "ip": client.ip,
                "method": outcome.method,
                "reason": outcome.reason,
                "locked_for_seconds": locked_for,
            }
            # A partial, not a lambda: Starlette awaits a coroutine function (partials too).
            defer(
                functools.partial(
                    auth_service.record_event_apart,
                    sessions,
                    sec,
                    EventType.MFA_FAILED,
                    user.id,
                    failure,
                )
            )
        raise SecondFactorRefused()
    await sec.guard.succeeded(client.ip, guard_key(user.id))
    return outcome


async def _check(
    db: AsyncSession, sec: Security, user: User, code: str, client: ClientInfo, now: datetime
) -> str | _Failure:
    if len(code) > MAX_CODE_LENGTH:
        return _Failure(METHOD_RECOVERY_CODE, "invalid_code")
    digits = _totp_digits(code)
    if digits is not None:
        return await _check_totp(db, sec, user, digits, now)
    return await _spend_recovery_code(db, sec, user, code, client, now)


async def _check_totp(
    db: AsyncSession, sec: Security, user: User, digits: str, now: datetime
) -> str | _Failure:
    replayed = False
    for factor in await _lock_factors(db, user.id, confirmed_only=True):
        secret = _open_secret(sec, factor) if factor.kind == TOTP else None
        if secret is None:
            continue
        for step in _matching_steps(secret, digits, now):
            if factor.last_used_step is not None and step <= factor.last_used_step:
                replayed = True
                continue
            factor.last_used_step, factor.last_used_at = step, now
            await db.flush()
            return METHOD_OTP
    return _Failure(METHOD_OTP, "replayed_code" if replayed else "invalid_code")


async def _spend_recovery_code(
    db: AsyncSession, sec: Security, user: User, code: str, client: ClientInfo, now: datetime
) -> str | _Failure:
    normalised = normalise_recovery_code(code)
    if normalised is None:
        return _Failure(METHOD_RECOVERY_CODE, "invalid_code")
    result = await db.execute(
        update(RecoveryCode)
        .where(
            RecoveryCode.code_hash == hash_token(normalised),
            RecoveryCode.user_id == user.id,
            RecoveryCode.used_at.is_(None),
        )
        .values(used_at=now),
        execution_options={"synchronize_session": False},
    )
    if getattr(result, "rowcount", 0) != 1:
        return _Failure(METHOD_RECOVERY_CODE, "invalid_code")
    left = await recovery_codes_left(db, user.id)
    record_event(
        db,
        sec.settings,
        EventType.RECOVERY_CODE_USED,
        user.id,
        {"id": user.id, "ip": client.ip, "recovery_codes_left": left},
    )
    await db.flush()
    audit_line(audit, "recovery code used", user=user.id, ip=client.ip, left=left)
    return METHOD_RECOVERY_CODE


# --- enrolment ------------------------------------------------------------------------------------


async def start_totp_enrolment(
    db: AsyncSession,
    sec: Security,
    user: User,
    name: str | None = None,
    *,
    now: datetime | None = None,
) -> tuple[MfaFactor, str, str, str]:
    """A new, unconfirmed authenticator: (factor, secret, otpauth URI, QR code as SVG).

    The secret is shown only now; it is stored sealed. Enrolments left unconfirmed for
    ``ENROLMENT_LIFETIME`` are deleted. 409 when the account has ``MAX_FACTORS`` authenticators
    or ``MAX_PENDING_ENROLMENTS`` open enrolments. Commits."""
    now = now or utcnow()
    label = factor_name(name)
    await db.execute(
        delete(MfaFactor).where(
            MfaFactor.user_id == user.id,
            MfaFactor.kind == TOTP,
            MfaFactor.confirmed_at.is_(None),
            MfaFactor.created_at <= now - ENROLMENT_LIFETIME,
        ),
        execution_options={"synchronize_session": False},
    )
    # Concurrent starts of one user wait for each other here, so the bounds below hold.
    await db.execute(select(User.id).where(User.id == user.id).with_for_update())
    factors = await _lock_factors(db, user.id)
    if sum(f.confirmed_at is not None for f in factors) >= MAX_FACTORS:
        raise Conflict(f"An account may have {MAX_FACTORS} authenticators; remove one first.")
    pending = [f for f in factors if f.kind == TOTP and f.confirmed_at is None]
    if sum(not _pending_expired(f, now) for f in pending) >= MAX_PENDING_ENROLMENTS:
        raise Conflict("Too many enrolments are waiting for their first code; confirm one first.")
    secret = pyotp.random_base32()
    factor = MfaFactor(id=uuid.uuid4(), user_id=user.id, kind=TOTP, name=label, created_at=now)
    factor.secret = sec.sealer.seal(secret.encode("ascii"), _associated_data(factor.id))
    db.add(factor)
    await db.commit()
    uri = provisioning_uri(sec, user, secret)
    audit_line(audit, "authenticator enrolment started", user=user.id, factor=factor.id)
    return factor, secret, uri, qr_svg(uri)


def _owned(factors: Sequence[MfaFactor], factor_id: uuid.UUID, now: datetime) -> MfaFactor:
    """The user's factor with this id (among its locked rows); 404 for anything else, another
    user's factor and an expired enrolment included."""
    for factor in factors:
        if factor.id == factor_id and not _pending_expired(factor, now):
            return factor
    raise NotFound(_NO_SUCH_FACTOR)


async def confirm_totp(
    db: AsyncSession,
    sec: Security,
    user: User,
    factor_id: uuid.UUID,
    code: str,
    client: ClientInfo,
    now: datetime | None = None,
) -> tuple[MfaFactor, list[str] | None]:
    """Count an enrolment once a first code from the app is right (under the login guard).

    Records ``user.mfa_enrolled``. The account's first factor also brings its recovery codes,
    returned here once (None otherwise). 404 for no such enrolment, 409 when it is confirmed
    already, ``SecondFactorRefused`` for a wrong code. Commits."""
    now = now or utcnow()
    factors = await _lock_factors(db, user.id)
    factor = _owned(factors, factor_id, now)
    if factor.kind != TOTP:
        raise NotFound(_NO_SUCH_FACTOR)
    if factor.confirmed_at is not None:
        raise Conflict("This authenticator is confirmed already.")
    await admit_guess(db, sec, user, client)
    secret = _open_secret(sec, factor)
    digits = _totp_digits(code) if len(code) <= MAX_CODE_LENGTH else None
    steps = _matching_steps(secret, digits, now) if secret and digits else []
    if not steps:
        audit_line(audit, "authenticator confirmation failed", user=user.id, ip=client.ip)
        raise SecondFactorRefused()
    await sec.guard.succeeded(client.ip, guard_key(user.id))
    first = not any(f.confirmed_at is not None for f in factors)
    factor.confirmed_at, factor.last_used_at, factor.last_used_step = now, now, steps[-1]
    codes = await replace_recovery_codes(db, user.id, now) if first else None
    record_event(
        db,
        sec.settings,
        EventType.MFA_ENROLLED,
        user.id,
        {
            "id": user.id,
            "factor_id": factor.id,
            "kind": factor.kind,
            "name": factor.name,
            "recovery_codes_issued": len(codes) if codes else 0,
        },
    )
    await db.commit()
    audit_line(audit, "authenticator enrolled", user=user.id, factor=factor.id)
    return factor, codes


async def replace_recovery_codes(db: AsyncSession, user_id: uuid.UUID, now: datetime) -> list[str]:
    """Delete the user's recovery codes and store ``RECOVERY_CODE_COUNT`` new ones (hashed)."""
    await db.execute(
        delete(RecoveryCode).where(RecoveryCode.user_id == user_id),
        execution_options={"synchronize_session": False},
    )
    codes = [_new_recovery_code() for _ in range(RECOVERY_CODE_COUNT)]
    for code in codes:
        stored = normalise_recovery_code(code)
        assert stored is not None
        db.add(RecoveryCode(code_hash=hash_token(stored), user_id=user_id, created_at=now))
    await db.flush()
    return codes


# --- removal and new recovery codes ---------------------------------------------------------------


async def _check_password(
    db: AsyncSession, sec: Security, user: User, password: str, client: ClientInfo
) -> None:
    if not await auth_service.verify_password(db, sec, user, password, client):
        raise DomainError(_WRONG_PASSWORD)


async def remove_factor(
    db: AsyncSession,
    sec: Security,
    user: User,
    factor_id: uuid.UUID,
    *,
    password: str | None,
    code: str | None,
    client: ClientInfo,
    now: datetime | None = None,
    sessions: async_sessionmaker[AsyncSession] | None = None,
    defer: Defer | None = None,
) -> None:
    """Remove a factor, with the current password or a valid code (exactly one of them).

    Removing the last confirmed factor deletes the recovery codes too. Records
    ``user.mfa_removed`` for a confirmed factor (an open enrolment goes without one). 404 for no
    such factor, 400 for a wrong password or code, 429 when the guard refuses. Commits."""
    if (password is None) == (code is None):
        raise InvalidInput(
            "Send either current_password or code.",
            errors=[{"loc": ["body"], "msg": "exactly one of current_password and code"}],
        )
    now = now or utcnow()
    _owned(await list_factors(db, user.id, now=now), factor_id, now)
    if password is not None:
        await _check_password(db, sec, user, password, client)
        via = "password"
    else:
        assert code is not None
        via = await verify_second_factor(
            db, sec, user, code, client, now=now, sessions=sessions, defer=defer
        )
    # Locked only now (no row lock waits on an argon2 check); a concurrent removal that won
    # makes this one a 404, and then a code spent as proof is not spent either.
    factors = await _lock_factors(db, user.id)
    factor = _owned(factors, factor_id, now)
    confirmed = factor.confirmed_at is not None
    left = [f for f in factors if f.confirmed_at is not None and f.id != factor.id]
    await db.delete(factor)
    codes_deleted = 0
    if confirmed and not left:
        result = await db.execute(
            delete(RecoveryCode).where(RecoveryCode.user_id == user.id),
            execution_options={"synchronize_session": False},
        )
        codes_deleted = int(getattr(result, "rowcount", 0) or 0)
    if confirmed:
        record_event(
            db,
            sec.settings,
            EventType.MFA_REMOVED,
            user.id,
            {
                "id": user.id,
                "factor_id": factor.id,
                "kind": factor.kind,
                "name": factor.name,
                "via": via,
                "factors_left": len(left),
                "recovery_codes_deleted": codes_deleted,
            },
        )
    await db.commit()
    audit_line(audit, "authenticator removed", user=user.id, factor=factor.id, via=via)


async def regenerate_recovery_codes(
    db: AsyncSession,
    sec: Security,
    user: User,
    *,
    password: str,
    client: ClientInfo,
    now: datetime | None = None,
) -> list[str]:
    """Ten new recovery codes, with the current password; the old ones stop working.

    Records ``user.recovery_codes_regenerated``. 409 when the account has no confirmed factor
    (recovery codes stand in for one). Commits."""
    await _check_password(db, sec, user, password, client)
    now = now or utcnow()
    factors = await _lock_factors(db, user.id, confirmed_only=True)
    if not factors:
        raise Conflict("Recovery codes come with a second factor: confirm an authenticator first.")
    revoked = await recovery_codes_left(db, user.id)
    codes = await replace_recovery_codes(db, user.id, now)
    record_event(
        db,
        sec.settings,
        EventType.RECOVERY_CODES_REGENERATED,
        user.id,
        {"id": user.id, "recovery_codes_issued": len(codes), "recovery_codes_revoked": revoked},
    )
    await db.commit()
    audit_line(audit, "recovery codes regenerated", user=user.id)
    return codes


async def reset_factors(
    db: AsyncSession, sec: Security, user_id: uuid.UUID, *, actor_id: uuid.UUID
) -> None:
    """An administrator's reset for a user who lost every factor: all of them and the recovery
    codes go, and every session of the user ends (whoever holds one may be the reason)."""
    user = await repository.get_user(db, user_id)
    if user is None:
        raise NotFound("No such user.")
    factors = await db.execute(
        delete(MfaFactor).where(MfaFactor.user_id == user_id).returning(MfaFactor.id)
    )
    codes = await db.execute(
        delete(RecoveryCode)
        .where(RecoveryCode.user_id == user_id)
        .returning(RecoveryCode.code_hash)
    )
    revoked = await repository.revoke_sessions(db, user_id, utcnow(), "mfa_reset")
    removed, deleted = len(factors.all()), len(codes.all())
    record_event(
        db,
        sec.settings,
        EventType.MFA_RESET,
        user_id,
        {
            "id": user_id,
            "actor_id": actor_id,
            "factors_removed": removed,
            "recovery_codes_deleted": deleted,
            "sessions_revoked": len(revoked),
        },
    )
    await commit_change(db, sec, [user_id], revoked)
    audit_line(
        audit,
        "second factors reset",
        user=user_id,
        actor=actor_id,
        factors=removed,
        sessions=len(revoked),
    )


def must_have_second_factor(settings: Settings, user: User) -> bool:
    """Whether the policy (MFA_REQUIRED) asks this user for a second factor."""
    required = settings.MFA_REQUIRED
    return required == "everyone" or (required == "admins" and user.role == "admin")


async def missing_required_factor(db: AsyncSession, settings: Settings, user: User) -> bool:
    """The policy asks this user for a second factor, and there is none yet."""
    return must_have_second_factor(settings, user) and not await has_second_factor(db, user.id)
