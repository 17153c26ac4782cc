"""``user-service`` (``python -m src``): usage and settings errors, ``migrate``, ``check``,
``serve`` and ``relay``, against the real PostgreSQL, Redis and broker.

Most runs call ``main`` in-process (in a thread: it runs its own event loop) with the settings in
the environment, as an operator's shell gives them; the console script itself, ``python -m src``,
``serve`` and ``relay`` run as real processes.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
import pytest_asyncio

from src.cli import main
from tests.conftest import SettingsFactory
from tests.support.app import eventually, register, running_app
from tests.support.events import outbox_rows
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "user-service"
# Variables of the service that a developer's shell may hold: never let them reach a command.
OURS = (
    "DATABASE_",
    "REDIS_",
    "KAFKA_",
    "FIRST_ADMIN_",
    "ENCRYPTION_",
    "JWT_",
    "ARGON2_",
    "OUTBOX_",
    "WEB_CONCURRENCY",
    "HOST",
    "PORT",
    "ENVIRONMENT",
    "DATA_DIR",
)


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


Cli = Callable[..., Awaitable[Run]]


@pytest.fixture
def cli_env(
    make_settings: SettingsFactory, jwt_key_file: Path, tmp_path: Path, kafka_bootstrap: str
) -> dict[str, str]:
    """The environment of a command on the test database and Redis (Kafka off, cheap hashing)."""
    settings = make_settings()
    env = {name: value for name, value in os.environ.items() if not name.startswith(OURS)}
    env.update(
        PYTHONPATH=str(ROOT),
        ENVIRONMENT="test",
        DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=settings.DATABASE_URL,
        DATABASE_CONNECT_TIMEOUT="10",
        DATABASE_COMMAND_TIMEOUT="10",
        DATABASE_STATEMENT_TIMEOUT="8",
        REDIS_HOST=settings.REDIS_HOST,
        REDIS_PORT=str(settings.REDIS_PORT),
        REDIS_DB=str(settings.REDIS_DB),
        KAFKA_ENABLED="false",
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        KAFKA_ENABLE_IDEMPOTENCE="false",
        JWT_PRIVATE_KEY_FILE=str(jwt_key_file),
        ARGON2_TIME_COST="1",
        ARGON2_MEMORY_COST="8192",
    )
    return env


@pytest.fixture
def cli(
    cli_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> Cli:
    """``main(args)`` in-process with ``cli_env`` (plus ``env``) as the environment, from a
    scratch directory (no developer's .env), ``stdin`` as standard input."""
    for name in list(os.environ):
        if name.startswith(OURS):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)

    async def run(*args: str, stdin: str = "", **env: str) -> Run:
        capsys.readouterr()
        with monkeypatch.context() as patch:
            for name, value in {**cli_env, **env}.items():
                patch.setenv(name, value)
            patch.setattr(sys, "stdin", _Input(stdin))
            try:
                code = await asyncio.to_thread(main, list(args))
            except SystemExit as exc:  # argparse: --help, bad usage
                code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        return Run(code, out, err)

    return run


class _Input:
    """Standard input that is not a terminal, holding ``text``."""

    def __init__(self, text: str) -> None:
        self._lines = text.splitlines(keepends=True)

    def readline(self) -> str:
        return self._lines.pop(0) if self._lines else ""

    def isatty(self) -> bool:
        return False


def process(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest_asyncio.fixture
async def empty_database(database_url: str) -> AsyncIterator[str]:
    """A database of its own, with no tables at all."""
    admin = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    name = f"ums_cli_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield urlsplit(database_url)._replace(path=f"/{name}").geturl()
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def process_log(tmp_path: Path) -> Iterator[Path]:
    """Where a child process writes; shown when the test fails."""
    path = tmp_path / "process.log"
    yield path
    if path.exists():
        print(path.read_text(errors="replace")[-3000:])


# --- usage and settings ---------------------------------------------------------------------------

COMMANDS = (
    ["serve"],
    ["migrate"],
    ["check"],
    ["create-admin"],
    ["relay"],
    ["users"],
    ["users", "export"],
    ["users", "erase"],
)


async def test_every_command_explains_itself_with_its_exit_codes(cli: Cli) -> None:
    top = await cli("--help")
    assert top.code == 0 and top.out.startswith("usage: user-service ")
    for name in ("serve", "migrate", "check", "create-admin", "relay", "users", "keys", "clients"):
        assert re.search(rf"^\s+{name}\s", top.out, re.MULTILINE), name
    for command in COMMANDS:
        shown = await cli(*command, "--help")
        assert shown.code == 0, command
        assert shown.out.startswith(f"usage: user-service {' '.join(command)}"), shown.out
        assert "Exit codes: " in shown.out, command
    serve = await cli("serve", "--help")
    assert all(option in serve.out for option in ("--host", "--port", "--workers", "--migrate"))
    admin = await cli("create-admin", "--help")
    assert "--password-stdin" in admin.out and "--password " not in admin.out


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["nonsense"],
        ["serve", "--port", "0"],
        ["serve", "--workers", "many"],
        ["check", "--timeout", "-1"],
        ["users"],
        ["users", "export"],
        ["create-admin"],
        ["create-admin", "admin@example.com", "--password", "in-the-history"],
    ],
)
async def test_bad_usage_is_exit_code_2(cli: Cli, args: list[str]) -> None:
    run = await cli(*args)
    assert run.code == 2
    assert "usage: user-service" in run.err


