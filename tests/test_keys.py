"""The signing key ring in PostgreSQL: seeding, rotation, expiry, concurrency; the refresh in a
running app; two service processes and the ``keys`` command; the JWKS cache header.

Time is injected (``now``), never waited for. Every test starts and ends with an empty ring, so
the next app on the shared database seeds it again with the run's key, as other tests expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import jwt
import pytest
import pytest_asyncio
from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.app.container import app_services
from src.app.wiring import StartupError
from src.auth.jwt import (
    AccessTokenCodec,
    SigningKey,
    TokenError,
    generate_signing_key,
    load_signing_key,
)
from src.auth.keys import (
    KeyRingError,
    Rotation,
    RotationRefused,
    ensure_keys,
    iso,
    list_keys,
    load_keys,
    promotion_delay,
    prune_expired,
    retirement_period,
    rotate,
)
from src.cli import main as cli_main
from src.config.settings import Settings
from src.db.models import SigningKeyRecord
from src.db.session import create_engine, create_sessionmaker
from src.db.types import utcnow
from src.security.sealing import Sealer, UnsealError, load_sealer, new_key
from tests.conftest import SettingsFactory
from tests.support.app import BOUND, bearer, eventually, login, register, running_app
from tests.support.auth import QUICK_SETTINGS
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
USER_ID = "0b0c4f8e-7a51-4a8e-9a63-5a2f1f0c0001"
SESSION_ID = "0b0c4f8e-7a51-4a8e-9a63-5a2f1f0c0002"
Sessions = async_sessionmaker[AsyncSession]


def _dsn(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _delete_keys(database_url: str) -> None:
    conn = await asyncpg.connect(_dsn(database_url))
    try:
        await conn.execute("DELETE FROM signing_keys")
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def empty_ring(database_url: str) -> AsyncIterator[None]:
    await _delete_keys(database_url)
    yield
    await _delete_keys(database_url)


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings()


@pytest_asyncio.fixture
async def sessions(settings: Settings, empty_ring: None) -> AsyncIterator[Sessions]:
    engine = create_engine(settings)
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def sealer() -> Sealer:
    return Sealer([secrets.token_bytes(32)])


@pytest.fixture
def seed(settings: Settings) -> SigningKey:
    return load_signing_key(settings)  # the run's RSA key (JWT_PRIVATE_KEY_FILE)


async def _ensure(
    sessions: Sessions,
    sealer: Sealer,
    settings: Settings,
    seed: SigningKey,
    now: datetime | None = None,
) -> None:
    async with sessions() as db:
        await ensure_keys(db, sealer, settings, seed, now=now)


async def _load(
    sessions: Sessions, sealer: Sealer, now: datetime | None = None
) -> tuple[SigningKey, list[SigningKey]]:
    async with sessions() as db:
        return await load_keys(db, sealer, now=now)


async def _rotate(
    sessions: Sessions,
    sealer: Sealer,
    settings: Settings,
    *,
    force: bool = False,
    now: datetime | None = None,
) -> Rotation:
    async with sessions() as db:
        return await rotate(db, sealer, settings, force=force, now=now)


async def _states(sessions: Sessions) -> dict[str, list[str]]:
    async with sessions() as db:
        keys = await list_keys(db)
    found: dict[str, list[str]] = {"active": [], "next": [], "retired": []}
    for key in keys:
        found[key.state].append(key.kid)
    return found


def _every_kid(states: dict[str, list[str]]) -> set[str]:
    return {kid for kids in states.values() for kid in kids}


def _kids(jwks: dict[str, list[dict[str, str]]]) -> list[str]:
    return [jwk["kid"] for jwk in jwks["keys"]]


def _issue(codec: AccessTokenCodec) -> str:
    return codec.issue(uuid.UUID(USER_ID), uuid.UUID(SESSION_ID), "user")[0]


async def _signed_in_token(client: httpx.AsyncClient) -> str:
    token: str = (await login(client, (await register(client))["email"]))["access_token"]
    return token


# --- seeding -------------------------------------------------------------------------------------


async def test_the_first_start_stores_the_seed_sealed_and_publishes_a_next_key(
    sessions: Sessions, sealer: Sealer, settings: Settings, seed: SigningKey, database_url: str
) -> None:
    now = utcnow()
    await _ensure(sessions, sealer, settings, seed, now=now)
    await _ensure(sessions, sealer, settings, seed, now=now + timedelta(hours=1))  # idempotent

    async with sessions() as db:
        keys = await list_keys(db)
    assert [(key.state, key.algorithm) for key in keys] == [("active", "RS256"), ("next", "RS256")]
    active, upcoming = keys
    assert active.kid == seed.kid
    assert (active.created_at, active.activated_at) == (now, now)
    assert (upcoming.created_at, upcoming.activated_at) == (now, None)

    conn = await asyncpg.connect(_dsn(database_url))
    try:
        rows = await conn.fetch("SELECT kid, private_key FROM signing_keys")
    finally:
        await conn.close()
    for row in rows:
        assert "PRIVATE" not in row["private_key"] and row["private_key"].startswith("v1.")
        # Bound to its kid: the sealed value opens for its own row only.
        assert sealer.unseal(row["private_key"], row["kid"].encode()).startswith(b"-----BEGIN")
        with pytest.raises(UnsealError):
            sealer.unseal(row["private_key"], b"another kid")
    sealed_seed = next(row["private_key"] for row in rows if row["kid"] == seed.kid)
    assert sealer.unseal(sealed_seed, seed.kid.encode()) == seed.private_pem()


async def test_concurrent_first_starts_agree_on_one_active_key(
    sessions: Sessions, sealer: Sealer, settings: Settings
) -> None:
    seeds = [generate_signing_key("ES256") for _ in range(5)]
    await asyncio.gather(*(_ensure(sessions, sealer, settings, seed) for seed in seeds))
    states = await _states(sessions)
    assert len(states["active"]) == 1 and len(states["next"]) == 1 and not states["retired"]
    assert states["active"][0] in {seed.kid for seed in seeds}
    active, published = await _load(sessions, sealer)
    assert active.kid == states["active"][0]
    assert [key.kid for key in published] == [states["active"][0], states["next"][0]]


async def test_production_refuses_keys_it_cannot_open(
    sessions: Sessions, sealer: Sealer, make_settings: SettingsFactory, seed: SigningKey
) -> None:
    production = make_settings(ENVIRONMENT="production")
    await _ensure(sessions, sealer, production, seed)
    before = await _states(sessions)
    other = Sealer([secrets.token_bytes(32)])
    await _ensure(sessions, other, production, generate_signing_key("ES256"))
    assert await _states(sessions) == before  # nothing replaced behind the operator's back
    with pytest.raises(KeyRingError, match="does not open with ENCRYPTION_KEY") as excinfo:
        await _load(sessions, other)
    assert seed.kid in str(excinfo.value)


async def test_outside_production_a_ring_sealed_with_another_key_is_replaced(
    sessions: Sessions,
    sealer: Sealer,
    settings: Settings,
    seed: SigningKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Development keeps ENCRYPTION_KEY under DATA_DIR: another checkout on the same database
    # cannot open the ring, and starts a new one rather than refusing to start.
    await _ensure(sessions, sealer, settings, seed)
    old = await _states(sessions)
    other, new_seed = Sealer([secrets.token_bytes(32)]), generate_signing_key("ES256")
    caplog.set_level(logging.WARNING, logger="src.auth.keys")
    await _ensure(sessions, other, settings, new_seed)
    states = await _states(sessions)
    assert states["active"] == [new_seed.kid]
    assert not set(old["active"] + old["next"]) & set(states["active"] + states["next"])
    assert sum("sealed with another ENCRYPTION_KEY" in r.getMessage() for r in caplog.records) == 2
    assert (await _load(sessions, other))[0].kid == new_seed.kid


# --- rotation ------------------------------------------------------------------------------------


async def test_tokens_from_before_a_rotation_verify_after_it(
    sessions: Sessions, sealer: Sealer, settings: Settings, seed: SigningKey
) -> None:
    start = utcnow()
    await _ensure(sessions, sealer, settings, seed, now=start)
    codec = AccessTokenCodec(seed, settings)
    codec.set_keys(*await _load(sessions, sealer, now=start))
    next_kid = (await _states(sessions))["next"][0]
    # The next key is published before it signs anything.
    assert _kids(codec.jwks()) == [seed.kid, next_kid]
    before = _issue(codec)

    at = start + promotion_delay(settings)
    rotation = await _rotate(sessions, sealer, settings, now=at)
    assert (rotation.active.kid, rotation.retired.kid) == (next_kid, seed.kid)
    assert rotation.next.kid not in (seed.kid, next_kid)
    assert rotation.retired.expires_at == at + retirement_period(settings)

    codec.set_keys(*await _load(sessions, sealer, now=at))
    after = _issue(codec)
    assert jwt.get_unverified_header(after)["kid"] == next_kid
    assert codec.decode(before).sub == codec.decode(after).sub == USER_ID
    assert _kids(codec.jwks()) == [next_kid, rotation.next.kid, seed.kid]


async def test_rotation_waits_until_every_verifier_can_know_the_next_key(
    sessions: Sessions, sealer: Sealer, settings: Settings, seed: SigningKey
) -> None:
    # JWKS_MAX_AGE_SECONDS (300) + SIGNING_KEY_REFRESH_SECONDS (60) by default.
    assert promotion_delay(settings) == timedelta(seconds=360)
    start = utcnow()
    await _ensure(sessions, sealer, settings, seed, now=start)
    before = await _states(sessions)

    too_soon = start + promotion_delay(settings) - timedelta(seconds=1)
    with pytest.raises(RotationRefused) as excinfo:
        await _rotate(sessions, sealer, settings, now=too_soon)
    message = str(excinfo.value)
    assert before["next"][0] in message
    assert iso(start + promotion_delay(settings)) in message and "--force" in message
    assert await _states(sessions) == before

    forced = await _rotate(sessions, sealer, settings, force=True, now=too_soon)
    assert forced.active.kid == before["next"][0]
    assert (await _states(sessions))["active"] == before["next"]


async def test_a_retired_key_leaves_the_jwks_when_its_last_token_expires(
    sessions: Sessions, sealer: Sealer, make_settings: SettingsFactory, seed: SigningKey
) -> None:
    settings = make_settings(
        ACCESS_TOKEN_EXPIRE_MINUTES=5, ID_TOKEN_EXPIRE_MINUTES=30, JWT_LEEWAY_SECONDS=5
    )
    start = utcnow()
    await _ensure(sessions, sealer, settings, seed, now=start)
    codec = AccessTokenCodec(seed, settings)
    token = _issue(codec)
    rotation = await _rotate(sessions, sealer, settings, force=True, now=start)
    # The longer lifetime (ID tokens here), the leeway, and one refresh interval (60 s) during
    # which an instance that has not re-read the ring yet still signs with the old key.
    expires = start + timedelta(minutes=30, seconds=5 + 60)
    assert rotation.retired.kid == seed.kid and rotation.retired.expires_at == expires

    codec.set_keys(*await _load(sessions, sealer, now=expires - timedelta(seconds=1)))
    assert seed.kid in _kids(codec.jwks())
    assert codec.decode(token)
    codec.set_keys(*await _load(sessions, sealer, now=expires))
    assert seed.kid not in _kids(codec.jwks())
    with pytest.raises(TokenError, match="unknown signing key"):
        codec.decode(token)

    async with sessions() as db:
        assert await prune_expired(db, now=expires - timedelta(seconds=1)) == []
        assert await prune_expired(db, now=expires) == [seed.kid]
    assert seed.kid not in (await _states(sessions))["retired"]


async def test_a_rotation_deletes_expired_keys(
    sessions: Sessions, sealer: Sealer, settings: Settings, seed: SigningKey
) -> None:
    start = utcnow()
    await _ensure(sessions, sealer, settings, seed, now=start)
    first = await _rotate(sessions, sealer, settings, force=True, now=start)
    later = first.retired.expires_at
    assert later is not None
    second = await _rotate(sessions, sealer, settings, force=True, now=later)
    states = await _states(sessions)
    assert states["retired"] == [second.retired.kid]  # the first retired key is gone
    assert seed.kid not in _every_kid(states)


async def test_concurrent_forced_rotations_leave_one_active_key_and_lose_none(
    sessions: Sessions, sealer: Sealer, settings: Settings, seed: SigningKey
) -> None:
    await _ensure(sessions, sealer, settings, seed)
    before = await _states(sessions)
    rotations = await asyncio.gather(
        *(_rotate(sessions, sealer, settings, force=True) for _ in range(5))
    )
    states = await _states(sessions)
    assert len(states["active"]) == 1 and len(states["next"]) == 1
    assert len(states["retired"]) == 5
    assert set(before["active"] + before["next"]) <= _every_kid(states)
    # They took turns: each promoted the key the one before it published.
    assert len({rotation.active.kid for rotation in rotations}) == 5
    assert {rotation.retired.kid for rotation in rotations} == set(states["retired"])


async def test_concurrent_rotations_promote_a_next_key_once(
    sessions: Sessions, sealer: Sealer, settings: Settings, seed: SigningKey
) -> None:
    start = utcnow()
    await _ensure(sessions, sealer, settings, seed, now=start)
    at = start + promotion_delay(settings)
    outcomes = await asyncio.gather(
        *(_rotate(sessions, sealer, settings, now=at) for _ in range(5)), return_exceptions=True
    )
    assert sum(isinstance(outcome, Rotation) for outcome in outcomes) == 1
    # The others find the freshly published next key too young to sign.
    assert sum(isinstance(outcome, RotationRefused) for outcome in outcomes) == 4
    states = await _states(sessions)
    assert (len(states["active"]), len(states["next"]), len(states["retired"])) == (1, 1, 1)


async def test_keys_of_another_algorithm_keep_verifying_with_their_own(
    sessions: Sessions, sealer: Sealer, make_settings: SettingsFactory, seed: SigningKey
) -> None:
    settings = make_settings()
    await _ensure(sessions, sealer, settings, seed)
    codec = AccessTokenCodec(seed, settings)
    codec.set_keys(*await _load(sessions, sealer))
    rs256_token = _issue(codec)

    # JWT_ALGORITHM changes: new keys are ES256, the RS256 ones go through the ring as usual.
    es256 = make_settings(JWT_ALGORITHM="ES256")
    first = await _rotate(sessions, sealer, es256, force=True)
    assert (first.active.algorithm, first.next.algorithm) == ("RS256", "ES256")
    second = await _rotate(sessions, sealer, es256, force=True)
    assert second.active.algorithm == "ES256"

    codec.set_keys(*await _load(sessions, sealer))
    es256_token = _issue(codec)
    assert jwt.get_unverified_header(es256_token)["alg"] == "ES256"
    assert codec.decode(rs256_token) and codec.decode(es256_token)
    algorithms = {jwk["kid"]: jwk["alg"] for jwk in codec.jwks()["keys"]}
    assert algorithms[seed.kid] == "RS256" and algorithms[second.active.kid] == "ES256"
    # An RS256 signature under the ES256 key's kid is refused.
    claims = jwt.decode(rs256_token, options={"verify_signature": False})
    relabelled = jwt.encode(
        claims, seed.private_key, algorithm="RS256", headers={"kid": second.active.kid}
    )
    with pytest.raises(TokenError, match="algorithm not allowed"):
        codec.decode(relabelled)


# --- in a running app ----------------------------------------------------------------------------


async def test_the_app_signs_with_the_ring_and_publishes_it_with_its_cache_header(
    make_settings: SettingsFactory, empty_ring: None
) -> None:
    settings = make_settings(**QUICK_SETTINGS, JWKS_MAX_AGE_SECONDS=123)
    async with running_app(settings) as (app, client):
        response = await client.get("/.well-known/jwks.json")
        assert response.status_code == 200
        assert response.headers["cache-control"] == "public, max-age=123"
        kids = _kids(response.json())
        tokens = await login(client, (await register(client))["email"])
        assert jwt.get_unverified_header(tokens["access_token"])["kid"] == kids[0]
        assert kids[0] == load_signing_key(settings).kid  # the seed started the empty ring
        assert len(kids) == 2  # and the next key is published
        assert kids == _kids(app_services(app).security.tokens.jwks())


async def test_a_failed_refresh_keeps_the_keys_and_a_later_one_picks_up_a_rotation(
    make_settings: SettingsFactory, empty_ring: None, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(**QUICK_SETTINGS, SIGNING_KEY_REFRESH_SECONDS=0.05)
    caplog.set_level(logging.INFO, logger="src.app.wiring")
    async with running_app(settings) as (app, client):
        services = app_services(app)
        tokens, sealer = services.security.tokens, services.security.sealer
        active = tokens.signing_key
        jwks = (await client.get("/.well-known/jwks.json")).json()
        next_kid = _kids(jwks)[1]
        before = await _signed_in_token(client)
        async with services.sessionmaker() as db:
            # A key this instance cannot open (sealed for another row): every refresh now fails.
            stranger = generate_signing_key("ES256")
            db.add(
                SigningKeyRecord(
                    kid=stranger.kid,
                    algorithm="ES256",
                    state="retired",
                    private_key=sealer.seal(stranger.private_pem(), b"another kid"),
                    created_at=utcnow(),
                    expires_at=utcnow() + timedelta(hours=1),
                )
            )
            await db.commit()

        def warned() -> bool:
            return any("Signing keys not refreshed" in r.getMessage() for r in caplog.records)

        await eventually(warned, timeout=10, interval=0.02)
        assert tokens.signing_key.kid == active.kid
        assert (await client.get("/.well-known/jwks.json")).json() == jwks
        assert (await client.get("/api/v1/users/me", headers=bearer(before))).status_code == 200
        assert stranger.kid in caplog.text and "PRIVATE" not in caplog.text

        # The broken key dropped, and the ring rotated by another instance: this one follows.
        async with services.sessionmaker() as db:
            await db.execute(delete(SigningKeyRecord).where(SigningKeyRecord.kid == stranger.kid))
            await db.commit()
            rotation = await rotate(db, sealer, settings, force=True)
        assert rotation.active.kid == next_kid

        await eventually(lambda: tokens.signing_key.kid == rotation.active.kid, timeout=10)
        after = await _signed_in_token(client)
        assert jwt.get_unverified_header(after)["kid"] == rotation.active.kid
        for token in (before, after):
            assert (await client.get("/api/v1/users/me", headers=bearer(token))).status_code == 200


def _startup_error(exc: BaseException) -> StartupError | None:
    """The ``StartupError`` inside whatever the lifespan machinery wrapped it in."""
    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_error(inner)
            if found is not None:
                return found
    cause = exc.__cause__ or exc.__context__
    return _startup_error(cause) if cause is not None else None


async def test_production_does_not_start_with_keys_it_cannot_open(
    sessions: Sessions, sealer: Sealer, make_settings: SettingsFactory, seed: SigningKey
) -> None:
    production = make_settings(**QUICK_SETTINGS, ENVIRONMENT="production", ENCRYPTION_KEY=new_key())
    await _ensure(sessions, sealer, production, seed)  # sealed with another ENCRYPTION_KEY
    with pytest.raises(BaseException) as excinfo:  # whatever wraps it: inspected below
        async with asyncio.timeout(BOUND), running_app(production):
            pass
    error = _startup_error(excinfo.value)
    assert error is not None, repr(excinfo.value)
    assert str(error).startswith("signing keys unavailable: signing key ")
    assert "does not open with ENCRYPTION_KEY" in str(error)


# --- processes: two service instances, and the keys command --------------------------------------


def _process_env(
    database_url: str, jwt_key_file: Path, data_dir: Path, encryption_key: str, **extra: str
) -> dict[str, str]:
    """A service or command process on the test database: no Redis, no Kafka, cheap hashing."""
    ours = ("DATABASE_", "ENCRYPTION_", "JWT_", "JWKS_", "SIGNING_", "REDIS_", "KAFKA_", "FIRST_")
    env = {name: value for name, value in os.environ.items() if not name.startswith(ours)}
    env.update(
        PYTHONPATH=str(ROOT),
        ENVIRONMENT="test",
        DATABASE_URL=database_url,
        DATA_DIR=str(data_dir),
        JWT_PRIVATE_KEY_FILE=str(jwt_key_file),
        ENCRYPTION_KEY=encryption_key,
        REDIS_ENABLED="false",
        KAFKA_ENABLED="false",
        ARGON2_TIME_COST="1",
        ARGON2_MEMORY_COST="8192",
        LOG_LEVEL="INFO",
        **extra,
    )
    return env


def _keys_command(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # From a scratch directory: a developer's .env must not change what is tested.
    return subprocess.run(
        [sys.executable, "-m", "src", "keys", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@contextlib.contextmanager
def _service(env: dict[str, str], cwd: Path, log_path: Path) -> Iterator[httpx.AsyncClient]:
    """A real uvicorn process; its output goes to ``log_path`` (printed when a test fails)."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "src.main:app", "--host", "127.0.0.1"]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
    client.extensions = {"process": process}  # type: ignore[attr-defined]
    try:
        yield client
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        print(f"--- {log_path.name}\n{log_path.read_text(errors='replace')[-3000:]}")


