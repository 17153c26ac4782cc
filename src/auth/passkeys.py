"""Passkeys (WebAuthn): registering one, signing in with one alone, and one as a second factor.

The ceremonies are py_webauthn's (``webauthn``); this module feeds them plain values and keeps
the credentials as ``MfaFactor`` rows (``kind="webauthn"``): the credential id (base64url), its
COSE public key, the authenticator's signature counter and the transports it reported.

Challenges are stateless. Each ceremony's options come with a *challenge token*: the random
challenge, the purpose (``register`` or ``authenticate``), the user it is for (none for a
passwordless sign-in) and an expiry, sealed with ``ENCRYPTION_KEY`` (src.security.sealing) so
nobody can make or alter one. The browser sends it back with the credential, and the challenge
it holds is the one the credential must have signed. A token works for its one purpose and user,
for ``CHALLENGE_SECONDS``; within that time a captured assertion could be replayed together with
its token, unless the authenticator's signature counter shows it (see docs/passkeys.md).

The counter: an assertion must carry a higher count than the stored one (unless both are 0, as
synced passkeys report). A lower or equal one means a replay or a cloned authenticator, and is
refused; the stored count moves on only through a conditional UPDATE, so two assertions racing
with one count cannot both pass.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm.attributes import set_committed_value
from webauthn import (
    base64url_to_bytes,
    generate_authentication_options,
    generate_registration_options,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import bytes_to_base64url, options_to_json_dict
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from src.auth import mfa
from src.auth.context import Security
from src.auth.service import ClientInfo, record_event_apart
from src.config.logging import audit_line
from src.db.models import MfaFactor, User
from src.db.types import utcnow
from src.errors import DomainError
from src.events.outbox import EventType, record_event
from src.security.sealing import UnsealError
from src.users.service import commit_change

logger = logging.getLogger(__name__)
audit = logging.getLogger("src.auth.audit")

KIND = "webauthn"
DEFAULT_NAME = "Passkey"
REGISTER = "register"
AUTHENTICATE = "authenticate"
CHALLENGE_SECONDS = 300
CHALLENGE_BYTES = 32
# What the browser is told to wait for the person (a hint); the token outlives it.
CEREMONY_TIMEOUT_MS = 120_000
# Sealed tokens are ~200 characters; credential ids are at most 1023 bytes (WebAuthn L3).
MAX_CHALLENGE_TOKEN = 1024
MAX_CREDENTIAL_ID = 1024
MAX_TRANSPORTS = 8
# ES256, RS256 and EdDSA: what authenticators make, in the order the browser should prefer.
ALGORITHMS = [
    COSEAlgorithmIdentifier.ECDSA_SHA_256,
    COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256,
    COSEAlgorithmIdentifier.EDDSA,
]

_CHALLENGE_PURPOSE = b"webauthn-challenge"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_TRANSPORTS = frozenset(transport.value for transport in AuthenticatorTransport)

EXPIRED = "The passkey request expired or is not valid. Try again."
NOT_VERIFIED = "The passkey could not be verified."
UNKNOWN = "This passkey is not registered here."


class PasskeyError(Exception):
    """A ceremony that cannot go on; the message is safe to show to the person."""


@dataclass(frozen=True)
class Options:
    """What ``navigator.credentials.create()`` / ``.get()`` needs (WebAuthn's JSON form, the
    binary values base64url), and the challenge token to send back with the credential."""

    options: dict[str, Any]
    challenge_token: str


@dataclass(frozen=True)
class Registered:
    factor: MfaFactor
    # The account's first second factor comes with recovery codes, shown once (else None).
    recovery_codes: list[str] | None


@dataclass(frozen=True)
class Asserted:
    user: User
    factor: MfaFactor


# --- challenge tokens -----------------------------------------------------------------------------


def issue_challenge(
    sec: Security, purpose: str, user_id: uuid.UUID | None, now: datetime | None = None
) -> tuple[bytes, str]:
    """A fresh challenge and its sealed token (for ``purpose`` and ``user_id`` only)."""
    challenge = secrets.token_bytes(CHALLENGE_BYTES)
    body = {
        "c": bytes_to_base64url(challenge),
        "p": purpose,
        "u": str(user_id) if user_id is not None else None,
        "e": int((now or utcnow()).timestamp()) + CHALLENGE_SECONDS,
    }
    token = sec.sealer.seal(json.dumps(body).encode(), associated_data=_CHALLENGE_PURPOSE)
    return challenge, token


def open_challenge(
    sec: Security,
    token: object,
    purpose: str,
    user_id: uuid.UUID | None,
    now: datetime | None = None,
) -> bytes:
    """The challenge a token holds, if it is ours, unexpired, and for this purpose and user;
    ``PasskeyError`` otherwise."""
    if not isinstance(token, str) or not token or len(token) > MAX_CHALLENGE_TOKEN:
        raise PasskeyError(EXPIRED)
    try:
        body = json.loads(sec.sealer.unseal(token, _CHALLENGE_PURPOSE))
        challenge = base64url_to_bytes(str(body["c"]))
        matches = (
            body["p"] == purpose
            and body["u"] == (str(user_id) if user_id is not None else None)
            and int(body["e"]) > int((now or utcnow()).timestamp())
        )
    except (UnsealError, ValueError, KeyError, TypeError):
        raise PasskeyError(EXPIRED) from None
    if not matches or len(challenge) != CHALLENGE_BYTES:
        raise PasskeyError(EXPIRED)
    return challenge


# --- reading --------------------------------------------------------------------------------------


async def list_passkeys(db: AsyncSession, user_id: uuid.UUID) -> list[MfaFactor]:
    """The user's passkeys, oldest first."""
    query = (
        select(MfaFactor)
        .where(
            MfaFactor.user_id == user_id,
            MfaFactor.kind == KIND,
            MfaFactor.confirmed_at.is_not(None),
        )
        .order_by(MfaFactor.created_at, MfaFactor.id)
    )
    return list((await db.execute(query)).scalars().all())


