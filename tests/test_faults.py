"""Losing Redis or the broker while the service runs, and getting it back without a restart.

The servers are harness-owned processes stopped and restarted on the same port mid-test; the only
proof that the redis-py pool and the aiokafka producer recover after a restart.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from fastapi import FastAPI

from src.services.connections import connections_of, get_kafka_from_app, get_redis_from_app
from src.services.kafka import KafkaUnavailableError
from tests.conftest import SettingsFactory
from tests.support.app import (
    OPERATOR,
    assert_no_leftover_tasks,
    bounded_app,
    eventually,
    running_app,
)
from tests.support.servers import KafkaBroker, RedisServer

HEALTH = "/api/v1/health"


async def _status_code(client: httpx.AsyncClient, name: str) -> int:
    return (await client.get(f"{HEALTH}/{name}")).status_code


async def _wait_for(client: httpx.AsyncClient, app: FastAPI, name: str, up: bool) -> None:
    """Both the live check and the supervisor's flag agree that ``name`` is up (or down)."""
    expected = 200 if up else 503

    async def agreed() -> bool:
        flag = getattr(connections_of(app), f"{name}_available")
        return flag is up and await _status_code(client, name) == expected

    await eventually(agreed, timeout=10)


async def test_redis_lost_and_restarted_while_running(
    make_settings: SettingsFactory, redis_process: RedisServer
) -> None:
    settings = make_settings(REDIS_HOST="127.0.0.1", REDIS_PORT=redis_process.port, REDIS_DB=0)
    async with running_app(settings) as (app, client):
        await _wait_for(client, app, "redis", up=True)
        redis = get_redis_from_app(app)
        assert redis is not None
        await redis.set("faults:before", "1")

        # Stopped from a thread so the app's event loop keeps running while Redis goes away.
        await asyncio.to_thread(redis_process.stop)
        await _wait_for(client, app, "redis", up=False)
        assert get_redis_from_app(app) is None
        body = (await client.get(HEALTH, headers=OPERATOR)).json()
        assert body["status"] == "degraded" and body["checks"]["redis"]["error"]

        await asyncio.to_thread(redis_process.start)
        await _wait_for(client, app, "redis", up=True)
        # The same pooled client, whose old sockets died with the server, works again.
        assert get_redis_from_app(app) is redis
        await redis.set("faults:after", "2")
        assert await redis.get("faults:after") == "2"
        # A restarted Redis without persistence starts empty: the cache is cold, not wrong.
        assert await redis.get("faults:before") is None
        assert (await client.get(HEALTH)).json()["status"] == "healthy"


async def test_broker_lost_and_restarted_while_running(
    make_settings: SettingsFactory, kafka_process: KafkaBroker
) -> None:
    settings = make_settings(KAFKA_BOOTSTRAP_SERVERS=kafka_process.bootstrap)
    topic = f"faults-{uuid.uuid4().hex[:8]}"
    async with running_app(settings) as (app, client):
        await _wait_for(client, app, "kafka", up=True)
        kafka = get_kafka_from_app(app)
        assert kafka is not None
        before = await kafka.send(topic, {"n": 1}, key="k", timeout=10)
        assert before.offset >= 0

        # tansu lingers on SIGTERM while clients are connected; a crash is the harsher case anyway.
        await asyncio.to_thread(kafka_process.kill)
        await _wait_for(client, app, "kafka", up=False)
        assert get_kafka_from_app(app) is None
        # A send while the broker is away fails within its bound instead of hanging.
        with pytest.raises(KafkaUnavailableError):
            await kafka.send(topic, {"n": 2}, key="k", timeout=1)

        await asyncio.to_thread(kafka_process.start)
        await _wait_for(client, app, "kafka", up=True)
        recovered = get_kafka_from_app(app)
        assert recovered is not None and recovered is kafka
        # tansu kept nothing, so the topic is created afresh; the producer must cope with that.
        after = await recovered.send(topic, {"n": 3}, key="k", timeout=10)
        assert after.topic == topic and after.offset >= 0
        assert (await client.get(HEALTH)).json()["status"] == "healthy"


