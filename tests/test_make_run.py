"""``make run`` on a machine whose settings name its own servers: those are used, nothing else.

The real command, as the README gives it, in a scratch copy of the checkout
(``tests.support.make_run``), on SQLite, with Redis, a Kafka-protocol broker and an SMTP server
of the test's own named in the environment (as a ``.env`` would): the launcher must start none
of its development servers, and the service must be healthy on the named ones. Then the
newcomer's sign-up and sign-in over a real socket, and the admin guard with the first admin the
environment names. Row locks do nothing on SQLite, so the guarantees that need them are tested
on PostgreSQL elsewhere (README, "Which guarantees need PostgreSQL"). ``tests/test_dev_stack.py``
covers the fresh clone, where nothing is named.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.app import OPERATOR_TOKEN
from tests.support.make_run import base_environment, make_run, scratch_checkout
from tests.support.servers import (
    KafkaBroker,
    RedisServer,
    free_port,
    wait_for_port,
    wait_for_port_closed,
)

ADMIN_EMAIL = "first-admin@example.com"
ADMIN_PASSWORD = "a first admin password"
PASSWORD = "a newcomer's long password"
TOPICS = ("user-events", "user-notifications")


@contextlib.contextmanager
def smtp_server(directory: Path) -> Iterator[int]:
    """An SMTP server of the machine's (the development catcher, run by hand); its port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "src.dev.catcher", "--port", str(port), "--directory", directory],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def own_servers(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Redis, a broker (its topics made) and SMTP, named the way a .env would name them."""
    redis, broker = RedisServer(), KafkaBroker()
    redis.start()
    broker.start()
    try:
        for topic in TOPICS:
            broker.create_topic(topic, 3)
        with smtp_server(tmp_path / "mail") as smtp_port:
            yield {
                "REDIS_HOST": "127.0.0.1",
                "REDIS_PORT": str(redis.port),
                "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                "KAFKA_ENABLE_IDEMPOTENCE": "false",
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(smtp_port),
                "SMTP_SECURITY": "none",
            }
    finally:
        broker.kill()  # tansu lingers on SIGTERM while clients are connected; it keeps nothing
        redis.stop()


def test_make_run_uses_the_configured_servers_and_starts_nothing_else(
    tmp_path: Path, own_servers: dict[str, str]
) -> None:
    checkout = scratch_checkout(tmp_path / "clone")
    port = free_port()
    env = {
        **base_environment(tmp_path),
        **own_servers,
        "FIRST_ADMIN_EMAIL": ADMIN_EMAIL,
        "FIRST_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "HEALTH_DETAILS_TOKEN": OPERATOR_TOKEN,
    }
    with (
        make_run(checkout, port, env, tmp_path / "make-run.log") as run,
        httpx.Client(base_url=run.base_url, timeout=30) as client,
    ):
        operator = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        deadline = time.monotonic() + 90
        while (report := client.get("/api/v1/health", headers=operator).json())[
            "status"
        ] != "healthy":
            assert time.monotonic() < deadline, report
            time.sleep(0.2)
        assert report["checks"]["redis"]["details"]["target"] == (
            f"redis://127.0.0.1:{own_servers['REDIS_PORT']}/0"
        )
        assert report["checks"]["mail"]["status"] == "healthy"
        # Below make: the launcher and the service, nothing it would start in their absence.
        commands = list(run.processes().values())
        assert len(commands) == 2, commands
        assert not [c for c in commands if "tansu" in c or "redis-server" in c or "catcher" in c]
        for line in ("Kafka  yours", "Redis  yours", "Mail   yours"):
            assert line in run.log()
        assert client.get("/dev/mail").status_code == 404  # no catcher of ours, no page

        email = "newcomer@example.com"
        registered = client.post(
            "/api/v1/auth/register", json={"email": email, "password": PASSWORD}
        )
        assert registered.status_code == 201, registered.text

        def sign_in(username: str, password: str) -> dict[str, str]:
            form = {"grant_type": "password", "username": username, "password": password}
            response = client.post("/api/v1/auth/login", data=form)
            assert response.status_code == 200, response.text
            return {"Authorization": f"Bearer {response.json()['access_token']}"}

        user = sign_in(email, PASSWORD)
        me = client.get("/api/v1/users/me", headers=user)
        assert me.status_code == 200 and me.json()["email"] == email
        # The admin API is for admins: the newcomer is refused, the first admin let in.
        assert client.get("/api/v1/users", headers=user).status_code == 403
        admin = sign_in(ADMIN_EMAIL, ADMIN_PASSWORD)
        listing = client.get("/api/v1/users", headers=admin)
        assert listing.status_code == 200
        assert {item["email"] for item in listing.json()["items"]} >= {email, ADMIN_EMAIL}
        assert client.get("/docs").status_code == 200

        run.interrupt()
        assert run.survivors() == {}
        wait_for_port_closed(port)
    assert "Traceback" not in run.log()
    # The first admin came from the environment: no .env was generated, no password shown.
    assert not (checkout / ".env").exists()
