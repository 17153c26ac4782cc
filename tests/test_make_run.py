"""The first thing a newcomer does: ``make run``, on SQLite, then sign up and sign in.

The real command, as the README gives it (only the port, the database file and the data folder
are moved to a scratch directory, and Redis and Kafka are left absent, as on a fresh machine),
driven over a real socket. Row locks do nothing on SQLite, so the guarantees that need them are
tested on PostgreSQL elsewhere (README, "Which guarantees need PostgreSQL").
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.servers import free_port, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[1]
ADMIN_EMAIL = "first-admin@example.com"
ADMIN_PASSWORD = "a first admin password"
PASSWORD = "a newcomer's long password"


@contextlib.contextmanager
def make_run(tmp_path: Path) -> Iterator[str]:
    """``make run`` in its own process group (make starts uvicorn as a child); its base URL."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
        "DATA_DIR": str(tmp_path / "data"),
        "REDIS_PORT": str(free_port()),  # nothing there: the service runs without it
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "FIRST_ADMIN_EMAIL": ADMIN_EMAIL,
        "FIRST_ADMIN_PASSWORD": ADMIN_PASSWORD,
    }
    log = (tmp_path / "make-run.log").open("wb")
    process = subprocess.Popen(
        ["make", "run", f"PORT={port}"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        try:
            wait_for_port(port, timeout=90)  # migrations first, then imports, on a busy machine
        except TimeoutError:
            pytest.fail((tmp_path / "make-run.log").read_text()[-3000:])
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_make_run_serves_sign_up_sign_in_and_the_admin_guard(tmp_path: Path) -> None:
    with make_run(tmp_path) as base, httpx.Client(base_url=base, timeout=30) as client:
        health = client.get("/api/v1/health").json()
        assert health["checks"]["database"] == {"status": "healthy"}

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
    assert "Traceback" not in (tmp_path / "make-run.log").read_text()