async def test_both_lost_and_restarted_together(
    make_settings: SettingsFactory, redis_process: RedisServer, kafka_process: KafkaBroker
) -> None:
    settings = make_settings(
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=redis_process.port,
        REDIS_DB=0,
        KAFKA_BOOTSTRAP_SERVERS=kafka_process.bootstrap,
    )
    async with running_app(settings) as (app, client):
        assert (await client.get(HEALTH)).json()["status"] == "healthy"
        await asyncio.to_thread(redis_process.stop)
        await asyncio.to_thread(kafka_process.kill)
        await _wait_for(client, app, "redis", up=False)
        await _wait_for(client, app, "kafka", up=False)
        # Losing both costs speed, never the service: it stays up and ready.
        assert (await client.get(HEALTH)).status_code == 200
        assert (await client.get(f"{HEALTH}/ready")).status_code == 200

        await asyncio.to_thread(redis_process.start)
        await asyncio.to_thread(kafka_process.start)
        await _wait_for(client, app, "redis", up=True)
        await _wait_for(client, app, "kafka", up=True)
        kafka = get_kafka_from_app(app)
        assert kafka is not None
        assert (await kafka.send("faults-both", {"ok": True}, key="k", timeout=10)).offset >= 0


async def test_shut_down_with_the_broker_gone_and_a_message_unsent_is_bounded(
    make_settings: SettingsFactory, kafka_process: KafkaBroker
) -> None:
    """aiokafka's ``stop()`` flushes pending batches; with the broker gone it must not hang."""
    settings = make_settings(KAFKA_BOOTSTRAP_SERVERS=kafka_process.bootstrap)
    before = asyncio.all_tasks()
    # Shut-down is bounded by the producer's stop bound (2 x KAFKA_CONNECT_TIMEOUT), not by
    # Kafka's 40 s: bounded_app fails the test if it hangs.
    async with bounded_app(settings) as (app, client):
        await _wait_for(client, app, "kafka", up=True)
        kafka = connections_of(app).kafka
        assert kafka is not None
        await kafka.send("faults-unsent", {"n": 1}, key="k", timeout=10)
        await asyncio.to_thread(kafka_process.kill)
        with pytest.raises(KafkaUnavailableError):
            await kafka.send("faults-unsent", {"n": 2}, key="k", timeout=0.5)
    # Cutting stop() short must not leave its sender retrying for the life of the process.
    await assert_no_leftover_tasks(before)


async def test_no_task_outlives_the_app_despite_concurrent_health_checks(
    make_settings: SettingsFactory, redis_process: RedisServer, kafka_process: KafkaBroker
) -> None:
    """Health requests and the supervisor probe the same clients at once, up and down alike."""
    settings = make_settings(
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=redis_process.port,
        REDIS_DB=0,
        KAFKA_BOOTSTRAP_SERVERS=kafka_process.bootstrap,
    )
    before = asyncio.all_tasks()

    async def burst(client: httpx.AsyncClient) -> None:
        await asyncio.gather(
            *(client.get(f"{HEALTH}/{name}") for name in ("kafka", "redis", "") for _ in range(4))
        )

    async with running_app(settings) as (app, client):
        await burst(client)
        await asyncio.to_thread(kafka_process.kill)
        await asyncio.to_thread(redis_process.stop)
        await _wait_for(client, app, "kafka", up=False)
        for _ in range(3):
            await burst(client)
        await asyncio.to_thread(kafka_process.start)
        await asyncio.to_thread(redis_process.start)
        await _wait_for(client, app, "kafka", up=True)
        await _wait_for(client, app, "redis", up=True)
        await burst(client)
    await assert_no_leftover_tasks(before)