def _descriptor(factor: MfaFactor) -> PublicKeyCredentialDescriptor:
    assert factor.credential_id is not None
    transports = [AuthenticatorTransport(t) for t in factor.transports or [] if t in _TRANSPORTS]
    return PublicKeyCredentialDescriptor(
        id=base64url_to_bytes(factor.credential_id), transports=transports or None
    )


def _settings_values(sec: Security) -> tuple[str, list[str]]:
    return sec.settings.webauthn_rp_id, sec.settings.webauthn_origins


# --- registration ---------------------------------------------------------------------------------


def passkey_name(name: str | None) -> str:
    """The name a passkey is listed under (``mfa.factor_name``'s rules); "Passkey" when empty."""
    if name is None or not name.strip():
        return DEFAULT_NAME
    try:
        return mfa.factor_name(name)
    except DomainError as exc:
        raise PasskeyError(exc.detail) from None


async def _confirmed_factors(db: AsyncSession, user_id: uuid.UUID) -> int:
    query = select(func.count()).where(
        MfaFactor.user_id == user_id, MfaFactor.confirmed_at.is_not(None)
    )
    return int((await db.execute(query)).scalar_one())


async def registration_options(db: AsyncSession, sec: Security, user: User) -> Options:
    """Options for a new discoverable credential (a passkey) of ``user``, with user
    verification, none of its registered ones again, and the token of the challenge."""
    if await _confirmed_factors(db, user.id) >= mfa.MAX_FACTORS:
        raise PasskeyError(
            f"An account may have {mfa.MAX_FACTORS} passkeys and authenticators; remove one first."
        )
    rp_id, _ = _settings_values(sec)
    challenge, token = issue_challenge(sec, REGISTER, user.id)
    options = generate_registration_options(
        rp_id=rp_id,
        rp_name=sec.settings.PROJECT_NAME,
        user_id=user.id.bytes,
        user_name=user.email,
        user_display_name=user.full_name or user.email,
        challenge=challenge,
        timeout=CEREMONY_TIMEOUT_MS,
        attestation=AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.REQUIRED,
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=[_descriptor(f) for f in await list_passkeys(db, user.id)],
        supported_pub_key_algs=ALGORITHMS,
    )
    return Options(options_to_json_dict(options), token)


def _transports(credential: dict[str, Any]) -> list[str]:
    response = credential.get("response")
    reported = response.get("transports") if isinstance(response, dict) else None
    if not isinstance(reported, list):
        return []
    known = [t for t in reported if isinstance(t, str) and t in _TRANSPORTS]
    return sorted(set(known))[:MAX_TRANSPORTS]