@pytest.mark.parametrize(
    "args", [["migrate"], ["check"], ["users", "export", "a@example.com"], ["serve"]]
)
async def test_bad_settings_are_exit_code_2_naming_the_variable(cli: Cli, args: list[str]) -> None:
    run = await cli(*args, REDIS_PORT="not-a-port")
    assert run.code == 2
    assert run.err.startswith("Invalid configuration: REDIS_PORT"), run.err


async def test_an_address_that_is_not_one_is_exit_code_2(cli: Cli) -> None:
    for args in (["users", "export", "nobody"], ["users", "erase", "--yes", "x@"]):
        run = await cli(*args)
        assert run.code == 2 and run.err.startswith("invalid:"), run


async def test_the_console_script_and_python_m_src_are_the_same_program(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    script, module = await asyncio.gather(
        asyncio.to_thread(process, [str(CONSOLE_SCRIPT), "--help"], cli_env, tmp_path),
        asyncio.to_thread(process, [sys.executable, "-m", "src", "--help"], cli_env, tmp_path),
    )
    assert script.returncode == 0 and module.returncode == 0, script.stderr + module.stderr
    assert script.stdout.startswith("usage: user-service ")
    assert script.stdout == module.stdout


# --- migrate --------------------------------------------------------------------------------------


async def test_migrate_a_fresh_database_then_check_it(cli: Cli, empty_database: str) -> None:
    before = await cli("migrate", "--check", DATABASE_URL=empty_database)
    assert before.code == 1
    assert re.fullmatch(r"not at head: at nothing, head is \w+\n", before.err), before.err

    migrated = await cli("migrate", DATABASE_URL=empty_database)
    assert migrated.code == 0, migrated.err
    head = re.fullmatch(r"migrated from nothing to (\w+)\n", migrated.out)
    assert head, migrated.out

    after = await cli("migrate", "--check", DATABASE_URL=empty_database)
    assert (after.code, after.out) == (0, f"at head ({head[1]})\n")
    again = await cli("migrate", DATABASE_URL=empty_database)
    assert (again.code, again.out) == (0, f"already at head ({head[1]}); nothing to do\n")

    conn = await asyncpg.connect(empty_database.replace("+asyncpg", "", 1))
    try:
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == head[1]
        assert await conn.fetchval("SELECT count(*) FROM users") == 0
    finally:
        await conn.close()


async def test_migrate_against_no_database_fails_in_one_line(cli: Cli) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    for args in (["migrate"], ["migrate", "--check"]):
        run = await cli(*args, DATABASE_URL=nowhere, DATABASE_CONNECT_TIMEOUT="2")
        assert run.code == 1
        assert run.err.startswith("the database is unavailable: ") and run.err.count("\n") == 1


# --- check ----------------------------------------------------------------------------------------


def _line(run: Run, service: str) -> str:
    for line in run.out.splitlines():
        if line.startswith(service):
            return line
    raise AssertionError(f"no {service} line in:\n{run.out}\n{run.err}")


async def test_check_passes_against_the_live_services(cli: Cli, kafka_bootstrap: str) -> None:
    run = await cli("check", KAFKA_ENABLED="true")
    assert run.code == 0, run.out + run.err
    assert re.match(
        r"Database OK\s+\(postgresql\+asyncpg://.*, [\d.]+ ms, at head \w+\)",
        _line(run, "Database"),
    )
    assert re.match(r"Redis\s+OK\s+\(", _line(run, "Redis"))
    assert re.match(rf"Kafka\s+OK\s+\({re.escape(kafka_bootstrap)}, ", _line(run, "Kafka"))
    assert run.out.splitlines()[-1].startswith("All enabled services OK")


async def test_check_reports_a_stopped_dependency_as_failed(cli: Cli) -> None:
    run = await cli("check", "--timeout", "2", REDIS_PORT=str(free_port()))
    assert run.code == 1
    assert re.match(r"Redis\s+FAILED\s+\(127\.0\.0\.1:\d+/\d+: PING: ", _line(run, "Redis"))
    assert re.match(r"Database OK\s", _line(run, "Database"))
    assert re.match(r"Kafka\s+DISABLED\s+\(KAFKA_ENABLED=false\)", _line(run, "Kafka"))
    assert run.out.splitlines()[-1].startswith("FAILED: Redis (")


async def test_check_reports_an_unreachable_or_unmigrated_database(
    cli: Cli, empty_database: str
) -> None:
    unmigrated = await cli("check", DATABASE_URL=empty_database)
    assert unmigrated.code == 1
    line = _line(unmigrated, "Database")
    assert re.match(r"Database FAILED\s+\(.*: not migrated: at nothing, head is \w+; ", line)
    # The password of the URL never appears.
    nowhere = f"postgresql://postgres:hunter2secret@127.0.0.1:{free_port()}/none"
    gone = await cli("check", "--timeout", "2", DATABASE_URL=nowhere, DATABASE_CONNECT_TIMEOUT="2")
    assert gone.code == 1
    assert re.match(r"Database FAILED\s+\(.*: SELECT 1: ", _line(gone, "Database"))
    assert "hunter2secret" not in gone.out + gone.err
    assert re.match(r"Redis\s+OK", _line(gone, "Redis"))


async def test_python_m_src_check_as_a_process(cli_env: dict[str, str], tmp_path: Path) -> None:
    run = await asyncio.to_thread(
        process, [sys.executable, "-m", "src", "check"], cli_env, tmp_path
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.match(r"Database OK\s", run.stdout)
    assert "Traceback" not in run.stderr


# --- serve and relay, as processes ----------------------------------------------------------------


async def test_serve_listens_on_the_settings_port_and_stops_on_sigterm(
    cli_env: dict[str, str], tmp_path: Path, process_log: Path, empty_database: str
) -> None:
    # An empty database: --migrate (what the container's entry point runs) migrates it first.
    port = free_port()
    env = {
        **cli_env,
        "DATABASE_URL": empty_database,
        "PORT": str(port),
        "REDIS_ENABLED": "false",
        "LOG_LEVEL": "INFO",
    }
    with process_log.open("ab") as log:
        server = subprocess.Popen(
            [str(CONSOLE_SCRIPT), "serve", "--migrate"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:

            async def live() -> bool:
                assert server.poll() is None, "the server exited"
                try:
                    response = await client.get("/api/v1/health/live")
                except httpx.TransportError:
                    return False
                return response.status_code == 200

            await eventually(live, timeout=60, interval=0.2)
    finally:
        server.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(server.wait, 30)
    # A graceful shut-down, then uvicorn ends by the signal it caught, as its own CLI does.
    assert returncode == -signal.SIGTERM
    log_text = process_log.read_text()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in log_text
    assert "Shut-down complete" in log_text


async def test_serve_that_cannot_start_is_exit_code_1(
    cli_env: dict[str, str], tmp_path: Path, empty_database: str
) -> None:
    # Not migrated, and not asked to: the service refuses to start.
    env = {**cli_env, "PORT": str(free_port()), "DATABASE_URL": empty_database}
    run = await asyncio.to_thread(process, [str(CONSOLE_SCRIPT), "serve"], env, tmp_path)
    assert run.returncode == 1
    assert "the service did not start" in run.stderr
    assert "database not migrated" in run.stderr


async def test_the_relay_command_publishes_the_outbox(
    make_settings: SettingsFactory,
    cli_env: dict[str, str],
    database_url: str,
    tmp_path: Path,
    process_log: Path,
) -> None:
    # An app with Kafka disabled runs no relay: what it records stays in the outbox.
    async with running_app(make_settings(KAFKA_ENABLED=False)) as (_, client):
        user = await register(client)
    rows = await outbox_rows(database_url, [user["id"]])
    assert rows and all(row.published_at is None for row in rows)

    env = {**cli_env, "KAFKA_ENABLED": "true", "OUTBOX_POLL_INTERVAL": "0.2"}
    with process_log.open("ab") as log:
        relay = subprocess.Popen(
            [str(CONSOLE_SCRIPT), "relay"], cwd=tmp_path, env=env, stdout=log, stderr=log
        )
    try:

        async def published() -> bool:
            assert relay.poll() is None, "the relay exited"
            current = await outbox_rows(database_url, [user["id"]])
            return all(row.published_at is not None for row in current)

        await eventually(published, timeout=30, interval=0.2)
    finally:
        relay.terminate()
        returncode = await asyncio.to_thread(relay.wait, 15)
    assert returncode == 0, "SIGTERM should stop the relay cleanly"


def test_serve_gives_several_workers_an_empty_metrics_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from src.cli.serve import _fresh_metrics_directory

    named = tmp_path / "metrics"
    named.mkdir()
    (named / "counter_1234.db").write_bytes(b"left by an earlier run")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(named))
    _fresh_metrics_directory()
    assert named.is_dir() and not list(named.iterdir())

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    _fresh_metrics_directory()
    made = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert made.is_dir() and not list(made.iterdir())
    made.rmdir()


def test_an_unexpected_failure_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import src.cli.migrate

    def broken(args: object) -> int:
        raise RuntimeError("the disk is on fire\nsecond line of detail")

    monkeypatch.setattr(src.cli.migrate, "migrate_command", broken)
    assert main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert err == "user-service: failed: RuntimeError: the disk is on fire\n"
    assert "Traceback" not in err
