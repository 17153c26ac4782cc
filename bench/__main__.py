"""``make bench``: our costs as ratios against baselines measured in the same run.

Absolute numbers on a shared 2-core machine mean little; ratios against a baseline measured
moments before, on the same cores, do. Everything runs in-process over ASGI (no sockets), so the
figures are the application's own overhead.

- request overhead: our ``/health/live`` and an authenticated ``GET /users/me`` against a bare
  FastAPI route;
- login: token-endpoint logins per second against raw argon2id verifications per second with the
  same parameters and the same number of threads;
- JWT: signing with the key object loaded once against re-parsing PEM text each time;
- the account oracle (``bench/oracle.py``): password-reset requests for a known and an unknown
  address, timed with ``wrk`` against a real uvicorn process;
- start-up (``bench/startup.py``): launch to the first 200, with Redis and Kafka absent or silent.

Uses SQLite in a temporary folder and runs with Redis and Kafka as configured by the environment
(``REDIS_ENABLED=false KAFKA_ENABLED=false`` to leave them out).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jwt
from argon2 import PasswordHasher, Type
from asgi_lifespan import LifespanManager
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI

from bench import oracle, startup
from src.app.container import app_services
from src.config.settings import Settings
from src.db.session import upgrade_database
from src.main import create_app

PASSWORD = "bench-correct-horse-battery"
CONCURRENCY = 16


async def rate(call: Callable[[], Awaitable[object]], seconds: float, concurrency: int) -> float:
    """Calls per second, ``concurrency`` at a time, over about ``seconds``."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


def bare_app() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"status": "alive"}

    return app


async def best_of(runs: int, measure: Callable[[], Awaitable[float]]) -> float:
    return max([await measure() for _ in range(runs)])


async def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="ums-bench-"))
    database_url = f"sqlite+aiosqlite:///{workdir}/bench.db"
    await asyncio.to_thread(upgrade_database, database_url)
    settings = Settings(
        DATABASE_URL=database_url,
        DATA_DIR=workdir,
        ENVIRONMENT="development",
        LOG_LEVEL="WARNING",
        KAFKA_ENABLE_IDEMPOTENCE=False,
        LOGIN_RATE_LIMIT_PER_IP=10**9,
        LOCKOUT_ACCOUNT_THRESHOLD=10**9,
    )
    cores = os.cpu_count() or 1
    print(
        f"cores={cores} concurrency={CONCURRENCY} redis={settings.REDIS_ENABLED} "
        f"kafka={settings.KAFKA_ENABLED}"
    )

    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=30) as manager:
        ours = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://b"
        )
        bare = httpx.AsyncClient(transport=httpx.ASGITransport(app=bare_app()), base_url="http://b")

        email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
        response = await ours.post(
            "/api/v1/auth/register", json={"email": email, "password": PASSWORD}
        )
        response.raise_for_status()

        async def login() -> httpx.Response:
            reply = await ours.post(
                "/api/v1/auth/login",
                data={"grant_type": "password", "username": email, "password": PASSWORD},
            )
            reply.raise_for_status()
            return reply

        token = (await login()).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}

        async def bare_ping() -> None:
            (await bare.get("/ping")).raise_for_status()

        async def live() -> None:
            (await ours.get("/api/v1/health/live")).raise_for_status()

        async def me() -> None:
            (await ours.get("/api/v1/users/me", headers=headers)).raise_for_status()

        baseline = await best_of(3, lambda: rate(bare_ping, 2, CONCURRENCY))
        live_rate = await best_of(3, lambda: rate(live, 2, CONCURRENCY))
        me_rate = await best_of(3, lambda: rate(me, 2, CONCURRENCY))
        print(f"\nrequests/s   bare FastAPI route       {baseline:10.0f}  (baseline)")
        for label, value in (("GET /health/live", live_rate), ("GET /users/me (JWT)", me_rate)):
            print(f"requests/s   {label:<24} {value:10.0f}  ratio {value / baseline:.2f}")

        # Raw argon2id verification with our parameters on the same number of threads.
        hasher = PasswordHasher(
            time_cost=settings.ARGON2_TIME_COST,
            memory_cost=settings.ARGON2_MEMORY_COST,
            parallelism=settings.ARGON2_PARALLELISM,
            type=Type.ID,
        )
        stored = hasher.hash(PASSWORD)
        workers = settings.PASSWORD_HASH_WORKERS or cores
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=workers) as pool:

            async def raw_verify() -> None:
                await loop.run_in_executor(pool, hasher.verify, stored, PASSWORD)

            raw = await best_of(2, lambda: rate(raw_verify, 3, workers * 2))
        logins = await best_of(2, lambda: rate(login, 3, workers * 2))
        print(f"\nper second   raw argon2id verify      {raw:10.1f}  (baseline, {workers} threads)")
        print(f"per second   POST /auth/login         {logins:10.1f}  ratio {logins / raw:.2f}")

        await ours.aclose()
        await bare.aclose()

    # JWT signing: loaded key object vs PEM text (PyJWT re-parses PEM on every call).
    key = app_services(app).security.tokens  # codec built at start-up, key already loaded
    private = key.signing_key.private_key
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    claims = {"sub": "x", "exp": int(time.time()) + 60}
    algorithm = key.signing_key.algorithm

    def per_call(fn: Callable[[], object], n: int) -> float:
        timings = []
        for _ in range(n):
            started = time.perf_counter()
            fn()
            timings.append(time.perf_counter() - started)
        return statistics.median(timings) * 1000

    loaded_ms = per_call(lambda: jwt.encode(claims, private, algorithm=algorithm), 200)
    pem_ms = per_call(lambda: jwt.encode(claims, pem, algorithm=algorithm), 30)
    print(f"\nms per token sign, key loaded once   {loaded_ms:8.3f}  (ours)")
    print(f"ms per token sign, PEM text          {pem_ms:8.3f}  {pem_ms / loaded_ms:.0f}x slower")

    await asyncio.to_thread(oracle.run)
    await asyncio.to_thread(startup.run)


if __name__ == "__main__":
    asyncio.run(main())
