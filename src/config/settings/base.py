"""Every setting the service reads, in one place.

Names and defaults of the Redis and Kafka variables are fixed by the original specification; the
rest are described in README.md. Values come from the environment and, when present, a ``.env``
file.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=True,
        # "NAME=" in .env means "not set", so a copied .env.example keeps every default.
        env_ignore_empty=True,
    )

    # --- service -------------------------------------------------------------------------------
    ENVIRONMENT: Environment = Environment.DEVELOPMENT
    PROJECT_NAME: str = "User Management Service"
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # How each log line is written: json (one object per line, for a log collector), text (for
    # a person at a terminal), or auto: json in production, text otherwise.
    LOG_FORMAT: Literal["auto", "json", "text"] = "auto"
    # A warning or error repeated (same place, same message) within this many seconds is written
    # once, then once more with the count when the interval is over: an outage or an overload
    # is a few lines, not one per request. 0 writes every line.
    LOG_REPEAT_INTERVAL_SECONDS: float = Field(default=10.0, ge=0, le=3600)
    # OpenTelemetry tracing (docs/tracing.md): spans for requests, SQL, Redis and Kafka, exported
    # over OTLP/HTTP, and each event's trace context in its CloudEvent (traceparent). Needs the
    # extra: pip install 'user-management-service[tracing]'; without it start-up stops and says
    # so. The SDK reads its own variables, from the process environment only (not from .env):
    # OTEL_EXPORTER_OTLP_ENDPOINT (http://localhost:4318), OTEL_SERVICE_NAME
    # (user-management-service), OTEL_TRACES_SAMPLER, OTEL_RESOURCE_ATTRIBUTES and the rest.
    TRACING_ENABLED: bool = False
    DATA_DIR: Path = Path("./data")
    # Server processes: `user-service serve` (the container's entry point) starts this many;
    # uvicorn run by hand reads it from the environment (not from .env) as its --workers default.
    # The password hashing threads are shared out among them.
    WEB_CONCURRENCY: int = Field(default=1, ge=1, le=64)
    # Where `user-service serve` listens (its --host and --port override them): the loopback
    # interface by default, so a development server is not reachable from the network; a
    # container sets 0.0.0.0.
    HOST: str = Field(default="127.0.0.1", min_length=1)
    # The TCP port `user-service serve` listens on.
    PORT: int = Field(default=8000, ge=1, le=65535)
    # Requests one process serves at once; beyond it a request is answered 503 with Retry-After
    # at once, before any work, so those admitted keep their latency. Health probes are never
    # refused. 0 turns the cap off.
    MAX_REQUESTS_IN_FLIGHT: int = Field(default=100, ge=0, le=100_000)

    # --- database ------------------------------------------------------------------------------
    DATABASE_URL: str = "sqlite+aiosqlite:///./data/app.db"
    DATABASE_POOL_SIZE: int = Field(default=10, ge=1, le=1000)
    DATABASE_MAX_OVERFLOW: int = Field(default=10, ge=0, le=1000)
    # Seconds a request waits for a pooled connection before it gets a 503 (fail fast, no pile-up).
    DATABASE_POOL_TIMEOUT: float = Field(default=2.0, gt=0, le=60)
    # Every other wait on the database is bounded too, so a server that refuses or goes silent
    # (packets dropped, nobody answering) costs a request a 503 within seconds, never a hang.
    # Seconds each, default in brackets. Opening a connection (TCP, TLS, authentication) [2.0]:
    DATABASE_CONNECT_TIMEOUT: float = Field(default=2.0, gt=0, le=60)
    # Closing a request's session, i.e. rolling back what it left open and returning the
    # connection; past it, or on failure, the connection is discarded and the answer goes out
    # regardless [1.0]:
    DATABASE_CLOSE_TIMEOUT: float = Field(default=1.0, gt=0, le=60)
    # PostgreSQL only from here. The check a pooled connection passes before each use; one that
    # fails it is dropped and replaced once, so a restart or a forgotten flow goes unseen [1.0]:
    DATABASE_PING_TIMEOUT: float = Field(default=1.0, gt=0, le=60)
    # Any one reply (a statement, BEGIN, COMMIT, ROLLBACK); past it the connection is given up as
    # lost and closed [2.0]:
    DATABASE_COMMAND_TIMEOUT: float = Field(default=2.0, gt=0, le=3600)
    # PostgreSQL's own statement_timeout: the server cancels a longer statement and the connection
    # lives on. Keep it below DATABASE_COMMAND_TIMEOUT, so that a slow statement is the server's
    # to cancel. 0 turns it off. Not sent with DATABASE_PGBOUNCER (PgBouncer refuses it as a
    # start-up parameter): set it on the database role instead [1.5]:
    DATABASE_STATEMENT_TIMEOUT: float = Field(default=1.5, ge=0, le=3600)
    # True when DATABASE_URL points at PgBouncer in transaction (or statement) pool mode, which
    # hands each transaction to whichever server connection is free: a statement prepared on one
    # is missing on the next, or its name already taken. Then no prepared statement is cached and
    # each gets a unique name, and statement_timeout is not sent (PgBouncer refuses it as a
    # start-up parameter): set it on the role instead (docs/deploy.md). Session pool mode needs
    # none of this.
    DATABASE_PGBOUNCER: bool = False

    # --- Redis (names and defaults from the specification) --------------------------------------
    REDIS_ENABLED: bool = True
    REDIS_HOST: str = "localhost"
    REDIS_PORT: int = Field(default=6379, ge=1, le=65535)
    REDIS_DB: int = Field(default=0, ge=0)
    REDIS_PASSWORD: SecretStr | None = None
    REDIS_SSL: bool = False
    # One URL instead of the five above: redis://[:password@]host:port/db, rediss:// for TLS,
    # unix:///path/redis.sock?db=N. When set it wins over REDIS_HOST, REDIS_PORT, REDIS_DB and
    # REDIS_SSL (REDIS_PASSWORD applies when the URL has none). A secret: logs and health
    # details show where it points, never its password.
    REDIS_URL: SecretStr | None = None
    # Redis Sentinel instead: the sentinels (comma-separated host:port) are asked where the
    # master REDIS_SENTINEL_MASTER is, and asked again after a failover, so the client follows
    # the promoted master. REDIS_DB, REDIS_PASSWORD and REDIS_SSL apply to the master (the
    # sentinels are reached without a password). Cannot be combined with REDIS_URL.
    REDIS_SENTINELS: str | None = None
    # The master's name, as in the sentinels' own "sentinel monitor NAME host port quorum".
    REDIS_SENTINEL_MASTER: str = Field(default="mymaster", min_length=1)
    REDIS_CONNECT_TIMEOUT: float = Field(default=0.5, gt=0, le=30)
    REDIS_SOCKET_TIMEOUT: float = Field(default=0.5, gt=0, le=30)
    # A cache should give up quickly: a couple of retries, then fall back to the database.
    REDIS_RETRIES: int = Field(default=2, ge=0, le=10)
    REDIS_HEALTH_CHECK_INTERVAL: int = Field(default=15, ge=0)
    REDIS_MAX_CONNECTIONS: int = Field(default=100, ge=1)

    # --- Kafka (names and defaults from the specification) --------------------------------------
    KAFKA_ENABLED: bool = True
    KAFKA_BOOTSTRAP_SERVERS: str = "localhost:9092"
    KAFKA_GROUP_ID: str = "user_service_group"
    KAFKA_AUTO_OFFSET_RESET: Literal["earliest", "latest", "none"] = "latest"
    KAFKA_ENABLE_AUTO_COMMIT: bool = True
    KAFKA_SESSION_TIMEOUT_MS: int = Field(default=30000, gt=0)
    KAFKA_REQUEST_TIMEOUT_MS: int = Field(default=40000, gt=0)
    KAFKA_RETRY_BACKOFF_MS: int = Field(default=100, ge=0)
    # On for production; the tansu test broker lacks InitProducerId, so the tests turn it off.
    KAFKA_ENABLE_IDEMPOTENCE: bool = True
    KAFKA_CLIENT_ID: str = "user-management-service"
    KAFKA_USER_EVENTS_TOPIC: str = "user-events"
    KAFKA_NOTIFICATIONS_TOPIC: str = "user-notifications"
    # Bound on producer start-up and on every send/stop, so a silent broker never stalls us.
    KAFKA_CONNECT_TIMEOUT: float = Field(default=1.5, gt=0, le=60)
    KAFKA_SECURITY_PROTOCOL: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    KAFKA_SASL_MECHANISM: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    KAFKA_SASL_USERNAME: str | None = None
    KAFKA_SASL_PASSWORD: SecretStr | None = None
    KAFKA_SSL_CAFILE: Path | None = None

    # --- accounts and tokens --------------------------------------------------------------------
    # Public URL of the service: the OpenID Connect issuer, and where mailed links (reset,
    # verification) point, never the request's Host header.
    PUBLIC_BASE_URL: str = "http://localhost:8000"
    FIRST_ADMIN_EMAIL: str | None = None
    FIRST_ADMIN_PASSWORD: SecretStr | None = None
    JWT_ALGORITHM: Literal["RS256", "ES256", "EdDSA"] = "RS256"
    # Signing keys live in the database, sealed with ENCRYPTION_KEY (docs/signing-keys.md). A key
    # given here (PEM text, or a file) is imported as the first key of an empty key ring; without
    # one a key is generated (in development, the one kept under DATA_DIR).
    JWT_PRIVATE_KEY: SecretStr | None = None
    JWT_PRIVATE_KEY_FILE: Path | None = None
    # The iss claim of access tokens; None means the issuer URL (PUBLIC_BASE_URL).
    JWT_ISSUER: str | None = None
    JWT_AUDIENCE: str = "user-management-service"
    ACCESS_TOKEN_EXPIRE_MINUTES: int = Field(default=15, ge=1, le=1440)
    # Clock skew tolerated when checking a token's exp and iat (seconds).
    JWT_LEEWAY_SECONDS: int = Field(default=5, ge=0, le=300)
    # A refresh token expires when unused for this long; its session ends after the absolute limit.
    REFRESH_TOKEN_EXPIRE_DAYS: int = Field(default=14, ge=1, le=365)
    SESSION_MAX_LIFETIME_DAYS: int = Field(default=90, ge=1, le=3650)
    PASSWORD_RESET_TOKEN_EXPIRE_MINUTES: int = Field(default=30, ge=1, le=1440)
    EMAIL_VERIFICATION_TOKEN_EXPIRE_HOURS: int = Field(default=48, ge=1, le=720)
    # A link to confirm a new email address, and the old address's link to undo the change.
    EMAIL_CHANGE_TOKEN_EXPIRE_HOURS: int = Field(default=24, ge=1, le=720)
    EMAIL_CHANGE_UNDO_EXPIRE_HOURS: int = Field(default=72, ge=1, le=2160)
    # Refuse addresses mixing scripts (Latin with Cyrillic, ...) or holding invisible or
    # compatibility characters: the usual material of look-alike accounts.
    EMAIL_REFUSE_CONFUSABLE: bool = True
    # A sign-in from an address without a recent sign-in to the account mails a notice.
    NOTIFY_NEW_SIGN_IN: bool = True

    # --- OpenID Connect provider -----------------------------------------------------------------
    # The issuer of ID tokens is PUBLIC_BASE_URL (without a trailing slash): discovery lives at
    # {PUBLIC_BASE_URL}/.well-known/openid-configuration.
    # The password grant (RFC 6749 section 4.3), which OAuth 2.1 drops: on by default for the
    # service's own API and first-party clients that enable it; off here turns it off for all.
    PASSWORD_GRANT_ENABLED: bool = True
    # Sign-up on the hosted pages and POST /auth/register; off for invitation-only services.
    SELF_REGISTRATION_ENABLED: bool = True
    # Authorization codes are single use and live at most this long (OAuth 2.1: short).
    AUTHORIZATION_CODE_LIFETIME_SECONDS: int = Field(default=60, ge=5, le=60)
    ID_TOKEN_EXPIRE_MINUTES: int = Field(default=15, ge=1, le=1440)
    # Signing keys live in the database (private parts sealed with ENCRYPTION_KEY); every
    # instance re-reads them this often, so all agree on the active key within this bound.
    SIGNING_KEY_REFRESH_SECONDS: float = Field(default=60.0, gt=0, le=3600)
    # How long verifiers may cache /.well-known/jwks.json. A key is published this long plus
    # SIGNING_KEY_REFRESH_SECONDS before it signs anything (``keys rotate`` waits for it).
    JWKS_MAX_AGE_SECONDS: int = Field(default=300, ge=0, le=86400)

    # --- second factors ----------------------------------------------------------------------
    # Step-up: changing the email or password, removing a factor, deleting the account and every
    # administrator's write need an authentication at most this old (seconds), with a second
    # factor when the user has one; otherwise 401 with error="insufficient_user_authentication".
    STEP_UP_MAX_AGE_SECONDS: int = Field(default=600, ge=30, le=86400)
    # Who must have a second factor: nobody (off), administrators, or everyone. A user who must
    # and has none is sent to set one up at the next sign-in on the hosted pages; the password
    # grant refuses them (error "mfa_enrollment_required") until they have.
    MFA_REQUIRED: Literal["off", "admins", "everyone"] = "off"
    # Passkeys (WebAuthn): the relying party id (a registrable domain; passkeys work on it and
    # its subdomains) and the origins allowed to use them, comma-separated. Both default to
    # PUBLIC_BASE_URL's host and origin.
    WEBAUTHN_RP_ID: str | None = None
    WEBAUTHN_ORIGINS: str | None = None

    # --- secrets at rest ------------------------------------------------------------------------
    # AES-256-GCM keys (base64url of 32 bytes), comma-separated: the first encrypts, all decrypt
    # (rotation). They seal one-time tokens on their way to the mail sender. Required in
    # production; in development one is generated once and kept under DATA_DIR.
    ENCRYPTION_KEY: SecretStr | None = None

    # --- passwords (OWASP: argon2id, m=19 MiB, t=2, p=1) ----------------------------------------
    ARGON2_TIME_COST: int = Field(default=2, ge=1, le=20)
    ARGON2_MEMORY_COST: int = Field(default=19456, ge=8192, le=4_194_304)
    ARGON2_PARALLELISM: int = Field(default=1, ge=1, le=16)
    # Threads that hash passwords off the event loop; 0 means the cores shared out among the
    # WEB_CONCURRENCY processes (at least one each).
    PASSWORD_HASH_WORKERS: int = Field(default=0, ge=0, le=256)

    # --- brute-force protection -----------------------------------------------------------------
    # Every password attempt from one client address (IPv6: its /64), in a sliding window.
    LOGIN_RATE_LIMIT_WINDOW_SECONDS: int = Field(default=60, ge=1, le=86400)
    LOGIN_RATE_LIMIT_PER_IP: int = Field(default=30, ge=1)
    # Hard lock-out, per (account, client address) only, so nobody can lock a user out from
    # elsewhere: after this many consecutive failures that address is locked out of that account
    # for LOCKOUT_WAIT_INCREMENT_SECONDS, growing with each further failure up to
    # LOCKOUT_MAX_WAIT_SECONDS; failures are forgotten after LOCKOUT_FAILURE_RESET_SECONDS
    # without one. Attempts are counted before the password is checked.
    LOCKOUT_FAILURE_THRESHOLD: int = Field(default=5, ge=1)
    LOCKOUT_WAIT_INCREMENT_SECONDS: int = Field(default=60, ge=1)
    LOCKOUT_MAX_WAIT_SECONDS: int = Field(default=900, ge=1)
    LOCKOUT_FAILURE_RESET_SECONDS: int = Field(default=43200, ge=1)
    # Per account, from all addresses together: past this many consecutive failures, attempts
    # from addresses without a recent successful sign-in to the account are spaced out (a gentle
    # delay growing by LOCKOUT_ACCOUNT_DELAY_SECONDS per further failure, at most
    # LOCKOUT_ACCOUNT_MAX_DELAY_SECONDS). Addresses with a sign-in in the last
    # LOGIN_KNOWN_ADDRESS_DAYS are never slowed by failures elsewhere.
    LOCKOUT_ACCOUNT_THRESHOLD: int = Field(default=20, ge=1)
    LOCKOUT_ACCOUNT_DELAY_SECONDS: int = Field(default=5, ge=1)
    LOCKOUT_ACCOUNT_MAX_DELAY_SECONDS: int = Field(default=60, ge=1)
    LOGIN_KNOWN_ADDRESS_DAYS: int = Field(default=30, ge=1, le=365)

    # --- throttles on requests that send mail or create accounts ---------------------------------
    # Registration, password-reset, verification and email-change requests, per client address
    # and per target email address, in a sliding window. Mail requests over a limit still get
    # their usual 202 (and send nothing); registration gets 429.
    MAIL_RATE_LIMIT_WINDOW_SECONDS: int = Field(default=3600, ge=1, le=86400)
    MAIL_RATE_LIMIT_PER_IP: int = Field(default=30, ge=1)
    MAIL_RATE_LIMIT_PER_ADDRESS: int = Field(default=3, ge=1)

    # --- mail (the courier sends notifications over SMTP) ---------------------------------------
    # No SMTP_HOST: no mail is sent, notifications wait (in Kafka, or in the outbox).
    SMTP_HOST: str | None = None
    SMTP_PORT: int = Field(default=587, ge=1, le=65535)
    # starttls (upgrade a plain connection, port 587), tls (TLS from the start, port 465), none.
    SMTP_SECURITY: Literal["starttls", "tls", "none"] = "starttls"
    SMTP_USERNAME: str | None = None
    SMTP_PASSWORD: SecretStr | None = None
    SMTP_TIMEOUT: float = Field(default=10.0, gt=0, le=300)
    # A CA bundle to verify the SMTP server with (the system's by default).
    SMTP_CA_FILE: Path | None = None
    MAIL_FROM: str = "User Management Service <no-reply@localhost>"
    # Run the courier inside the API process (small set-ups); off when it runs on its own
    # (``python -m src.mail``).
    MAIL_COURIER_IN_PROCESS: bool = True
    # Run the outbox relay inside each API process; false when the relay runs as its own process
    # (``python -m src.events.relay``), scaled apart from the API. The audit consumer is not
    # affected: it shares its partitions out among the API processes either way.
    OUTBOX_RELAY_IN_PROCESS: bool = True
    # Consumer group of the courier on KAFKA_NOTIFICATIONS_TOPIC.
    MAIL_COURIER_GROUP_ID: str = "user_service_courier"
    # A notification that keeps failing is given up after this many attempts (logged, in health).
    MAIL_MAX_ATTEMPTS: int = Field(default=8, ge=1, le=100)
    MAIL_RETRY_BACKOFF_INITIAL: float = Field(default=1.0, gt=0, le=3600)
    MAIL_RETRY_BACKOFF_MAX: float = Field(default=300.0, gt=0, le=86400)

    # --- caching and requests ------------------------------------------------------------------
    CACHE_TTL_SECONDS: int = Field(default=300, ge=1, le=86400)
    # How long a cached "this session is active" may be believed before the database is asked
    # again: the bound on how late another instance honours a logout, a password change or a
    # deactivation when this instance could not reach Redis to drop its copy.
    AUTH_CACHE_MAX_AGE_SECONDS: float = Field(default=1.0, gt=0, le=300)
    MAX_REQUEST_BODY_BYTES: int = Field(default=65536, ge=1024)
    # All request headers together (names and values); more gets 431 before any work.
    MAX_REQUEST_HEADER_BYTES: int = Field(default=16384, ge=1024, le=1_048_576)
    # Proxies (IP addresses or CIDR networks, comma-separated) whose X-Forwarded-For / Forwarded
    # header names the client. None by default: the peer address is the client.
    TRUSTED_PROXIES: str | None = None
    # The header those proxies write (the other one is ignored: a proxy passes it on untouched).
    FORWARDED_HEADER: Literal["X-Forwarded-For", "Forwarded"] = "X-Forwarded-For"
    # Origins (scheme://host[:port], comma-separated, exact) allowed to call the API from a
    # browser. None by default: CORS is off.
    CORS_ALLOW_ORIGINS: str | None = None
    # A bearer token that shows operators the details of /api/v1/health* (errors, latencies,
    # backlog); an administrator's access token does too. Anonymous callers see statuses only.
    HEALTH_DETAILS_TOKEN: SecretStr | None = None

    # --- events (transactional outbox -> Kafka -> audit log) -------------------------------------
    # CloudEvents "source" of every event this service publishes.
    EVENT_SOURCE: str = "/user-management-service"
    OUTBOX_BATCH_SIZE: int = Field(default=200, ge=1, le=10000)
    # The relay wakes at once after a commit in this process; this is the fallback poll (seconds).
    OUTBOX_POLL_INTERVAL: float = Field(default=1.0, gt=0, le=300)
    # Published rows are deleted after this many hours.
    OUTBOX_RETENTION_HOURS: int = Field(default=168, ge=1)
    # When the oldest unpublished event is older than this, /health/kafka reports unhealthy.
    OUTBOX_LAG_THRESHOLD_SECONDS: int = Field(default=300, ge=1)
    AUDIT_CONSUMER_ENABLED: bool = True

    # --- health and reconnection ---------------------------------------------------------------
    # Each live check (PING, metadata request, SELECT 1) is cut off after this many seconds.
    HEALTH_CHECK_TIMEOUT: float = Field(default=0.8, gt=0, lt=1)
    # How often the supervisor probes a dependency that is up, so a loss is noticed within seconds.
    SUPERVISOR_INTERVAL: float = Field(default=2.0, gt=0, le=300)
    # Backoff between reconnect attempts to a dependency that is down (doubles up to the maximum).
    RECONNECT_BACKOFF_INITIAL: float = Field(default=0.5, gt=0, le=300)
    # Kept short: after a long outage, recovery should not wait out a long last backoff.
    RECONNECT_BACKOFF_MAX: float = Field(default=5.0, gt=0, le=3600)

    # --- metrics (Prometheus, docs/metrics.md) -------------------------------------------------
    # Who may read GET /metrics: off (no metrics endpoint, a 404 like any unknown path), open
    # (anyone who reaches the port), or token (a bearer METRICS_TOKEN). Off by default: metrics
    # tell an outsider the traffic, the error rates and the backlog, so exposing them is a choice.
    # With several server processes set PROMETHEUS_MULTIPROC_DIR to an empty directory (created
    # and emptied before the processes start), so one scrape counts all of them.
    METRICS: Literal["off", "open", "token"] = "off"
    # The bearer token of METRICS=token (required then; at least 32 characters, only ASCII
    # letters, digits and - . _ ~ + / =, e.g. `openssl rand -hex 32`), compared in constant time.
    METRICS_TOKEN: SecretStr | None = Field(default=None, validate_default=True)
    # 0 serves /metrics on the main port; another port serves it there only, on a small server of
    # its own bound to METRICS_HOST, so it can be kept off the public listener.
    METRICS_PORT: int = Field(default=0, ge=0, le=65535)
    # The address the separate metrics server (METRICS_PORT) listens on; give it the host the
    # service itself is bound to.
    METRICS_HOST: str = "127.0.0.1"

    # --- development stack (`make run`, README "Development stack") ----------------------------
    # What `make run` (python -m src.dev) starts next to the service with ENVIRONMENT=development:
    # auto starts, on free loopback ports, each server the settings leave at its default (a
    # Kafka-protocol broker while KAFKA_BOOTSTRAP_SERVERS is, Redis while REDIS_HOST, REDIS_PORT,
    # REDIS_URL and REDIS_SENTINELS are, a mail catcher while SMTP_HOST is unset; disabled ones
    # never) and stops them with the service; off starts nothing. Never anything outside
    # development.
    DEV_STACK: Literal["auto", "off"] = "auto"
    # The folder the development mail catcher writes each mail it receives to; when set (and
    # only with ENVIRONMENT=development) the service shows those mails at /dev/mail. `make run`
    # sets it to DATA_DIR/dev/mail when it starts the catcher.
    DEV_MAIL_DIR: Path | None = None

    @field_validator("METRICS_TOKEN")
    @classmethod
    def _metrics_token(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if info.data.get("METRICS") == "token" and value is None:
            raise ValueError("required when METRICS=token")
        # Guessable by brute force when short, like any other bearer secret.
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters long")
        # What a scraper can send after "Bearer " (RFC 6750 b64token). Anything else (a line end
        # a secret file left, a space, a non-ASCII letter) would make every scrape a 401.
        if value is not None and not all(
            char.isascii() and (char.isalnum() or char in "-._~+/=")
            for char in value.get_secret_value()
        ):
            raise ValueError("may hold only ASCII letters, digits and - . _ ~ + / =")
        return value

    @field_validator("KAFKA_BOOTSTRAP_SERVERS")
    @classmethod
    def _bootstrap_servers(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers or any(":" not in s for s in servers):
            raise ValueError("expected a comma-separated list of host:port")
        return ",".join(servers)

    @field_validator("REDIS_URL")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        # The message never repeats the URL: it may hold a password.
        parsed = urlsplit(value.get_secret_value())
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        if parsed.scheme != "unix" and not parsed.hostname:
            raise ValueError("expected a host, as in redis://host:6379/0")
        if parsed.scheme == "unix" and not parsed.path:
            raise ValueError("expected a socket path, as in unix:///run/redis.sock")
        try:
            parsed.port  # noqa: B018 - raises on a port that is not a number in range
        except ValueError:
            raise ValueError("the port is not a number between 1 and 65535") from None
        return value

    @field_validator("REDIS_SENTINELS")
    @classmethod
    def _redis_sentinels(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        sentinels = _split(value)
        if not sentinels:
            raise ValueError("expected a comma-separated list of host:port")
        for item in sentinels:
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"{item!r} is not host:port")
        if info.data.get("REDIS_URL") is not None:
            raise ValueError("set either REDIS_URL or REDIS_SENTINELS, not both")
        return ",".join(sentinels)

    @field_validator("DATABASE_URL")
    @classmethod
    def _database_url(cls, value: str) -> str:
        # Accept the plain forms people paste and pick the async driver for them.
        for plain, async_form in (
            ("postgresql://", "postgresql+asyncpg://"),
            ("postgres://", "postgresql+asyncpg://"),
            ("sqlite://", "sqlite+aiosqlite://"),
        ):
            if value.startswith(plain):
                return async_form + value[len(plain) :]
        if not value.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise ValueError("expected a postgresql:// or sqlite:// URL")
        return value

    @field_validator("PUBLIC_BASE_URL")
    @classmethod
    def _public_base_url(cls, value: str) -> str:
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("expected an http:// or https:// URL")
        if parsed.query or parsed.fragment:
            # It is the OpenID Connect issuer, which must have neither.
            raise ValueError("must not have a query or a fragment")
        return value

    @field_validator("TRUSTED_PROXIES")
    @classmethod
    def _trusted_proxies(cls, value: str | None) -> str | None:
        for item in _split(value):
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value

    @field_validator("CORS_ALLOW_ORIGINS")
    @classmethod
    def _cors_origins(cls, value: str | None) -> str | None:
        for origin in _split(value):
            parsed = urlsplit(origin)
            exact = parsed.scheme in ("http", "https") and parsed.netloc and not parsed.path
            if not exact or "*" in origin:
                raise ValueError(f"{origin!r} is not an exact origin like https://app.example.com")
        return value

    @cached_property
    def trusted_proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(item, strict=False) for item in _split(self.TRUSTED_PROXIES)]

    @property
    def cors_origins(self) -> list[str]:
        return [origin.rstrip("/") for origin in _split(self.CORS_ALLOW_ORIGINS)]

    @property
    def issuer(self) -> str:
        """The OpenID Connect issuer: the public URL, exactly as discovery and ID tokens say."""
        return self.PUBLIC_BASE_URL.rstrip("/")

    @property
    def access_token_issuer(self) -> str:
        """The ``iss`` of access tokens: JWT_ISSUER when set, else the issuer URL."""
        return self.JWT_ISSUER or self.issuer

    @property
    def webauthn_rp_id(self) -> str:
        return self.WEBAUTHN_RP_ID or (urlsplit(self.PUBLIC_BASE_URL).hostname or "localhost")

    @property
    def webauthn_origins(self) -> list[str]:
        parts = urlsplit(self.PUBLIC_BASE_URL)
        return _split(self.WEBAUTHN_ORIGINS) or [f"{parts.scheme}://{parts.netloc}"]

    @property
    def secure_cookies(self) -> bool:
        """Cookies are ``Secure`` everywhere but a development set-up on plain http."""
        return self.PUBLIC_BASE_URL.lower().startswith("https://") or self.is_production

    @property
    def mail_enabled(self) -> bool:
        return bool(self.SMTP_HOST)

    @property
    def is_production(self) -> bool:
        return self.ENVIRONMENT is Environment.PRODUCTION

    @property
    def kafka_bootstrap_list(self) -> list[str]:
        return self.KAFKA_BOOTSTRAP_SERVERS.split(",")


def _split(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


class SettingsError(SystemExit):
    """Raised when the configuration is invalid: exits with one readable line per bad variable."""


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's report into short lines that name each bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]) or "settings"
            lines.append(f"Invalid configuration: {name}: {error['msg']}")
        raise SettingsError("\n".join(lines)) from None