async def _live(client: httpx.AsyncClient) -> bool:
    process: subprocess.Popen[bytes] = client.extensions["process"]  # type: ignore[attr-defined]
    assert process.poll() is None, "the service exited"
    try:
        return (await client.get("/api/v1/health/live")).status_code == 200
    except httpx.TransportError:
        return False


async def _jwks_kids(client: httpx.AsyncClient) -> list[str]:
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    return _kids(response.json())


async def _me(client: httpx.AsyncClient, token: str) -> int:
    return (await client.get("/api/v1/users/me", headers=bearer(token))).status_code


def _kid(token: str) -> str:
    kid: str = jwt.get_unverified_header(token)["kid"]
    return kid


async def test_two_service_processes_agree_on_the_key_and_follow_a_rotation(
    database_url: str, jwt_key_file: Path, tmp_path: Path, empty_ring: None
) -> None:
    encryption_key = new_key()  # shared, as in any deployment with more than one instance

    def env(name: str) -> dict[str, str]:
        # DATA_DIRs of their own: what they share is the database, not files.
        return _process_env(
            database_url,
            jwt_key_file,
            tmp_path / name,
            encryption_key,
            SIGNING_KEY_REFRESH_SECONDS="0.2",
        )

    with (
        _service(env("a"), tmp_path, tmp_path / "a.log") as a,
        _service(env("b"), tmp_path, tmp_path / "b.log") as b,
    ):
        async with a, b:
            await eventually(lambda: _live(a), timeout=60, interval=0.2)
            await eventually(lambda: _live(b), timeout=60, interval=0.2)
            published = await _jwks_kids(a)
            assert len(published) == 2 and await _jwks_kids(b) == published
            email = (await register(a))["email"]
            token_a = (await login(a, email))["access_token"]
            token_b = (await login(b, email))["access_token"]
            assert _kid(token_a) == _kid(token_b) == published[0]
            assert await _me(b, token_a) == await _me(a, token_b) == 200

            done = await asyncio.to_thread(_keys_command, env("cli"), tmp_path, "rotate", "--force")
            assert done.returncode == 0, done.stderr
            active = re.search(r"^active\t(\S+)", done.stdout, re.MULTILINE)
            upcoming = re.search(r"^next\t(\S+)", done.stdout, re.MULTILINE)
            assert active and upcoming, done.stdout
            assert active[1] == published[1]  # the next key, published all along

            async def both_refreshed() -> bool:
                return upcoming[1] in await _jwks_kids(a) and upcoming[1] in await _jwks_kids(b)

            await eventually(both_refreshed, timeout=30, interval=0.1)
            expected = [active[1], upcoming[1], published[0]]
            assert await _jwks_kids(a) == await _jwks_kids(b) == expected
            new_a = (await login(a, email))["access_token"]
            new_b = (await login(b, email))["access_token"]
            assert _kid(new_a) == _kid(new_b) == active[1]
            for service in (a, b):
                for token in (token_a, token_b, new_a, new_b):
                    assert await _me(service, token) == 200


