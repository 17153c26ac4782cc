"""The operations features (metrics, the account commands, tracing) attacked as an outsider
would, against the real PostgreSQL, Redis and broker.

Each test is one attack and what must hold: the metrics listener's own port under slow, huge,
odd and numerous connections; labels a caller cannot multiply; the account commands with
addresses and passwords meant to confuse them, and twenty erasures of one account at once; and
a caller's trace headers, malformed or huge, against the request and the events it records.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from fastapi import FastAPI
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from src.app.container import app_services
from src.db.models import MfaFactor, OutboxEvent, User
from src.db.types import utcnow
from src.events.outbox import EventType
from src.services import metrics
from src.users import repository
from tests.conftest import SettingsFactory
from tests.support.app import (
    PASSWORD,
    bearer,
    eventually,
    login,
    register,
    running_app,
    unique_email,
)
from tests.support.auth import outbox
from tests.support.servers import free_port
from tests.test_cli import ROOT, Cli, cli, cli_env  # noqa: F401 (fixtures)
from tests.test_cli_users import AdminApp, admin_app  # noqa: F401 (fixture)
from tests.test_metrics import METRICS_TOKEN, SCRAPER, parse
from tests.test_tracing import TRACED, app_with, exporter, untraced_afterwards  # noqa: F401

API = "/api/v1"
GOOD_HEAD = f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {METRICS_TOKEN}\r\n\r\n"


# --- the metrics listener (METRICS_PORT) ----------------------------------------------------------


@pytest_asyncio.fixture
async def listener(make_settings: SettingsFactory) -> AsyncIterator[int]:
    """An app serving its metrics on a port of its own (METRICS=token): that port."""
    port = free_port()
    settings = make_settings(
        METRICS="token", METRICS_TOKEN=METRICS_TOKEN, METRICS_PORT=port, METRICS_HOST="127.0.0.1"
    )
    async with running_app(settings):
        yield port


async def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection; everything the listener answers until it closes
    (nothing when it closed, or reset, the connection unanswered)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(30):
            return await reader.read()
    except ConnectionError:
        return b""
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_connections_beyond_the_bound_are_closed_at_once(
    listener: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Idle connections must stay held for the whole test, however slow the machine.
    monkeypatch.setattr(metrics, "_READ_TIMEOUT", 120.0)
    idle = [
        await asyncio.open_connection("127.0.0.1", listener) for _ in range(metrics.MAX_CONNECTIONS)
    ]
    try:
        # The listener takes connections in order: this one finds the bound reached.
        assert await exchange(listener, GOOD_HEAD.encode()) == b""
    finally:
        for _, writer in idle:
            writer.close()

    async def served() -> bool:
        answer = await exchange(listener, GOOD_HEAD.encode())
        return answer.startswith(b"HTTP/1.1 200 ")

    # Once the idle ones have gone, a scraper is served again.
    await eventually(served, timeout=30)


class _LargePage(Collector):
    """A family big enough that the answer overflows every socket buffer on the way."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("ums_test_large_page", "Filler.", labels=["filler"])
        family.add_metric(["x" * 16_000_000], 1)
        yield family


