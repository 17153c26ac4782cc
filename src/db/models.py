"""Every table of the service (imported by Alembic so autogenerate sees them all)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from src.db.base import Base
from src.db.types import UTCDateTime, utcnow

# BIGINT autoincrement on PostgreSQL; SQLite only auto-increments a column typed INTEGER.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")
JSONDoc = JSON().with_variant(JSONB(), "postgresql")


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint("role IN ('user', 'admin')", name="role"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    # Stored normalised (lower-case), so a plain unique index gives case-insensitive uniqueness.
    email: Mapped[str] = mapped_column(String(320), unique=True, index=True)
    full_name: Mapped[str | None] = mapped_column(String(200))
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="user", index=True)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    email_verified: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # Optimistic locking: SQLAlchemy adds "AND version = :old" to every UPDATE and bumps it.
    version: Mapped[int] = mapped_column(Integer, default=1)

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012


Index("ix_users_created_at_id", User.created_at, User.id)


class UserSession(Base):
    """One login: the refresh-token family, rotated on every refresh."""

    __tablename__ = "sessions"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    # How many times the refresh token was rotated (the current token is generation N).
    rotation_counter: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Sliding: moved forward on every refresh, never past absolute_expires_at.
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    absolute_expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_reason: Mapped[str | None] = mapped_column(String(32))
    ip_address: Mapped[str | None] = mapped_column(String(45))
    user_agent: Mapped[str | None] = mapped_column(String(512))
    # The OAuth client that signed in (``client_id``); its refresh tokens work for it alone.
    client_id: Mapped[str | None] = mapped_column(String(255))
    # Where the password was entered (an IPv4 address, or an IPv6 /64): unlike ip_address it
    # never moves with a refresh, so only a password sign-in makes an address "known".
    sign_in_network: Mapped[str | None] = mapped_column(String(45))
    # "token": a refresh-token family (API sign-in, or an OAuth client's grant); "browser": the
    # provider's own sign-in on the hosted pages, carried by a cookie whose hash is cookie_hash.
    kind: Mapped[str] = mapped_column(String(16), default="token", server_default="token")
    cookie_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    # The browser session an authorization code came from: ending it ends this one too.
    parent_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    # When and how the user authenticated (OpenID Connect auth_time and amr, e.g. "pwd").
    auth_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    amr: Mapped[str | None] = mapped_column(String(64))
    # The scopes granted to the client, space-separated (none for the service's own API).
    scope: Mapped[str | None] = mapped_column(String(1024))


# "Did the password open a session from this network lately?" (the login guard, new sign-ins).
Index("ix_sessions_user_id_sign_in_network", UserSession.user_id, UserSession.sign_in_network)


class RefreshToken(Base):
    """Every refresh token a session was given, hashed; a used one presented again is reuse."""

    __tablename__ = "refresh_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    session_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("sessions.id", ondelete="CASCADE"), index=True
    )
    generation: Mapped[int] = mapped_column(Integer)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class OneTimeToken(Base):
    """Single-use, expiring tokens sent by mail (stored hashed): password reset, email
    verification, confirming a new email address, and undoing an email change."""

    __tablename__ = "one_time_tokens"
    __table_args__ = (
        CheckConstraint(
            "purpose IN ('password_reset', 'email_verification', 'email_change', 'email_undo')",
            name="purpose",
        ),
    )

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    purpose: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The address the token is about: the new one (email_change) or the old one (email_undo).
    email: Mapped[str | None] = mapped_column(String(320))


class OutboxEvent(Base):
    """An event waiting to be published to Kafka, written in the same transaction as its change."""

    __tablename__ = "outbox"

    # Publication order: per-user order follows this sequence.
    position: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True, default=uuid.uuid4)
    topic: Mapped[str] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(64))
    aggregate_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # Notifications only: the one-time token and link, sealed (src.security.sealing) so a database
    # reader cannot use them; set to NULL once published, delivered or expired.
    sealed: Mapped[str | None] = mapped_column(Text)
    sealed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    # The W3C trace context ({"traceparent", "tracestate"}) of the request that recorded the
    # event, when tracing is on: the CloudEvent carries it, so the trace goes on past Kafka.
    trace_context: Mapped[dict[str, str] | None] = mapped_column(JSONDoc)


Index(
    "ix_outbox_unpublished",
    OutboxEvent.position,
    postgresql_where=OutboxEvent.published_at.is_(None),
    sqlite_where=OutboxEvent.published_at.is_(None),
)


class AuditEvent(Base):
    """An event as the audit consumer read it back from Kafka: stored once per event id."""

    __tablename__ = "audit_events"

    # Arrival order, used as the pagination cursor.
    position: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    type: Mapped[str] = mapped_column(String(64))
    # The user the event is about (CloudEvents "subject"); kept after the user is deleted.
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    source: Mapped[str] = mapped_column(String(255))
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    data: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    topic: Mapped[str] = mapped_column(String(255))
    partition: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)


Index("ix_audit_events_user_position", AuditEvent.user_id, AuditEvent.position)


class MailDelivery(Base):
    """One notification the courier handled, by event id: how each is mailed at most once, and
    where one that failed for now waits for its next attempt (retried out of line)."""

    __tablename__ = "mail_deliveries"
    # The retry loop asks for "pending rows of my topic due by now, earliest first".
    __table_args__ = (Index("ix_mail_deliveries_due", "status", "topic", "next_attempt_at"),)

    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    # The notifications topic the event came from: a courier retries only its own topic's mail.
    topic: Mapped[str] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(64))
    # The user the notification is about (CloudEvents "subject"), for the log lines of retries.
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    # pending (failed for now, tried again at next_attempt_at) | sent | failed (gave up after
    # MAIL_MAX_ATTEMPTS, refused for good, or not renderable) | skipped (expired, unreadable, or
    # nobody to send to)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # While pending only, NULL once finished: when to try again, and what to mail then without
    # the source record (the event's ``data``, and its one-time link still sealed, bound to the
    # event id: a database reader cannot use it).
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    sealed: Mapped[str | None] = mapped_column(Text)


class OAuthClient(Base):
    """An application that signs users in through this provider (OAuth 2.1 / OpenID Connect)."""

    __tablename__ = "oauth_clients"
    __table_args__ = (
        CheckConstraint("client_type IN ('confidential', 'public')", name="client_type"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    client_id: Mapped[str] = mapped_column(String(255), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    client_type: Mapped[str] = mapped_column(String(16))
    # SHA-256 of the secret (secrets are 256 random bits, so a slow hash adds nothing); none for
    # public clients.
    secret_hash: Mapped[str | None] = mapped_column(String(64))
    # Exact strings, compared exactly (RFC 9700 section 4.1.3); lists as JSON arrays.
    redirect_uris: Mapped[list[str]] = mapped_column(JSON, default=list)
    post_logout_redirect_uris: Mapped[list[str]] = mapped_column(JSON, default=list)
    grant_types: Mapped[list[str]] = mapped_column(JSON, default=list)
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    # The company's own application: no consent screen.
    first_party: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    version: Mapped[int] = mapped_column(Integer, default=1)

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012


class OAuthConsent(Base):
    """The scopes a user allowed a (third-party) client; revoked by the user at any time."""

    __tablename__ = "oauth_consents"

    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    client_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    # Space-separated, like an OAuth scope parameter.
    scope: Mapped[str] = mapped_column(String(1024))
    granted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AuthorizationCode(Base):
    """An authorization code (stored hashed): single use, short-lived, bound to its client,
    redirect URI and PKCE challenge."""

    __tablename__ = "authorization_codes"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(255))
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    # The browser session the user signed in with (the ID token's sid).
    browser_session_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    redirect_uri: Mapped[str] = mapped_column(Text)
    scope: Mapped[str] = mapped_column(String(1024))
    nonce: Mapped[str | None] = mapped_column(String(512))
    code_challenge: Mapped[str] = mapped_column(String(128))
    auth_time: Mapped[datetime] = mapped_column(UTCDateTime)
    amr: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The session the code was exchanged for: a replayed code ends it (RFC 6749 section 4.1.2).
    session_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)


class SigningKeyRecord(Base):
    """A token signing key. One is active; the next is published ahead of use; retired ones stay
    published until every token they signed has expired (``expires_at``)."""

    __tablename__ = "signing_keys"
    __table_args__ = (CheckConstraint("state IN ('next', 'active', 'retired')", name="state"),)

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    algorithm: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    # The PKCS#8 PEM, sealed with ENCRYPTION_KEY (src.security.sealing), bound to the kid.
    private_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Retired keys only: when the last token it signed expires; then it leaves the JWKS.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# Every instance must agree on one active key: the database refuses a second.
Index(
    "ix_signing_keys_one_active",
    SigningKeyRecord.state,
    unique=True,
    postgresql_where=SigningKeyRecord.state == "active",
    sqlite_where=SigningKeyRecord.state == "active",
)


class MfaFactor(Base):
    """A second factor of a user. TOTP today: its secret sealed with ENCRYPTION_KEY (bound to the
    factor's id), counted only once a first code confirmed it."""

    __tablename__ = "mfa_factors"
    __table_args__ = (CheckConstraint("kind IN ('totp', 'webauthn')", name="kind"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(100))
    secret: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # None until the first code proves the authenticator holds the secret.
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # TOTP: the last time step a code was accepted for; that step and earlier ones are refused
    # (each code works once, RFC 6238 section 5.2).
    last_used_step: Mapped[int | None] = mapped_column(BigInteger)
    # WebAuthn (passkeys): the credential's id (base64url), its COSE public key, the
    # authenticator's signature counter (a lower one than stored means a cloned authenticator),
    # and the transports it reported (hints for the browser).
    credential_id: Mapped[str | None] = mapped_column(String(1024), unique=True)
    public_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    sign_count: Mapped[int | None] = mapped_column(BigInteger)
    transports: Mapped[list[str] | None] = mapped_column(JSON)


class RecoveryCode(Base):
    """A single-use recovery code (stored hashed: 80 random bits make a fast hash safe)."""

    __tablename__ = "recovery_codes"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
