"""The signing key ring, kept in the database so that every instance signs with the same key.

A key goes *next* -> *active* -> *retired* -> gone:

- next: published in the JWKS, signs nothing. It is promoted only once it has been published for
  ``JWKS_MAX_AGE_SECONDS + SIGNING_KEY_REFRESH_SECONDS``: by then every instance has re-read the
  ring and every verifier's cached JWKS has expired, so all of them know the key before the first
  token it signs reaches them.
- active: signs. The partial unique index ``ix_signing_keys_one_active`` allows only one.
- retired: still published, until ``expires_at``, when the last token it may have signed expires.
- gone: deleted by the next rotation or ``prune_expired``.

Private keys are stored as PKCS#8 PEM sealed with ENCRYPTION_KEY (``Sealer``) and bound to their
kid, so a reader of the database cannot sign, and a sealed key copied onto another row does not
open. Docs: docs/signing-keys.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from src.auth.jwt import SigningKey, generate_signing_key
from src.config.settings import Settings
from src.db.models import SigningKeyRecord
from src.db.types import utcnow
from src.security.sealing import Sealer, UnsealError

logger = logging.getLogger(__name__)

ACTIVE = "active"
NEXT = "next"
RETIRED = "retired"
_STATE_ORDER = {ACTIVE: 0, NEXT: 1, RETIRED: 2}


class KeyRingError(Exception):
    """The key ring cannot be used as it is; the message says why, never a key."""


class RotationRefused(Exception):
    """A rotation that would sign with a key some verifiers may not know yet."""


@dataclass(frozen=True)
class KeyInfo:
    """A key as ``keys list`` shows it: everything but the key."""

    kid: str
    algorithm: str
    state: str
    created_at: datetime
    activated_at: datetime | None
    retired_at: datetime | None
    expires_at: datetime | None


@dataclass(frozen=True)
class Rotation:
    active: KeyInfo  # signs from now on (the former next key)
    next: KeyInfo  # published for the rotation after this one
    retired: KeyInfo  # the former active key, published until its expires_at


def promotion_delay(settings: Settings) -> timedelta:
    """How long a next key must have been published before it may sign."""
    return timedelta(seconds=settings.JWKS_MAX_AGE_SECONDS + settings.SIGNING_KEY_REFRESH_SECONDS)


def retirement_period(settings: Settings) -> timedelta:
    """How long a retired key stays published: the longest token lifetime, plus the clock skew
    verifiers allow, plus the time an instance that has not re-read the ring yet may go on
    signing with it."""
    minutes = max(settings.ACCESS_TOKEN_EXPIRE_MINUTES, settings.ID_TOKEN_EXPIRE_MINUTES)
    seconds = settings.JWT_LEEWAY_SECONDS + settings.SIGNING_KEY_REFRESH_SECONDS
    return timedelta(minutes=minutes, seconds=seconds)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _info(record: SigningKeyRecord) -> KeyInfo:
    return KeyInfo(
        kid=record.kid,
        algorithm=record.algorithm,
        state=record.state,
        created_at=record.created_at,
        activated_at=record.activated_at,
        retired_at=record.retired_at,
        expires_at=record.expires_at,
    )


def _new_record(sealer: Sealer, key: SigningKey, state: str, now: datetime) -> SigningKeyRecord:
    return SigningKeyRecord(
        kid=key.kid,
        algorithm=key.algorithm,
        state=state,
        private_key=sealer.seal(key.private_pem(), associated_data=key.kid.encode()),
        created_at=now,
        activated_at=now if state == ACTIVE else None,
    )


def _opens(sealer: Sealer, record: SigningKeyRecord) -> bool:
    try:
        sealer.unseal(record.private_key, associated_data=record.kid.encode())
    except UnsealError:
        return False
    return True


def _open(sealer: Sealer, record: SigningKeyRecord) -> SigningKey:
    try:
        pem = sealer.unseal(record.private_key, associated_data=record.kid.encode())
    except UnsealError:
        raise KeyRingError(
            f"signing key {record.kid} does not open with ENCRYPTION_KEY: every instance needs "
            "the key that sealed it (when changing ENCRYPTION_KEY, keep the old key listed after "
            "the new one)"
        ) from None
    try:
        key = SigningKey.from_pem(record.algorithm, pem)
    except ValueError as exc:
        raise KeyRingError(f"signing key {record.kid} is unusable: it {exc}") from None
    if key.kid != record.kid:
        raise KeyRingError(f"signing key {record.kid} holds another key ({key.kid})")
    return key


def _is_published(record: SigningKeyRecord, now: datetime) -> bool:
    if record.state == RETIRED:
        return record.expires_at is not None and record.expires_at > now
    return True


def _display_order(record: SigningKeyRecord) -> tuple[int, float]:
    # Active, next, then retired keys newest first.
    return _STATE_ORDER[record.state], -record.created_at.timestamp()


def _oldest(records: Iterable[SigningKeyRecord], state: str) -> SigningKeyRecord | None:
    return next((record for record in records if record.state == state), None)


async def _records(db: AsyncSession) -> list[SigningKeyRecord]:
    """Every key, oldest first (a handful: expired ones are deleted)."""
    query = select(SigningKeyRecord).order_by(SigningKeyRecord.created_at, SigningKeyRecord.kid)
    return list((await db.execute(query)).scalars().all())


async def _lock_ring(db: AsyncSession) -> None:
    """Make changes to the ring take turns, until this transaction ends (PostgreSQL).

    Row locks would not do: a rotation waiting for another one's rows reads them in their new
    states afterwards, but not the next key the other one inserted (it is not in the waiting
    statement's snapshot), and would promote nothing or publish a second next key. SHARE ROW
    EXCLUSIVE conflicts with itself and with every write, never with plain reads, so instances
    go on reading the ring meanwhile; PostgreSQL's statement_timeout bounds the wait. SQLite
    serialises writers itself and serves only one process (README.md).
    """
    if db.get_bind().dialect.name == "postgresql":
        await db.execute(text("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE"))


async def _delete_expired(db: AsyncSession, now: datetime) -> list[str]:
    statement = (
        delete(SigningKeyRecord)
        .where(SigningKeyRecord.state == RETIRED, SigningKeyRecord.expires_at <= now)
        .returning(SigningKeyRecord.kid)
    )
    return list((await db.execute(statement)).scalars().all())


def _complete(records: list[SigningKeyRecord], sealer: Sealer, settings: Settings) -> bool:
    states = {record.state for record in records}
    if ACTIVE not in states or NEXT not in states:
        return False
    # In production a key that does not open is load_keys' error to report, not ours to fix.
    return settings.is_production or all(_opens(sealer, record) for record in records)


async def _forget_unopenable(
    db: AsyncSession, sealer: Sealer, records: list[SigningKeyRecord]
) -> list[SigningKeyRecord]:
    """Outside production: drop keys sealed with another ENCRYPTION_KEY.

    There the encryption key is generated under DATA_DIR, so another DATA_DIR pointed at the same
    database (another checkout, a test) cannot open the ring: it starts a new ring instead of
    refusing to start. In production that would hide a misconfiguration; load_keys refuses.
    """
    kept = []
    for record in records:
        if _opens(sealer, record):
            kept.append(record)
            continue
        logger.warning(
            "Signing key %s was sealed with another ENCRYPTION_KEY: dropped (outside production "
            "only; set one ENCRYPTION_KEY for every instance sharing a database)",
            record.kid,
        )
        await db.delete(record)
    # Deletes now: the unit of work would insert the new active key before deleting the old one.
    await db.flush()
    return kept


async def ensure_keys(
    db: AsyncSession,
    sealer: Sealer,
    settings: Settings,
    seed: SigningKey,
    now: datetime | None = None,
) -> None:
    """Make the ring usable: an active key (``seed`` if there is none) and a next key.

    Every instance calls it at start-up: idempotent, and one read when nothing is missing.
    """
    now = now or utcnow()
    if _complete(await _records(db), sealer, settings):
        return
    # Generated before taking the lock, which is then held for milliseconds only.
    next_key = await asyncio.to_thread(generate_signing_key, settings.JWT_ALGORITHM)
    try:
        await _lock_ring(db)
        records = await _records(db)
        if not settings.is_production:
            records = await _forget_unopenable(db, sealer, records)
        states = {record.state for record in records}
        if ACTIVE not in states:
            db.add(_new_record(sealer, seed, ACTIVE, now))
            logger.info("The signing key ring was empty: key %s signs from now on", seed.kid)
        if NEXT not in states:
            db.add(_new_record(sealer, next_key, NEXT, now))
        await db.commit()
    except IntegrityError:
        # Another instance stored its first keys between our read and our write (where there is
        # no lock to wait for): the unique index kept theirs, and theirs will do.
        await db.rollback()
        if not _complete(await _records(db), sealer, settings):
            raise KeyRingError(
                "the first signing keys could not be stored (another instance was storing its "
                "own?): start again"
            ) from None


async def load_keys(
    db: AsyncSession,
    sealer: Sealer,
    now: datetime | None = None,
    known: Iterable[SigningKey] = (),
) -> tuple[SigningKey, list[SigningKey]]:
    """The active key and every published one (active, next, retired but not expired).

    ``known`` keys are reused rather than unsealed and parsed again (an RSA key takes ~30 ms to
    parse): a kid is the thumbprint of its key, so a known kid is the same key.
    """
    now = now or utcnow()
    known_by_kid = {key.kid: key for key in known}
    records = sorted(
        (record for record in await _records(db) if _is_published(record, now)),
        key=_display_order,
    )
    if not records or records[0].state != ACTIVE:
        raise KeyRingError("no active signing key in the database (start-up creates one)")
    published = []
    for record in records:
        key = known_by_kid.get(record.kid)
        if key is None or key.algorithm != record.algorithm:
            key = _open(sealer, record)
        published.append(key)
    return published[0], published


async def rotate(
    db: AsyncSession,
    sealer: Sealer,
    settings: Settings,
    *,
    force: bool = False,
    now: datetime | None = None,
) -> Rotation:
    """Promote the next key, retire the active one, publish a new next key, delete expired ones.

    Refused (RotationRefused) while the next key is younger than ``promotion_delay``, unless
    ``force``: then tokens it signs may be refused until verifiers fetch the JWKS again (for a
    compromised active key, that is the lesser evil).
    """
    now = now or utcnow()
    fresh = await asyncio.to_thread(generate_signing_key, settings.JWT_ALGORITHM)
    try:
        await _lock_ring(db)
        records = await _records(db)
        active, candidate = _oldest(records, ACTIVE), _oldest(records, NEXT)
        if active is None or candidate is None:
            raise KeyRingError(
                "the key ring has no active or no next key: start the service once, it creates both"
            )
        ready_at = candidate.created_at + promotion_delay(settings)
        if now < ready_at and not force:
            raise RotationRefused(
                f"the next key {candidate.kid} has been published only since "
                f"{iso(candidate.created_at)}; verifiers may not know it before {iso(ready_at)} "
                "(JWKS_MAX_AGE_SECONDS + SIGNING_KEY_REFRESH_SECONDS later). Rotate then, or "
                "now with --force if tokens it signs may be refused until verifiers fetch the "
                "JWKS again"
            )
        # Demote before promoting, each flushed on its own: the unique index allows one active
        # key at every moment, even inside a transaction.
        active.state, active.retired_at = RETIRED, now
        active.expires_at = now + retirement_period(settings)
        await db.flush()
        candidate.state, candidate.activated_at = ACTIVE, now
        await db.flush()
        upcoming = _oldest((r for r in records if r is not candidate), NEXT)
        if upcoming is None:
            upcoming = _new_record(sealer, fresh, NEXT, now)
            db.add(upcoming)
        await _delete_expired(db, now)
        # Read before the commit, which may expire the records (expire_on_commit).
        rotation = Rotation(active=_info(candidate), next=_info(upcoming), retired=_info(active))
        await db.commit()
    except Exception:
        await db.rollback()
        raise
    logger.info(
        "Signing keys rotated: %s signs, %s retired", rotation.active.kid, rotation.retired.kid
    )
    return rotation


async def list_keys(db: AsyncSession) -> list[KeyInfo]:
    """Every key in the ring (expired ones too, until pruned): active, next, retired."""
    return [_info(record) for record in sorted(await _records(db), key=_display_order)]


async def prune_expired(db: AsyncSession, now: datetime | None = None) -> list[str]:
    """Delete retired keys whose tokens have all expired; their kids."""
    try:
        deleted = await _delete_expired(db, now or utcnow())
        await db.commit()
    except Exception:
        await db.rollback()
        raise
    return deleted