async def register_passkey(
    db: AsyncSession,
    sec: Security,
    user: User,
    name: str | None,
    credential: dict[str, Any],
    challenge_token: object,
    *,
    now: datetime | None = None,
) -> Registered:
    """Verify ``navigator.credentials.create()``'s answer against the token's challenge, this
    relying party and its origins (user verification required), and keep the passkey.

    Records ``user.mfa_enrolled``; the account's first second factor also gets its recovery
    codes. ``PasskeyError`` when anything does not verify. Commits."""
    now = now or utcnow()
    label = passkey_name(name)
    challenge = open_challenge(sec, challenge_token, REGISTER, user.id, now)
    rp_id, origins = _settings_values(sec)
    try:
        verified = verify_registration_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=rp_id,
            expected_origin=origins,
            require_user_verification=True,
            supported_pub_key_algs=ALGORITHMS,
        )
    # Whatever a hostile credential makes the parser raise, it did not verify.
    except Exception as exc:  # noqa: BLE001
        audit_line(audit, "passkey registration refused", user=user.id, reason=type(exc).__name__)
        raise PasskeyError(NOT_VERIFIED) from None
    credential_id = bytes_to_base64url(verified.credential_id)
    if len(credential_id) > MAX_CREDENTIAL_ID:
        raise PasskeyError(NOT_VERIFIED)
    taken = await db.execute(select(MfaFactor.id).where(MfaFactor.credential_id == credential_id))
    if taken.first() is not None:
        raise PasskeyError("This passkey is registered already.")
    # One registration of this user at a time (until the commit): two cannot both be the first
    # factor (two sets of recovery codes, one of them void) or both pass the limit.
    await db.execute(select(User.id).where(User.id == user.id).with_for_update())
    if await _confirmed_factors(db, user.id) >= mfa.MAX_FACTORS:
        raise PasskeyError(
            f"An account may have {mfa.MAX_FACTORS} passkeys and authenticators; remove one first."
        )
    first = not await mfa.has_second_factor(db, user.id)
    factor = MfaFactor(
        id=uuid.uuid4(),
        user_id=user.id,
        kind=KIND,
        name=label,
        created_at=now,
        confirmed_at=now,
        credential_id=credential_id,
        public_key=verified.credential_public_key,
        sign_count=verified.sign_count,
        transports=_transports(credential),
    )
    db.add(factor)
    await db.flush()
    # The same rule as for an authenticator app: the first second factor brings recovery codes,
    # or losing the passkey would lock the account (a password alone no longer signs in).
    codes = await mfa.replace_recovery_codes(db, user.id, now) if first else None
    record_event(
        db,
        sec.settings,
        EventType.MFA_ENROLLED,
        user.id,
        {
            "id": user.id,
            "factor_id": factor.id,
            "kind": KIND,
            "name": label,
            "recovery_codes_issued": len(codes) if codes else 0,
        },
    )
    try:
        await commit_change(db, sec, [user.id])
    except IntegrityError:  # the same credential registered at the same moment
        await db.rollback()
        raise PasskeyError("This passkey is registered already.") from None
    audit_line(audit, "passkey registered", user=user.id, factor=factor.id)
    return Registered(factor, codes)


# --- authentication -------------------------------------------------------------------------------


async def authentication_options(db: AsyncSession, sec: Security, user: User | None) -> Options:
    """Options for an assertion. Without a user (passwordless): any discoverable credential of
    this relying party, with user verification. With one (a second factor, after the password):
    that user's passkeys, user verification preferred."""
    allowed: list[PublicKeyCredentialDescriptor] = []
    verification = UserVerificationRequirement.REQUIRED
    if user is not None:
        allowed = [_descriptor(f) for f in await list_passkeys(db, user.id)]
        if not allowed:
            raise PasskeyError("This account has no passkey.")
        verification = UserVerificationRequirement.PREFERRED
    rp_id, _ = _settings_values(sec)
    challenge, token = issue_challenge(sec, AUTHENTICATE, user.id if user else None)
    options = generate_authentication_options(
        rp_id=rp_id,
        challenge=challenge,
        timeout=CEREMONY_TIMEOUT_MS,
        allow_credentials=allowed,
        user_verification=verification,
    )
    return Options(options_to_json_dict(options), token)


def _credential_id(credential: dict[str, Any]) -> str:
    value = credential.get("id")
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CREDENTIAL_ID:
        raise PasskeyError(UNKNOWN)
    if not _BASE64URL.fullmatch(value):
        raise PasskeyError(UNKNOWN)
    return value


def _user_handle(credential: dict[str, Any]) -> bytes | None:
    response = credential.get("response")
    handle = response.get("userHandle") if isinstance(response, dict) else None
    if handle is None or handle == "":
        return None
    if not isinstance(handle, str) or len(handle) > 128 or not _BASE64URL.fullmatch(handle):
        raise PasskeyError(NOT_VERIFIED)
    try:
        return base64url_to_bytes(handle)
    except ValueError:  # binascii.Error: a length no base64 has
        raise PasskeyError(NOT_VERIFIED) from None


