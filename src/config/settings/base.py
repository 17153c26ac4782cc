"""Every setting the service reads, in one place.

Names and defaults of the Redis and Kafka variables are fixed by the original specification; the
rest follow DESIGN.md. Values come from the environment and, when present, a ``.env`` file.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
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
    DATA_DIR: Path = Path("./data")

    # --- database ------------------------------------------------------------------------------
    DATABASE_URL: str = "sqlite+aiosqlite:///./data/app.db"
    DATABASE_POOL_SIZE: int = Field(default=10, ge=1, le=1000)
    DATABASE_MAX_OVERFLOW: int = Field(default=10, ge=0, le=1000)
    # Seconds a request waits for a pooled connection before it gets a 503 (fail fast, no pile-up).
    DATABASE_POOL_TIMEOUT: float = Field(default=2.0, gt=0, le=60)
    DATABASE_CONNECT_TIMEOUT: float = Field(default=3.0, gt=0, le=60)

    # --- Redis (names and defaults from the specification) --------------------------------------
    REDIS_ENABLED: bool = True
    REDIS_HOST: str = "localhost"
    REDIS_PORT: int = Field(default=6379, ge=1, le=65535)
    REDIS_DB: int = Field(default=0, ge=0)
    REDIS_PASSWORD: SecretStr | None = None
    REDIS_SSL: bool = False
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
    # Public base URL of the service or its front end: reset and verification links start here,
    # never from the request's Host header.
    PUBLIC_BASE_URL: str = "http://localhost:8000"
    FIRST_ADMIN_EMAIL: str | None = None
    FIRST_ADMIN_PASSWORD: SecretStr | None = None
    JWT_ALGORITHM: Literal["RS256", "ES256", "EdDSA"] = "RS256"
    # PEM text of the signing key, or a file holding it; required in production. In development a
    # key is generated once and kept under DATA_DIR.
    JWT_PRIVATE_KEY: SecretStr | None = None
    JWT_PRIVATE_KEY_FILE: Path | None = None
    JWT_ISSUER: str = "user-management-service"
    JWT_AUDIENCE: str = "user-management-service"
    ACCESS_TOKEN_EXPIRE_MINUTES: int = Field(default=15, ge=1, le=1440)
    # A refresh token expires when unused for this long; its session ends after the absolute limit.
    REFRESH_TOKEN_EXPIRE_DAYS: int = Field(default=14, ge=1, le=365)
    SESSION_MAX_LIFETIME_DAYS: int = Field(default=90, ge=1, le=3650)
    PASSWORD_RESET_TOKEN_EXPIRE_MINUTES: int = Field(default=30, ge=1, le=1440)
    EMAIL_VERIFICATION_TOKEN_EXPIRE_HOURS: int = Field(default=48, ge=1, le=720)

    # --- passwords (OWASP: argon2id, m=19 MiB, t=2, p=1) ----------------------------------------
    ARGON2_TIME_COST: int = Field(default=2, ge=1, le=20)
    ARGON2_MEMORY_COST: int = Field(default=19456, ge=8192, le=4_194_304)
    ARGON2_PARALLELISM: int = Field(default=1, ge=1, le=16)
    # Threads that hash passwords off the event loop; 0 means one per core.
    PASSWORD_HASH_WORKERS: int = Field(default=0, ge=0, le=256)

    # --- brute-force protection (Keycloak-style escalating lock-out) -----------------------------
    LOGIN_RATE_LIMIT_WINDOW_SECONDS: int = Field(default=60, ge=1, le=86400)
    LOGIN_RATE_LIMIT_PER_IP: int = Field(default=30, ge=1)
    LOGIN_RATE_LIMIT_PER_ACCOUNT: int = Field(default=10, ge=1)
    # After this many consecutive failures an account is locked for LOCKOUT_WAIT_INCREMENT_SECONDS,
    # growing with each further failure up to LOCKOUT_MAX_WAIT_SECONDS; failures are forgotten
    # after LOCKOUT_FAILURE_RESET_SECONDS without one.
    LOCKOUT_FAILURE_THRESHOLD: int = Field(default=5, ge=1)
    LOCKOUT_WAIT_INCREMENT_SECONDS: int = Field(default=60, ge=1)
    LOCKOUT_MAX_WAIT_SECONDS: int = Field(default=900, ge=1)
    LOCKOUT_FAILURE_RESET_SECONDS: int = Field(default=43200, ge=1)

    # --- caching and requests ------------------------------------------------------------------
    CACHE_TTL_SECONDS: int = Field(default=300, ge=1, le=86400)
    MAX_REQUEST_BODY_BYTES: int = Field(default=65536, ge=1024)

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
    RECONNECT_BACKOFF_MAX: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("KAFKA_BOOTSTRAP_SERVERS")
    @classmethod
    def _bootstrap_servers(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers or any(":" not in s for s in servers):
            raise ValueError("expected a comma-separated list of host:port")
        return ",".join(servers)

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

    @property
    def is_production(self) -> bool:
        return self.ENVIRONMENT is Environment.PRODUCTION

    @property
    def kafka_bootstrap_list(self) -> list[str]:
        return self.KAFKA_BOOTSTRAP_SERVERS.split(",")


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