async def test_a_scraper_that_never_reads_its_answer_is_let_go(
    listener: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One connection at a time: the slot is free again only if the silent reader is let go.
    monkeypatch.setattr(metrics, "MAX_CONNECTIONS", 1)
    monkeypatch.setattr(metrics, "_WRITE_TIMEOUT", 0.5, raising=False)
    large = _LargePage()
    REGISTRY.register(large)
    silent = socket.socket()
    try:
        # As small a window as the system allows, and nothing ever read.
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        silent.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(silent, ("127.0.0.1", listener))
        await loop.sock_sendall(silent, GOOD_HEAD.encode())

        async def served() -> bool:
            answer = await exchange(listener, GOOD_HEAD.encode())
            return answer.startswith(b"HTTP/1.1 200 ")

        await eventually(served, timeout=60)
    finally:
        silent.close()
        REGISTRY.unregister(large)


async def test_a_request_head_that_never_ends_is_dropped(
    listener: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "_READ_TIMEOUT", 0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", listener)
    writer.write(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
    received = b"x"

    async def dropped() -> bool:
        # One byte at a time, never the end of the head: the whole head has a deadline, not
        # each read.
        nonlocal received
        writer.write(b"a")
        try:
            received = await asyncio.wait_for(reader.read(), 0.2)
        except TimeoutError:
            return False
        except ConnectionError:
            received = b""
        return True

    await eventually(dropped, timeout=30)
    writer.close()
    assert received == b""
    # A head over the limit is dropped too, and the listener goes on serving.
    huge = b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer " + b"a" * 20_000 + b"\r\n\r\n"
    assert await exchange(listener, huge) == b""
    assert status_of(await exchange(listener, GOOD_HEAD.encode())) == 200


@pytest.mark.parametrize(
    ("request_head", "expected"),
    [
        # The token with a NUL, a byte outside ASCII, or a prefix of it: refused.
        (f"GET /metrics HTTP/1.1\r\nAuthorization: Bearer {METRICS_TOKEN}\x00\r\n\r\n", 401),
        (f"GET /metrics HTTP/1.1\r\nAuthorization: Bearer {METRICS_TOKEN}\xff\r\n\r\n", 401),
        (f"GET /metrics HTTP/1.1\r\nAuthorization: Bearer {METRICS_TOKEN[:-1]}\r\n\r\n", 401),
        (f"GET /metrics HTTP/1.1\r\nAuthorization: Basic {METRICS_TOKEN}\r\n\r\n", 401),
        (f"GET /metrics?token={METRICS_TOKEN} HTTP/1.1\r\n\r\n", 401),
        ("GET /metrics HTTP/1.1\r\nAuthorization: Bearer\r\n\r\n", 401),
        # The scheme's case does not matter (RFC 9110); a query string is not part of the path.
        (f"GET /metrics?x=1 HTTP/1.0\r\nAuthorization: bearer {METRICS_TOKEN}\r\n\r\n", 200),
        # Only /metrics, exactly.
        (f"GET /metrics/ HTTP/1.1\r\nAuthorization: Bearer {METRICS_TOKEN}\r\n\r\n", 404),
        (f"GET /METRICS HTTP/1.1\r\nAuthorization: Bearer {METRICS_TOKEN}\r\n\r\n", 404),
        (f"GET http://x/metrics HTTP/1.1\r\nAuthorization: Bearer {METRICS_TOKEN}\r\n\r\n", 404),
        ("\r\n\r\n", 404),
        ("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (f"DELETE /metrics HTTP/1.1\r\nAuthorization: Bearer {METRICS_TOKEN}\r\n\r\n", 405),
    ],
)
async def test_odd_requests_on_the_listener(
    listener: int, request_head: str, expected: int
) -> None:
    answer = await exchange(listener, request_head.encode("latin-1"))
    assert status_of(answer) == expected
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").lower().split("\r\n")
    assert "cache-control: no-store" in lines and "connection: close" in lines
    if expected != 200:
        assert json.loads(body)["status"] == expected
        assert b"ums_" not in body


@pytest.mark.parametrize(
    "token",
    [
        METRICS_TOKEN + "\n",  # a secret file's line end, kept by an env var
        " " + METRICS_TOKEN,
        " " * 40,
        METRICS_TOKEN[:20] + " " + METRICS_TOKEN[20:],
        METRICS_TOKEN + "\u00e9",  # no client can send it: headers are bytes, read as Latin-1
    ],
)
def test_a_token_no_scraper_could_send_stops_start_up(
    make_settings: SettingsFactory, token: str
) -> None:
    # Otherwise every scrape would be refused, with nothing saying why.
    with pytest.raises(ValueError, match="METRICS_TOKEN"):
        make_settings(METRICS="token", METRICS_TOKEN=token)


async def test_a_refused_scrape_on_the_listener_is_logged(
    listener: int, caplog: pytest.LogCaptureFixture
) -> None:
    guess = "g" * 40
    with caplog.at_level(logging.INFO, logger="src.services.metrics"):
        head = f"GET /metrics HTTP/1.1\r\nAuthorization: Bearer {guess}\r\n\r\n"
        assert status_of(await exchange(listener, head.encode())) == 401
        assert status_of(await exchange(listener, GOOD_HEAD.encode())) == 200
    refused = [
        r for r in caplog.records if r.name == "src.services.metrics" and "401" in r.getMessage()
    ]
    assert len(refused) == 1 and refused[0].levelno == logging.INFO
    assert "127.0.0.1" in refused[0].getMessage() and guess not in refused[0].getMessage()


async def test_pipelined_requests_get_one_answer(listener: int) -> None:
    answer = await exchange(listener, GOOD_HEAD.encode() * 3)
    assert answer.count(b"HTTP/1.1 ") == 1 and status_of(answer) == 200


# --- the main port --------------------------------------------------------------------------------


async def test_the_token_is_needed_exactly_on_the_main_port(make_settings: SettingsFactory) -> None:
    settings = make_settings(METRICS="token", METRICS_TOKEN=METRICS_TOKEN)
    async with running_app(settings) as (_, client):
        for headers in (
            {"Authorization": f"Bearer {METRICS_TOKEN[:-1]}"},
            {"Authorization": f"Bearer {METRICS_TOKEN}x"},
            {"Authorization": f"Basic {METRICS_TOKEN}"},
            {"Authorization": METRICS_TOKEN},
            {"Authorization": "Bearer " + "a" * 8000},
            {"X-Metrics-Token": METRICS_TOKEN},
        ):
            refused = await client.get("/metrics", headers=headers)
            assert refused.status_code == 401, headers
            assert "ums_" not in refused.text
        assert (await client.get(f"/metrics?token={METRICS_TOKEN}")).status_code == 401
        assert (await client.get("/METRICS", headers=SCRAPER)).status_code == 404
        # /metrics/ only redirects to /metrics; it never serves the page itself.
        slash = await client.get("/metrics/", headers=SCRAPER)
        assert slash.status_code in (307, 404) and "ums_" not in slash.text
        served = await client.get("/metrics?x=1", headers=SCRAPER)
        assert served.status_code == 200 and served.headers["cache-control"] == "no-store"


async def test_metrics_off_serves_nothing_and_counts_no_request(
    make_settings: SettingsFactory,
) -> None:
    port = free_port()
    # A port of its own configured, but metrics off: no listener either.
    async with running_app(make_settings(METRICS="off", METRICS_PORT=port)) as (_, client):
        before = REGISTRY.get_sample_value(
            "ums_http_requests_total",
            {"method": "GET", "route": "/api/v1/health/live", "status": "200"},
        )
        for _ in range(3):
            assert (await client.get(f"{API}/health/live")).status_code == 200
        after = REGISTRY.get_sample_value(
            "ums_http_requests_total",
            {"method": "GET", "route": "/api/v1/health/live", "status": "200"},
        )
        assert after == before
        assert (await client.get("/metrics", headers=SCRAPER)).status_code == 404
        with pytest.raises(ConnectionError):
            await asyncio.open_connection("127.0.0.1", port)


async def test_refused_scrapes_are_not_hidden_from_the_access_log(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(METRICS="token", METRICS_TOKEN=METRICS_TOKEN)
    async with running_app(settings) as (_, client):
        with caplog.at_level(logging.DEBUG, logger="src.access"):
            assert (await client.get("/metrics", headers=SCRAPER)).status_code == 200
            guess = {"Authorization": "Bearer " + "g" * 40}
            assert (await client.get("/metrics", headers=guess)).status_code == 401
    levels = [
        (record.levelno, getattr(record, "status", None))
        for record in caplog.records
        if record.name == "src.access"
    ]
    # A scrape is routine (DEBUG, like the probes); someone guessing the token is not.
    assert levels == [(logging.DEBUG, 200), (logging.INFO, 401)]


async def test_no_caller_can_add_label_values(make_settings: SettingsFactory) -> None:
    async with running_app(make_settings(METRICS="open")) as (_, client):

        async def flood(rounds: int) -> frozenset[frozenset[tuple[str, str]]]:
            for _ in range(rounds):
                noise = uuid.uuid4().hex
                await client.get(f"/{noise}", headers={"Host": f"{noise}.example"})
                await client.get(f"/assets/{noise}.css")
                await client.get(f"{API}/users/{noise}")
                await client.request(noise[:8].upper(), f"{API}/health/live")
                await client.request("get", f"/{noise}")
                await client.post(f"{API}/auth/register", content=noise)
            text = (await client.get("/metrics")).text
            return frozenset(labels for (_, labels) in parse(text))

        first = await flood(1)
        # Many more requests of the same kinds, each with new values: not one new series.
        assert await flood(15) == first
        assert not any("example" in value for labels in first for _, value in labels)


# --- the account commands -----------------------------------------------------------------------


async def _count(app: FastAPI, email: str) -> int:
    async with app_services(app).sessionmaker() as db:
        found = await db.scalar(select(func.count()).select_from(User).where(User.email == email))
        return int(found or 0)


async def test_confusing_addresses_never_reach_another_account(
    admin_app: AdminApp,  # noqa: F811
    cli: Cli,  # noqa: F811
) -> None:
    app, client, _, _ = admin_app
    email = (await register(client, unique_email("victim")))["email"]
    local, _, domain = email.partition("@")
    for refused in (
        email + "\x00",
        "\x00" + email,
        local + "\x00@" + domain,
        "a" * 400 + "@example.com",
        local + "@" + "a" * 300 + ".com",
        local + "\uff20" + domain,  # a full-width @
        email + "\r\nX: y",
    ):
        for command in (("users", "export"), ("users", "erase", "--yes")):
            run = await cli(*command, refused)
            assert run.code == 2, (refused, run.err)
            assert run.err.startswith("invalid: ") and run.out == ""
    for elsewhere in (
        local.replace("v", "\u0475", 1) + "@" + domain,  # Cyrillic izhitsa for "v"
        "\uff56" + email[1:],  # a full-width "v"
        email.replace("example", "examp1e"),
    ):
        run = await cli("users", "erase", "--yes", elsewhere)
        assert run.code == 1 and run.err.startswith("no such user: "), run.err
    assert await _count(app, email) == 1
    # The same account, however it is written: case, spaces, a full-width domain (IDNA maps it).
    for same in (
        email.upper(),
        f"  {email}\n",
        local + "@" + domain.upper().replace("E", "\uff25"),
    ):
        run = await cli("users", "export", same)
        assert run.code == 0, run.err
        assert json.loads(run.out)["user"]["email"] == email


async def test_an_export_cannot_drive_the_operators_terminal(
    admin_app: AdminApp,  # noqa: F811
    cli: Cli,  # noqa: F811
) -> None:
    _, client, _, _ = admin_app
    # A single-byte CSI (clear the screen), an OSC (set the window title) and a right-to-left
    # override, in what a caller chooses: their name and their User-Agent.
    name = "Mallory \u202eevil\u202c \U000e0041"  # and an invisible tag character
    agent = b"agent \x9b2J \x9d0;owned\x9c"
    email = (await register(client, unique_email("ansi"), full_name=name))["email"]
    signed_in = await client.post(
        f"{API}/auth/login",
        data={"grant_type": "password", "username": email, "password": PASSWORD},
        headers={b"User-Agent": agent},
    )
    assert signed_in.status_code == 200
    run = await cli("users", "export", email)
    assert run.code == 0, run.err
    for control in ("\x9b", "\x9d", "\x9c", "\u202e", "\u202c", "\U000e0041"):
        assert control not in run.out
    # Escaped, not lost: the document still says exactly what is stored.
    document = json.loads(run.out)
    assert document["user"]["full_name"] == name
    assert [s["user_agent"] for s in document["sessions"]] == [agent.decode("latin-1")]


async def test_an_export_holds_no_key_material_of_a_passkey(
    admin_app: AdminApp,  # noqa: F811
    cli: Cli,  # noqa: F811
) -> None:
    app, client, _, _ = admin_app
    user = await register(client, unique_email("passkey"))
    credential_id = f"credential-{uuid.uuid4().hex}"
    public_key = uuid.uuid4().bytes * 4
    async with app_services(app).sessionmaker() as db:
        db.add(
            MfaFactor(
                user_id=uuid.UUID(user["id"]),
                kind="webauthn",
                name="security key",
                confirmed_at=utcnow(),
                credential_id=credential_id,
                public_key=public_key,
                sign_count=7,
                transports=["usb"],
            )
        )
        await db.commit()
    run = await cli("users", "export", user["email"])
    assert run.code == 0, run.err
    [passkey] = json.loads(run.out)["passkeys"]
    assert passkey["name"] == "security key" and passkey["transports"] == ["usb"]
    assert credential_id not in run.out
    for encoded in (public_key.hex(), base64.b64encode(public_key).decode()):
        assert encoded not in run.out
    assert base64.urlsafe_b64encode(public_key).decode().rstrip("=") not in run.out


async def test_twenty_erasures_of_one_account_at_once(
    admin_app: AdminApp,  # noqa: F811
    cli_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    app, client, _, _ = admin_app
    user = await register(client, unique_email("erased-once"))
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "src",
            "users",
            "erase",
            "--yes",
            user["email"],
            env=cli_env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(20)
    ]
    outputs = await asyncio.wait_for(
        asyncio.gather(*(process.communicate() for process in processes)), 240
    )
    # Every process has ended here: -1 would be one that had not.
    codes = [-1 if p.returncode is None else p.returncode for p in processes]
    assert sorted(codes) == [0] + [1] * 19, [err.decode()[-300:] for _, err in outputs]
    for (_, err), code in zip(outputs, codes, strict=True):
        assert b"Traceback" not in err, err.decode()
        if code == 1:
            assert err.decode().rstrip().endswith(f"no such user: {user['email']}")
    assert await _count(app, user["email"]) == 0
    # One deletion and one erasure recorded, not one per attempt.
    assert len(await outbox(app, user["id"], EventType.DELETED)) == 1
    assert len(await outbox(app, user["id"], EventType.ERASED)) == 1


async def test_two_deletions_of_one_account_at_once_through_the_api(
    admin_app: AdminApp,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The path the erasure shares (delete_user): a double click, or two administrators.
    app, client, admin, _ = admin_app
    revoke = repository.revoke_sessions
    arrived: list[object] = []
    both = asyncio.Event()

    async def in_step(*args: Any, **kwargs: Any) -> Any:
        # Each deletion waits here for the other one, so both have read the account before
        # either deletes it: the race, every time (the loser's DELETE then matches no row, and
        # its whole transaction is undone). Should one ever wait for the other's lock before
        # this point, the first goes on after a bound.
        arrived.append(args)
        if len(arrived) >= 2:
            both.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(both.wait(), 3)
        return await revoke(*args, **kwargs)

    monkeypatch.setattr(repository, "revoke_sessions", in_step)
    user = await register(client, unique_email("deleted-once"))
    answers = await asyncio.gather(
        *(client.delete(f"{API}/users/{user['id']}", headers=admin) for _ in range(2))
    )
    assert sorted(answer.status_code for answer in answers) == [204, 404]
    assert len(await outbox(app, user["id"], EventType.DELETED)) == 1


async def test_passwords_from_standard_input_at_the_edges(
    admin_app: AdminApp,  # noqa: F811
    cli: Cli,  # noqa: F811
) -> None:
    app, client, _, _ = admin_app
    email = unique_email("edges")
    too_long = "long enough " * 100
    run = await cli("create-admin", email, "--password-stdin", stdin=too_long + "\n")
    assert run.code == 2 and "at most" in run.err
    assert "long enough" not in run.err
    for blank in ("\r\n", "\n", ""):
        run = await cli("create-admin", email, "--password-stdin", stdin=blank)
        assert run.code == 1 and run.err == "no password on standard input\n"
    assert await _count(app, email) == 0
    # A Windows line end is not part of the password, nor is anything after the first line.
    chosen = "a passphrase typed on windows"
    run = await cli("create-admin", email, "--password-stdin", stdin=f"{chosen}\r\n\r\nmore\n")
    assert run.code == 0, run.err
    tokens = await login(client, email, chosen)
    assert (await client.get(f"{API}/users/me", headers=bearer(tokens))).status_code == 200


# --- tracing --------------------------------------------------------------------------------------


async def test_a_callers_trace_headers_are_validated_and_secrets_stay_out_of_spans(
    make_settings: SettingsFactory,
    exporter: InMemorySpanExporter,  # noqa: F811
) -> None:
    kept = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    malformed = [
        "garbage",
        "00-" + "0" * 32 + "-" + "1" * 16 + "-01",  # an all-zero trace id is invalid
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is invalid
        "x" * 6000,
        kept + "\x7f",
    ]
    oversized_state = ",".join(f"k{i}=" + "v" * 200 for i in range(40))
    async with app_with(TRACED, make_settings, exporter) as (app, client):
        email = unique_email("traced")
        await register(client, email)
        tokens = await login(client, email)
        await client.get(f"{API}/users/me", headers=bearer(tokens))
        await client.post(
            f"{API}/auth/login",
            data={"grant_type": "password", "username": email, "password": "wrong " + PASSWORD},
        )
        for given in [*malformed, kept]:
            response = await client.post(
                f"{API}/auth/register",
                json={"email": unique_email("tp"), "password": PASSWORD},
                headers={"traceparent": given, "tracestate": oversized_state},
            )
            assert response.status_code == 201, response.text
            async with app_services(app).sessionmaker() as db:
                row = await db.scalar(
                    select(OutboxEvent)
                    .where(OutboxEvent.aggregate_id == uuid.UUID(response.json()["id"]))
                    .order_by(OutboxEvent.position)
                    .limit(1)
                )
            assert row is not None and row.trace_context is not None
            # Only what the propagator wrote: a well-formed traceparent, no state over the
            # W3C limit of 32 members; a malformed one started a trace of our own.
            assert set(row.trace_context) == {"traceparent"}
            parent = row.trace_context["traceparent"]
            version, trace_id, span_id, flags = parent.split("-")
            assert (version, len(trace_id), len(span_id), len(flags)) == ("00", 32, 16, 2)
            assert int(trace_id, 16) and int(span_id, 16)
            assert (trace_id == kept.split("-")[1]) is (given == kept)
        recorded = json.dumps(
            [
                [
                    span.name,
                    dict(span.attributes or {}),
                    [dict(e.attributes or {}) for e in span.events],
                ]
                for span in exporter.get_finished_spans()
            ]
        )
    assert tokens["refresh_token"]
    for secret in (PASSWORD, tokens["access_token"], tokens["refresh_token"], email):
        assert secret not in recorded


async def test_captured_headers_never_carry_a_credential(
    make_settings: SettingsFactory,
    exporter: InMemorySpanExporter,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An operator debugging with every header captured (an OpenTelemetry setting of its own),
    # and a sanitize list of theirs that names none of the credentials.
    for direction in ("REQUEST", "RESPONSE"):
        monkeypatch.setenv(f"OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_{direction}", ".*")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", "x-internal")
    link = f"one-time-{uuid.uuid4().hex}"
    async with app_with(TRACED, make_settings, exporter) as (_, client):
        email = unique_email("headers")
        await register(client, email)
        tokens = await login(client, email)
        me = await client.get(
            f"{API}/users/me",
            headers={
                **bearer(tokens),
                "Cookie": f"session={link}",
                "Referer": f"http://test/account/reset-password?token={link}",
                "X-Internal": link,
            },
        )
        assert me.status_code == 200
        spans = exporter.get_finished_spans()
        attributes = [dict(span.attributes or {}) for span in spans]
        recorded = json.dumps(attributes)
        # Captured, so the setting works; the values of credentials are not.
        assert "http.request.header.user_agent" in recorded
        assert "http.request.header.authorization" in recorded
    for secret in (link, tokens["access_token"], tokens["refresh_token"]):
        assert secret not in recorded