async def verify_assertion(
    db: AsyncSession,
    sec: Security,
    credential: dict[str, Any],
    challenge_token: object,
    *,
    user: User | None,
    now: datetime | None = None,
) -> Asserted:
    """Verify ``navigator.credentials.get()``'s answer: a registered passkey (of ``user`` when
    given), the token's challenge, this relying party and its origins, user verification when
    passwordless, and a signature counter that moved on. Returns the (active) user and the
    passkey, its counter and last use updated (flushed, not committed: the caller's sign-in
    commits them). ``PasskeyError`` otherwise."""
    now = now or utcnow()
    challenge = open_challenge(sec, challenge_token, AUTHENTICATE, user.id if user else None, now)
    credential_id = _credential_id(credential)
    factor = (
        await db.execute(
            select(MfaFactor).where(
                MfaFactor.credential_id == credential_id,
                MfaFactor.kind == KIND,
                MfaFactor.confirmed_at.is_not(None),
            )
        )
    ).scalar_one_or_none()
    if (
        factor is None
        or factor.public_key is None
        or (user is not None and factor.user_id != user.id)
    ):
        audit_line(
            audit,
            "passkey refused",
            user=user.id if user else "-",
            reason="unknown_credential",
        )
        raise PasskeyError(UNKNOWN)
    owner = user or await db.get(User, factor.user_id)
    if owner is None or not owner.is_active:
        raise PasskeyError(UNKNOWN)
    # WebAuthn section 7.2 step 6: the user handle, when the credential gives one (it must when
    # nobody was named before the ceremony), names the credential's owner.
    handle = _user_handle(credential)
    if (handle is None and user is None) or (handle is not None and handle != owner.id.bytes):
        audit_line(audit, "passkey refused", user=owner.id, reason="user_handle")
        raise PasskeyError(NOT_VERIFIED)
    stored = factor.sign_count or 0
    rp_id, origins = _settings_values(sec)
    try:
        verified = verify_authentication_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=rp_id,
            expected_origin=origins,
            credential_public_key=factor.public_key,
            credential_current_sign_count=stored,
            require_user_verification=user is None,
        )
    except Exception as exc:  # noqa: BLE001 - whatever a hostile credential raises: refused
        reason = "sign_count" if "sign count" in str(exc) else type(exc).__name__
        audit_line(
            audit,
            "passkey refused",
            level=logging.WARNING,
            user=owner.id,
            factor=factor.id,
            reason=reason,
        )
        raise PasskeyError(NOT_VERIFIED) from None
    new_count = verified.new_sign_count
    moved_on = MfaFactor.sign_count == 0 if new_count == 0 else MfaFactor.sign_count < new_count
    result = await db.execute(
        update(MfaFactor)
        .where(MfaFactor.id == factor.id, moved_on)
        .values(sign_count=new_count, last_used_at=now),
        execution_options={"synchronize_session": False},
    )
    if getattr(result, "rowcount", 0) != 1:
        # Another assertion with this count got there first: a replay or a clone.
        audit_line(
            audit,
            "passkey refused",
            level=logging.WARNING,
            user=owner.id,
            factor=factor.id,
            reason="sign_count",
        )
        raise PasskeyError(NOT_VERIFIED)
    # The row says so already: no second UPDATE at the next flush.
    set_committed_value(factor, "sign_count", new_count)
    set_committed_value(factor, "last_used_at", now)
    audit_line(audit, "passkey verified", user=owner.id, factor=factor.id)
    return Asserted(owner, factor)


async def verify_second_factor(
    db: AsyncSession,
    sec: Security,
    user: User,
    credential: dict[str, Any],
    challenge_token: object,
    client: ClientInfo,
    *,
    sessions: async_sessionmaker[AsyncSession] | None = None,
) -> Asserted:
    """A passkey as the second step after the password: counted by the login guard exactly like
    a code (``TooManyRequests`` when it refuses), then ``verify_assertion`` for ``user``. A
    failure records ``user.mfa_failed`` (in a transaction of its own) when ``sessions`` is given."""
    decision = await mfa.admit_guess(db, sec, user, client)
    try:
        asserted = await verify_assertion(db, sec, credential, challenge_token, user=user)
    except PasskeyError:
        audit_line(audit, "second factor failed", user=user.id, ip=client.ip, method="webauthn")
        if sessions is not None:
            failure = {
                "id": user.id,
                "ip": client.ip,
                "method": "webauthn",
                "reason": "invalid_assertion",
                "locked_for_seconds": decision.lock_if_wrong,
            }
            await record_event_apart(sessions, sec, EventType.MFA_FAILED, user.id, failure)
        raise
    await sec.guard.succeeded(client.ip, mfa.guard_key(user.id))
    return asserted