async def test_the_keys_command(
    database_url: str,
    jwt_key_file: Path,
    tmp_path: Path,
    sessions: Sessions,
    make_settings: SettingsFactory,
    seed: SigningKey,
) -> None:
    encryption_key = new_key()
    env = _process_env(database_url, jwt_key_file, tmp_path / "data", encryption_key)

    async def keys(*args: str, environ: dict[str, str] = env) -> subprocess.CompletedProcess[str]:
        result = await asyncio.to_thread(_keys_command, environ, tmp_path, *args)
        assert "Traceback" not in result.stderr, result.stderr
        return result

    # Commands that change nothing run side by side: each is a Python start-up (~1.5 s).
    nowhere = {**env, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/none"}
    unsealed = {**env, "ENVIRONMENT": "production", "ENCRYPTION_KEY": ""}
    admin_database = urlsplit(database_url)._replace(path="/postgres").geturl()
    unmigrated = {**env, "DATABASE_URL": admin_database}
    listed, refused, unreachable, misconfigured, early = await asyncio.gather(
        keys("list"),
        keys("rotate", "--force"),
        keys("list", environ=nowhere),
        keys("list", environ=unsealed),
        keys("rotate", environ=unmigrated),
    )
    assert listed.returncode == 0 and "No signing keys yet" in listed.stderr
    assert refused.returncode == 1
    assert refused.stderr.startswith("refused:") and "start the service" in refused.stderr
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("the database is unavailable")
    assert misconfigured.returncode == 2 and "ENCRYPTION_KEY" in misconfigured.stderr
    assert early.returncode == 1 and "the database is not migrated" in early.stderr

    sealer = load_sealer(make_settings(ENCRYPTION_KEY=encryption_key))
    await _ensure(sessions, sealer, make_settings(), seed)
    next_kid = (await _states(sessions))["next"][0]
    listed, refused = await asyncio.gather(keys("list"), keys("rotate"))
    assert listed.returncode == 0, listed.stderr
    header, *rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert header == ["kid", "algorithm", "state", "created", "activated", "retired", "expires"]
    assert [row[:3] for row in rows] == [
        [seed.kid, "RS256", "active"],
        [next_kid, "RS256", "next"],
    ]
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    assert re.fullmatch(stamp, rows[0][3]) and re.fullmatch(stamp, rows[0][4])
    assert rows[0][5:] == ["-", "-"] and rows[1][4:] == ["-", "-", "-"]
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith(f"refused: the next key {next_kid} has been published")
    assert "--force" in refused.stderr

    rotated = await keys("rotate", "--force")
    assert rotated.returncode == 0, rotated.stderr
    lines = rotated.stdout.splitlines()
    assert lines[0] == f"active\t{next_kid}\tRS256"
    assert lines[1].startswith("next\t") and lines[1].endswith("\tRS256")
    assert lines[2].startswith(f"retired\t{seed.kid}\tpublished until ")
    states = await _states(sessions)
    assert states == {
        "active": [next_kid],
        "next": [lines[1].split("\t")[1]],
        "retired": [seed.kid],
    }

    # The retired key's tokens have all expired (its expiry moved to the past, not waited for).
    async with sessions() as db:
        await db.execute(
            update(SigningKeyRecord)
            .where(SigningKeyRecord.kid == seed.kid)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        await db.commit()
    pruned = await keys("prune")
    assert (pruned.returncode, pruned.stdout) == (0, f"deleted\t{seed.kid}\n")
    assert "1 expired key(s) deleted" in pruned.stderr
    assert seed.kid not in _every_kid(await _states(sessions))


def test_the_keys_command_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["keys", "--help"], ["keys", "rotate", "--help"], ["keys"]):
        with pytest.raises(SystemExit) as excinfo:
            cli_main(args)
        assert excinfo.value.code == (2 if args == ["keys"] else 0)
    out, err = capsys.readouterr()
    for action in ("list", "rotate", "prune"):
        assert re.search(rf"^\s+{action}\s+\S", out, re.MULTILINE), out
    assert "--force" in out and "JWKS_MAX_AGE_SECONDS" in out and "Exit codes" in out
    assert "the following arguments are required: ACTION" in err
