"""Prometheus metrics at /metrics: exposure by settings, and every family moving against the real
services (PostgreSQL, Redis, the Kafka-protocol broker)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from src.app.container import app_services
from tests.conftest import SettingsFactory
from tests.support.app import (
    OPERATOR,
    OPERATOR_TOKEN,
    PASSWORD,
    bearer,
    eventually,
    login,
    register,
    running_app,
    unique_email,
)
from tests.support.events import FAST_GROUP_JOIN
from tests.support.oidc import ADMIN_PASSWORD
from tests.support.servers import RedisServer, free_port

METRICS_TOKEN = "metrics-token-for-tests-0123456789abcdef"
SCRAPER = {"Authorization": f"Bearer {METRICS_TOKEN}"}
TOKEN_URL = "/oauth2/token"

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> Samples:
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series is not there (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@pytest_asyncio.fixture
async def metered(
    make_settings: SettingsFactory,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with running_app(make_settings(METRICS="open")) as (app, client):
        yield app, client


# --- exposure -------------------------------------------------------------------------------------


async def test_off_by_default_is_a_404_like_any_unknown_path(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings()
    assert settings.METRICS == "off"
    async with running_app(settings) as (_, client):
        unknown = await client.get(f"/no-such-page-{uuid.uuid4().hex}")
        response = await client.get("/metrics")
        assert response.status_code == unknown.status_code == 404
        assert response.headers["content-type"] == unknown.headers["content-type"]


async def test_open_serves_the_text_format_outside_the_api_document(
    metered: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, client = metered
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert response.headers["cache-control"] == "no-store"
    families = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"ums_http_requests", "ums_logins", "ums_outbox_pending_events"} <= families
    document = (await client.get("/api/v1/openapi.json")).json()
    assert "/metrics" not in document["paths"]


async def test_token_mode_needs_the_bearer_token(make_settings: SettingsFactory) -> None:
    settings = make_settings(METRICS="token", METRICS_TOKEN=METRICS_TOKEN)
    async with running_app(settings) as (_, client):
        for headers in (None, {"Authorization": "Bearer wrong"}, OPERATOR, {"Authorization": ""}):
            refused = await client.get("/metrics", headers=headers)
            assert refused.status_code == 401
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert refused.json()["status"] == 401
            assert "ums_" not in refused.text
        served = await client.get("/metrics", headers=SCRAPER)
        assert served.status_code == 200
        samples = parse(served.text)
        assert value(samples, "ums_http_requests_total", method="GET", route="/metrics",
                     status="401") >= 4  # fmt: skip
        assert METRICS_TOKEN not in served.text
        assert OPERATOR_TOKEN not in served.text


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"METRICS": "token"}, "required when METRICS=token"),
        ({"METRICS": "token", "METRICS_TOKEN": "too-short"}, "at least 32 characters"),
    ],
)
def test_a_missing_or_short_token_stops_start_up(
    make_settings: SettingsFactory, overrides: dict[str, str], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        make_settings(**overrides)


async def test_a_port_of_its_own(make_settings: SettingsFactory) -> None:
    port = free_port()
    settings = make_settings(
        METRICS="token", METRICS_TOKEN=METRICS_TOKEN, METRICS_PORT=port, METRICS_HOST="127.0.0.1"
    )
    async with running_app(settings) as (_, client):
        # Not on the main port then.
        assert (await client.get("/metrics")).status_code == 404
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as side:
            refused = await side.get("/metrics")
            assert refused.status_code == 401
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.headers["www-authenticate"].startswith("Bearer")
            wrong = await side.get("/metrics", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert (await side.get("/elsewhere", headers=SCRAPER)).status_code == 404
            served = await side.get("/metrics", headers=SCRAPER)
            assert served.status_code == 200
            assert served.headers["content-type"].startswith("text/plain; version=0.0.4")
            samples = parse(served.text)
            assert value(samples, "ums_outbox_backlog_query_success") == 1
    # Closed with the app.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as side:
        with pytest.raises(httpx.ConnectError):
            await side.get("/metrics", headers=SCRAPER)


async def test_a_port_already_taken_is_left_to_its_holder(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = make_settings(METRICS="open", METRICS_PORT=port, METRICS_HOST="127.0.0.1")
        with caplog.at_level(logging.WARNING, logger="src.services.metrics"):
            async with running_app(settings) as (_, client):
                # The service runs without it; its main port still has no /metrics.
                assert (await client.get("/api/v1/health/live")).status_code == 200
                assert (await client.get("/metrics")).status_code == 404
    assert any("unavailable" in r.getMessage() for r in caplog.records)


# --- HTTP -----------------------------------------------------------------------------------------


async def test_requests_are_counted_by_route_template_never_by_raw_path(
    metered: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, client = metered
    user = await register(client)
    auth = bearer(await login(client, user["email"]))
    route = "/api/v1/users/{user_id}"
    before = await scrape(client)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for user_id in ids:
        await client.get(f"/api/v1/users/{user_id}", headers=auth)
    stray = f"/stray-{uuid.uuid4().hex}"
    await client.get(stray)
    await client.request("BREW", "/api/v1/health/live")
    after_response = await client.get("/metrics")
    after = parse(after_response.text)

    grew = total(after, "ums_http_requests_total", route=route) - total(
        before, "ums_http_requests_total", route=route
    )
    assert grew == 3
    assert (
        total(after, "ums_http_request_duration_seconds_count", route=route)
        - total(before, "ums_http_request_duration_seconds_count", route=route)
        == 3
    )
    assert value(after, "ums_http_requests_total", method="GET", route="unmatched",
                 status="404") > value(before, "ums_http_requests_total", method="GET",
                                       route="unmatched", status="404")  # fmt: skip
    assert total(after, "ums_http_requests_total", method="other") > total(
        before, "ums_http_requests_total", method="other"
    )
    for raw in [*ids, stray, "BREW"]:
        assert raw not in after_response.text


async def test_an_overload_rejection_is_counted_and_metrics_are_never_refused(
    make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_app(make_settings(METRICS="open", MAX_REQUESTS_IN_FLIGHT=1)) as (
        app,
        client,
    ):
        user = await register(client)
        auth = bearer(await login(client, user["email"]))
        before = await scrape(client)
        cache = app_services(app).security.cache
        release = asyncio.Event()
        real_read = cache.get_auth

        async def held_read(*args: Any) -> Any:
            await release.wait()
            return await real_read(*args)

        monkeypatch.setattr(cache, "get_auth", held_read)
        held = asyncio.ensure_future(client.get("/api/v1/users/me", headers=auth))
        await eventually(lambda: app.state.load.in_flight == 1)
        try:
            assert (await client.get("/api/v1/users/me", headers=auth)).status_code == 503
            # The one place is taken, and the scrape is still answered, and sees it taken.
            during = await scrape(client)
        finally:
            release.set()
        assert (await held).status_code == 200
        assert value(during, "ums_http_requests_in_flight") >= 1
        assert value(during, "ums_http_overload_rejections_total") == (
            value(before, "ums_http_overload_rejections_total") + 1
        )
        after = await scrape(client)
        assert value(after, "ums_http_requests_in_flight") == value(
            before, "ums_http_requests_in_flight"
        )


# --- sign-in --------------------------------------------------------------------------------------


async def _token(client: httpx.AsyncClient, **form: str) -> httpx.Response:
    return await client.post(TOKEN_URL, data=form)


async def test_logins_by_outcome_lockouts_and_tokens_by_grant(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(
        METRICS="open", LOCKOUT_FAILURE_THRESHOLD=2, LOCKOUT_WAIT_INCREMENT_SECONDS=60
    )
    async with running_app(settings) as (_, client):
        user = await register(client)
        before = await scrape(client)
        tokens = await login(client, user["email"])
        refreshed = await _token(
            client, grant_type="refresh_token", refresh_token=tokens["refresh_token"]
        )
        assert refreshed.status_code == 200
        unknown = await _token(
            client, grant_type="password", username=unique_email(), password=PASSWORD
        )
        assert unknown.status_code == 400
        # Two wrong passwords: the second reaches the threshold and locks this address out.
        for _ in range(2):
            wrong = await _token(
                client, grant_type="password", username=user["email"], password="wrong" * 3
            )
            assert wrong.status_code == 400
        locked = await _token(
            client, grant_type="password", username=user["email"], password=PASSWORD
        )
        assert locked.status_code == 429
        after_response = await client.get("/metrics")
        after = parse(after_response.text)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("ums_logins_total", outcome="success") == 1
    assert moved("ums_logins_total", outcome="unknown_user") == 1
    assert moved("ums_logins_total", outcome="bad_password") == 2
    assert moved("ums_logins_total", outcome="rate_limited") == 1
    assert moved("ums_login_lockouts_total") == 1
    assert moved("ums_tokens_issued_total", grant_type="password") == 1
    assert moved("ums_tokens_issued_total", grant_type="refresh_token") == 1
    # Nothing a caller sent or was given is in the page.
    for secret in (user["email"], PASSWORD, tokens["access_token"], tokens["refresh_token"]):
        assert secret not in after_response.text


async def test_client_credentials_are_counted_by_grant(
    make_settings: SettingsFactory, clean_db: None
) -> None:
    email = unique_email("admin")
    settings = make_settings(
        METRICS="open", FIRST_ADMIN_EMAIL=email, FIRST_ADMIN_PASSWORD=ADMIN_PASSWORD
    )
    async with running_app(settings) as (_, client):
        admin = bearer(await login(client, email, ADMIN_PASSWORD))
        created = await client.post(
            "/api/v1/clients",
            json={
                "name": "Metrics machine",
                "redirect_uris": [],
                "grant_types": ["client_credentials"],
                "scopes": ["openid"],
            },
            headers=admin,
        )
        assert created.status_code == 201, created.text
        machine = created.json()
        before = await scrape(client)
        issued = await _token(
            client,
            grant_type="client_credentials",
            client_id=machine["client_id"],
            client_secret=machine["client_secret"],
        )
        assert issued.status_code == 200, issued.text
        after_response = await client.get("/metrics")
        after = parse(after_response.text)
    grant = {"grant_type": "client_credentials"}
    assert value(after, "ums_tokens_issued_total", **grant) == (
        value(before, "ums_tokens_issued_total", **grant) + 1
    )
    assert machine["client_id"] not in after_response.text
    assert machine["client_secret"] not in after_response.text


async def test_the_hashing_queue_depth(make_settings: SettingsFactory) -> None:
    async with running_app(make_settings(METRICS="open", PASSWORD_HASH_WORKERS=1)) as (
        app,
        client,
    ):
        hasher = app_services(app).security.hasher
        # The one hashing thread busy with a job that waits for the test; a hash then queues.
        gate = threading.Event()
        blocker = asyncio.ensure_future(hasher._run(gate.wait, 30))
        queued = asyncio.ensure_future(hasher.hash(PASSWORD))

        async def depth() -> float:
            return value(await scrape(client), "ums_password_hash_queue_depth")

        try:
            await eventually(lambda: _at_least(depth(), 1))
        finally:
            gate.set()
            await asyncio.gather(blocker, queued)
        assert await depth() == 0


async def _at_least(reading: Awaitable[float], floor: float) -> bool:
    return await reading >= floor


async def test_several_processes_without_the_shared_directory_are_warned_about(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    with caplog.at_level(logging.WARNING, logger="src.services.metrics"):
        async with running_app(make_settings(METRICS="open", WEB_CONCURRENCY=2)):
            pass
    assert any("PROMETHEUS_MULTIPROC_DIR" in r.getMessage() for r in caplog.records)


# --- dependencies, the limiter's fallback ---------------------------------------------------------


async def test_a_redis_outage_shows_in_the_gauges_and_the_limiter_fallback(
    make_settings: SettingsFactory, redis_process: RedisServer
) -> None:
    settings = make_settings(
        METRICS="open", REDIS_HOST="127.0.0.1", REDIS_PORT=redis_process.port, REDIS_DB=0
    )
    async with running_app(settings) as (_, client):
        user = await register(client)
        redis_up = {"dependency": "redis"}

        async def redis_is(expected: float) -> bool:
            return value(await scrape(client), "ums_dependency_up", **redis_up) == expected

        await eventually(lambda: redis_is(1), timeout=15)
        before = await scrape(client)
        assert value(before, "ums_rate_limiter_fallback", limiter="login") == 0
        assert total(before, "ums_dependency_check_duration_seconds_count", dependency="redis")

        await asyncio.to_thread(redis_process.stop)
        await eventually(lambda: redis_is(0), timeout=15)
        await login(client, user["email"])  # decided in process memory
        during = await scrape(client)
        assert value(during, "ums_rate_limiter_fallback", limiter="login") == 1
        assert value(during, "ums_rate_limiter_fallback_decisions_total", limiter="login") > value(
            before, "ums_rate_limiter_fallback_decisions_total", limiter="login"
        )
        assert total(
            during,
            "ums_dependency_check_duration_seconds_count",
            dependency="redis",
            outcome="down",
        )

        await asyncio.to_thread(redis_process.start)
        await eventually(lambda: redis_is(1), timeout=20)
        await login(client, user["email"])  # back on Redis
        after = await scrape(client)
        assert value(after, "ums_rate_limiter_fallback", limiter="login") == 0


async def test_the_database_check_of_health_is_recorded(
    metered: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, client = metered
    before = await scrape(client)
    assert (await client.get("/api/v1/health", headers=OPERATOR)).status_code == 200
    after = await scrape(client)
    assert value(after, "ums_dependency_up", dependency="database") == 1
    name, labels = "ums_dependency_check_duration_seconds_count", {"dependency": "database"}
    assert total(after, name, **labels) == total(before, name, **labels) + 1
    assert OPERATOR_TOKEN not in (await client.get("/metrics")).text


# --- events: outbox, relay, audit consumer --------------------------------------------------------


async def test_an_outbox_publish_through_the_broker(make_settings: SettingsFactory) -> None:
    settings = make_settings(
        METRICS="open",
        OUTBOX_POLL_INTERVAL=0.2,
        # A group of its own: no member left by another test's app delays the join.
        KAFKA_GROUP_ID=f"metrics-{uuid.uuid4().hex[:8]}",
        **FAST_GROUP_JOIN,
    )
    async with running_app(settings) as (app, client):
        before = await scrape(client)
        assert value(before, "ums_outbox_backlog_query_success") == 1
        assert ("ums_outbox_pending_events", frozenset()) in before
        relay = app_services(app).relay
        assert relay is not None
        published = relay.published_total
        await register(client)  # one user.registered (and a verification notice)
        await eventually(lambda: relay.published_total > published, timeout=30)
        after = await scrape(client)
        moved = value(after, "ums_relay_published_events_total") - value(
            before, "ums_relay_published_events_total"
        )
        assert moved >= 1
        assert (
            value(after, "ums_relay_publish_latency_seconds_count")
            - value(before, "ums_relay_publish_latency_seconds_count")
            == moved
        )
        assert value(after, "ums_outbox_oldest_pending_age_seconds") >= 0

        stored = value(before, "ums_audit_events_stored_total")

        async def audited() -> bool:
            return value(await scrape(client), "ums_audit_events_stored_total") > stored

        await eventually(audited, timeout=60, interval=0.3)

        async def caught_up() -> bool:
            samples = await scrape(client)
            return ("ums_audit_consumer_lag_records", frozenset()) in samples and value(
                samples, "ums_audit_consumer_lag_records"
            ) == 0

        await eventually(caught_up, timeout=30, interval=0.3)
        assert value(await scrape(client), "ums_dependency_up", dependency="kafka") == 1


async def test_a_failed_send_is_counted_and_the_retry_too(
    make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(
        METRICS="open",
        OUTBOX_POLL_INTERVAL=0.2,
        AUDIT_CONSUMER_ENABLED=False,
        RECONNECT_BACKOFF_INITIAL=0.1,
    )
    async with running_app(settings) as (app, client):
        services = app_services(app)
        relay = services.relay
        assert relay is not None
        manager = services.connections.kafka
        assert manager is not None
        real_send = manager.send_batch
        failures = [ConnectionError("broker said no")]

        async def flaky_send(*args: Any, **kwargs: Any) -> Any:
            if failures:
                raise failures.pop()
            return await real_send(*args, **kwargs)

        before = await scrape(client)
        monkeypatch.setattr(manager, "send_batch", flaky_send)
        published = relay.published_total
        await register(client)
        await eventually(lambda: relay.published_total > published, timeout=30)
        after = await scrape(client)
    assert value(after, "ums_relay_failed_events_total") > value(
        before, "ums_relay_failed_events_total"
    )
    assert value(after, "ums_relay_retried_events_total") > value(
        before, "ums_relay_retried_events_total"
    )


async def test_a_new_limiter_does_not_inherit_a_fallback_an_earlier_one_reported(
    make_settings: SettingsFactory,
) -> None:
    from src.services import metrics as service_metrics

    # What an app that shut down during a Redis outage leaves in this process.
    service_metrics.LIMITER_FALLBACK.labels("login").set(1)
    service_metrics.LIMITER_FALLBACK.labels("throttle").set(1)
    async with running_app(make_settings(METRICS="open")) as (_, client):
        scraped = await scrape(client)
        assert value(scraped, "ums_rate_limiter_fallback", limiter="login") == 0
        assert value(scraped, "ums_rate_limiter_fallback", limiter="throttle") == 0
