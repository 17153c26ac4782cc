"""Second factors: enrolling an authenticator app, its codes (drift, replay, brute force),
recovery codes, removal, and what is stored and published.

Time is injected where it matters: the domain functions take ``now``, so drift and replay are
checked at chosen instants (mid-step, far from any wall clock) through a session of the app's own
sessionmaker. Everything a client does goes through the HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pyotp
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.app.container import app_services
from src.auth import mfa
from src.auth.context import Security
from src.auth.service import ClientInfo
from src.config.settings import Settings
from src.db.models import MfaFactor, RecoveryCode, User
from src.errors import InvalidInput, NotFound, TooManyRequests
from src.security.sealing import Sealer, UnsealError
from src.security.tokens import hash_token
from tests.auth.conftest import App
from tests.support.app import PASSWORD, running_app, signed_in
from tests.support.auth import API, assert_problem, fresh_ip, outbox
from tests.support.users import assert_outbox_carries_no_secrets

MFA_URL = f"{API}/users/me/mfa"
TOTP_URL = f"{MFA_URL}/totp"
RECOVERY_URL = f"{MFA_URL}/recovery-codes"
RECOVERY_FORMAT = re.compile(r"[A-Z2-7]{4}(-[A-Z2-7]{4}){3}")
# An instant in the middle of a time step, far from the wall clock: T0 - 30 s and T0 + 30 s are
# exactly the neighbouring steps, T0 +- 60 s the ones beyond the drift.
T0 = datetime.fromtimestamp(63_000_000 * mfa.TOTP_PERIOD + 15, UTC)
EXTRA_SETTINGS: dict[str, Any] = {
    # Twenty requests at once wait for a pooled connection (and for each other's row lock).
    "DATABASE_POOL_TIMEOUT": 30.0,
}


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**EXTRA_SETTINGS, **overrides})

    return factory


# --- helpers --------------------------------------------------------------------------------------


def _sessions(app: FastAPI) -> async_sessionmaker[AsyncSession]:
    maker: async_sessionmaker[AsyncSession] = app_services(app).sessionmaker
    return maker


def _security(app: FastAPI) -> Security:
    return app_services(app).security


def _who() -> ClientInfo:
    return ClientInfo(ip=fresh_ip(), user_agent="test")


def _ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json() if response.content else {}
    return body


def _code_at(secret: str, moment: datetime) -> str:
    return pyotp.TOTP(secret).at(moment)


def _wrong_code(secret: str, around: datetime) -> str:
    """Six digits that are the code of no step near ``around``."""
    near = {_code_at(secret, around + timedelta(seconds=30 * k)) for k in range(-3, 4)}
    return next(
        code for code in (f"{n:06d}" for n in range(0, 1_000_000, 7919)) if code not in near
    )


async def _start(
    client: httpx.AsyncClient, auth: dict[str, str], name: str | None = "Phone"
) -> dict[str, Any]:
    body = {"name": name} if name is not None else None
    response = await client.post(TOTP_URL, json=body, headers=auth)
    started = _ok(response, 201)
    assert response.headers["cache-control"] == "no-store"
    return started


async def _confirm(
    client: httpx.AsyncClient, auth: dict[str, str], factor_id: str, code: str
) -> httpx.Response:
    return await client.post(f"{TOTP_URL}/{factor_id}/confirm", json={"code": code}, headers=auth)


async def _enrol(client: httpx.AsyncClient, auth: dict[str, str]) -> tuple[str, str, list[str]]:
    """An authenticator confirmed over HTTP (with the code of the previous time step), then the
    session stepped up with it (the code of this step): once a factor is enrolled, changing
    factors needs a sign-in with it (README, "Step-up"). ``auth`` is updated in place. Returns
    (factor id, secret, recovery codes)."""
    started = await _start(client, auth)
    totp = pyotp.TOTP(started["secret"])
    confirmed = _ok(await _confirm(client, auth, started["factor_id"], totp.at(time.time() - 30)))
    await _step_up(client, auth, totp.now())
    return started["factor_id"], started["secret"], confirmed["recovery_codes"] or []


async def _step_up(client: httpx.AsyncClient, auth: dict[str, str], code: str) -> None:
    """Re-authenticate the session with the password and a code; ``auth`` gets the new token."""
    body = {"current_password": PASSWORD, "code": code}
    renewed = _ok(await client.post("/api/v1/auth/reauthenticate", json=body, headers=auth))
    auth["Authorization"] = f"Bearer {renewed['access_token']}"


async def _overview(client: httpx.AsyncClient, auth: dict[str, str]) -> dict[str, Any]:
    return _ok(await client.get(MFA_URL, headers=auth))


async def _remove(
    client: httpx.AsyncClient, auth: dict[str, str], factor_id: str, **body: Any
) -> httpx.Response:
    return await client.request("DELETE", f"{MFA_URL}/{factor_id}", json=body, headers=auth)


async def _user(db: AsyncSession, user_id: str) -> User:
    user = await db.get(User, uuid.UUID(user_id))
    assert user is not None
    return user


async def _enrol_at(app: FastAPI, user_id: str, now: datetime) -> tuple[uuid.UUID, str, list[str]]:
    """An authenticator enrolled and confirmed through the domain at ``now``."""
    sec, sessions = _security(app), _sessions(app)
    async with sessions() as db:
        factor, secret, _, _ = await mfa.start_totp_enrolment(
            db, sec, await _user(db, user_id), "Phone", now=now
        )
    async with sessions() as db:
        user = await _user(db, user_id)
        _, codes = await mfa.confirm_totp(
            db, sec, user, factor.id, _code_at(secret, now), _who(), now=now
        )
    return factor.id, secret, codes or []


async def _verify(
    app: FastAPI,
    user_id: str,
    code: str,
    now: datetime | None = None,
    who: ClientInfo | None = None,
) -> str | None:
    """The method a code signs in with at ``now`` (committed), or None when it is refused."""
    async with _sessions(app)() as db:
        user = await _user(db, user_id)
        try:
            method = await mfa.verify_second_factor(
                db, _security(app), user, code, who or _who(), now=now
            )
        except mfa.SecondFactorRefused:
            return None
        await db.commit()
        return method


async def _factor_rows(app: FastAPI, user_id: str) -> list[MfaFactor]:
    async with _sessions(app)() as db:
        query = select(MfaFactor).where(MfaFactor.user_id == uuid.UUID(user_id))
        return list((await db.execute(query)).scalars().all())


async def _recovery_rows(app: FastAPI, user_id: str) -> list[RecoveryCode]:
    async with _sessions(app)() as db:
        query = select(RecoveryCode).where(RecoveryCode.user_id == uuid.UUID(user_id))
        return list((await db.execute(query)).scalars().all())


async def _has_second_factor(app: FastAPI, user_id: str) -> bool:
    async with _sessions(app)() as db:
        return await mfa.has_second_factor(db, uuid.UUID(user_id))


async def _payloads(app: FastAPI, user_id: str, type_: str) -> list[dict[str, Any]]:
    return [row.payload for row in await outbox(app, user_id, type_)]


# --- enrolment ------------------------------------------------------------------------------------


async def test_an_authenticator_is_enrolled_with_a_first_code_and_listed(app: App) -> None:
    fastapi_app, client = app
    user, auth = await signed_in(client)
    assert await _overview(client, auth) == {"factors": [], "recovery_codes_left": 0}

    started = await _start(client, auth, name="  Work phone  ")
    assert set(started) == {"factor_id", "secret", "otpauth_uri", "qr_svg"}
    assert re.fullmatch(r"[A-Z2-7]{32}", started["secret"])
    [pending] = (await _overview(client, auth))["factors"]
    assert pending["id"] == started["factor_id"] and pending["name"] == "Work phone"
    assert pending["kind"] == "totp" and pending["confirmed"] is False
    # An enrolment waiting for its first code asks nothing of a sign-in yet.
    assert not await _has_second_factor(fastapi_app, user["id"])
    assert not await outbox(fastapi_app, user["id"], "user.mfa_enrolled")

    code = pyotp.TOTP(started["secret"]).now()
    response = await _confirm(client, auth, started["factor_id"], f"{code[:3]} {code[3:]}")
    confirmed = _ok(response)
    assert response.headers["cache-control"] == "no-store"
    assert confirmed["factor"]["confirmed"] is True and confirmed["factor"]["last_used_at"]
    codes = confirmed["recovery_codes"]
    assert len(codes) == 10 == len(set(codes))
    assert all(RECOVERY_FORMAT.fullmatch(c) for c in codes), codes
    overview = await _overview(client, auth)
    assert overview["recovery_codes_left"] == 10
    assert [f["id"] for f in overview["factors"] if f["confirmed"]] == [started["factor_id"]]
    assert await _has_second_factor(fastapi_app, user["id"])
    [event] = await _payloads(fastapi_app, user["id"], "user.mfa_enrolled")
    assert event == {
        "id": user["id"],
        "factor_id": started["factor_id"],
        "kind": "totp",
        "name": "Work phone",
        "recovery_codes_issued": 10,
    }

    # From now on, changing factors needs a sign-in with the first one (step-up).
    later = pyotp.TOTP(started["secret"]).at(time.time() + 30)
    await _step_up(client, auth, later)
    # Confirmed once: again is a conflict, whatever the code.
    assert_problem(await _confirm(client, auth, started["factor_id"], "000000"), 409)

    # A second authenticator brings no new recovery codes; the first ones stay.
    second = await _start(client, auth, name=None)
    again = _ok(
        await _confirm(client, auth, second["factor_id"], pyotp.TOTP(second["secret"]).now())
    )
    assert again["recovery_codes"] is None and again["factor"]["name"] == mfa.DEFAULT_NAME
    assert (await _overview(client, auth))["recovery_codes_left"] == 10
    events = await _payloads(fastapi_app, user["id"], "user.mfa_enrolled")
    assert events[-1]["recovery_codes_issued"] == 0


async def test_a_wrong_code_does_not_confirm_and_an_old_enrolment_expires(app: App) -> None:
    fastapi_app, client = app
    user, auth = await signed_in(client)
    started = await _start(client, auth)
    wrong = _wrong_code(started["secret"], datetime.now(UTC))
    body = assert_problem(await _confirm(client, auth, started["factor_id"], wrong), 400)
    assert body["detail"] == "The code is not valid."
    assert (await _overview(client, auth))["factors"][0]["confirmed"] is False

    # Ten minutes later the enrolment is gone for every purpose, and a new one deletes it.
    sec, sessions = _security(fastapi_app), _sessions(fastapi_app)
    async with sessions() as db:
        factor, secret, _, _ = await mfa.start_totp_enrolment(
            db, sec, await _user(db, user["id"]), now=T0
        )
    late = T0 + mfa.ENROLMENT_LIFETIME
    async with sessions() as db:
        with pytest.raises(NotFound):
            await mfa.confirm_totp(
                db, sec, await _user(db, user["id"]), factor.id, _code_at(secret, late), _who(),
                now=late,
            )  # fmt: skip
    async with sessions() as db:
        await mfa.start_totp_enrolment(db, sec, await _user(db, user["id"]), now=late)
    assert factor.id not in {row.id for row in await _factor_rows(fastapi_app, user["id"])}


async def test_open_enrolments_are_bounded_even_when_started_at_once(app: App) -> None:
    _, client = app
    _, auth = await signed_in(client)
    answers = await asyncio.gather(
        *(client.post(TOTP_URL, json={}, headers=auth) for _ in range(20))
    )
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [201] * mfa.MAX_PENDING_ENROLMENTS + [409] * 15, statuses
    assert_problem(await client.post(TOTP_URL, json={}, headers=auth), 409)
    assert len((await _overview(client, auth))["factors"]) == mfa.MAX_PENDING_ENROLMENTS


async def test_the_otpauth_uri_and_the_qr_code_are_well_formed(app: App) -> None:
    fastapi_app, client = app
    user, auth = await signed_in(client)
    started = await _start(client, auth)

    uri = urlsplit(started["otpauth_uri"])
    issuer = fastapi_app.state.settings.PROJECT_NAME
    assert (uri.scheme, uri.netloc) == ("otpauth", "totp")
    assert unquote(uri.path) == f"/{issuer}:{user['email']}"
    query = parse_qs(uri.query, strict_parsing=True)
    assert query["secret"] == [started["secret"]] and query["issuer"] == [issuer]
    assert query.get("digits", ["6"]) == ["6"] and query.get("period", ["30"]) == ["30"]
    assert query.get("algorithm", ["SHA1"]) == ["SHA1"]

    svg = started["qr_svg"]
    assert svg.startswith(("<?xml", "<svg"))
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    lowered = svg.lower()
    for external in ("href", "<image", "<script", "url(", "@import", "<foreignobject", "<use"):
        assert external not in lowered, external
    # Drawn on the server from exactly this URI.
    assert svg == mfa.qr_svg(started["otpauth_uri"])


# --- codes: drift, replay, brute force ------------------------------------------------------------


async def test_codes_of_the_neighbouring_steps_work_once_and_no_further(app: App) -> None:
    fastapi_app, client = app
    user, _ = await signed_in(client)
    _, secret, _ = await _enrol_at(fastapi_app, user["id"], T0)
    now = T0 + timedelta(minutes=10)
    at = {k: _code_at(secret, now + timedelta(seconds=k)) for k in (-60, -30, 0, 30, 60)}

    # Two steps away is beyond the drift, either way.
    assert await _verify(fastapi_app, user["id"], at[-60], now) is None
    assert await _verify(fastapi_app, user["id"], at[60], now) is None
    # One step behind and one ahead are accepted...
    assert await _verify(fastapi_app, user["id"], at[-30], now) == "otp"
    assert await _verify(fastapi_app, user["id"], at[30], now) == "otp"
    # ... and each step once: the code of now is older than the last one used.
    assert await _verify(fastapi_app, user["id"], at[30], now) is None
    assert await _verify(fastapi_app, user["id"], at[0], now) is None
    [row] = await _factor_rows(fastapi_app, user["id"])
    assert row.last_used_step == int((now + timedelta(seconds=30)).timestamp()) // 30
    assert row.last_used_at == now
    failures = await _payloads(fastapi_app, user["id"], "user.mfa_failed")
    assert not failures  # recorded only when the caller passes sessions and defer (the API does)


async def test_the_confirming_code_cannot_be_replayed(app: App) -> None:
    fastapi_app, client = app
    user, auth = await signed_in(client)
    _, secret, recovery = await _enrol_at(fastapi_app, user["id"], T0)
    assert await _verify(fastapi_app, user["id"], _code_at(secret, T0), T0) is None
    later = T0 + timedelta(seconds=30)
    assert await _verify(fastapi_app, user["id"], _code_at(secret, later), later) == "otp"

    # Over HTTP: the code that confirmed cannot remove the authenticator; the reason is recorded.
    await _step_up(client, auth, recovery[0])  # adding a second authenticator needs the first
    factor_id, secret, _ = await _enrol(client, auth)
    # The confirmation used the wall clock's step; whichever step that was, its code is spent.
    confirmed_row = next(
        r for r in await _factor_rows(fastapi_app, user["id"]) if str(r.id) == factor_id
    )
    assert confirmed_row.last_used_step is not None
    used = pyotp.TOTP(secret).generate_otp(confirmed_row.last_used_step)
    assert_problem(await _remove(client, auth, factor_id, code=used), 400)
    assert factor_id in {f["id"] for f in (await _overview(client, auth))["factors"]}
    failure = (await _payloads(fastapi_app, user["id"], "user.mfa_failed"))[-1]
    assert failure["reason"] == "replayed_code" and failure["method"] == "otp"


async def test_guessing_codes_is_locked_out_like_a_password(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(LOCKOUT_FAILURE_THRESHOLD=3, LOCKOUT_WAIT_INCREMENT_SECONDS=900)
    async with running_app(settings) as (fastapi_app, client):
        user, auth = await signed_in(client)
        factor_id, secret, codes = await _enrol(client, auth)
        wrong = _wrong_code(secret, datetime.now(UTC))
        for _ in range(3):
            assert_problem(await _remove(client, auth, factor_id, code=wrong), 400)
        locked = await _remove(client, auth, factor_id, code=codes[0])
        assert_problem(locked, 429)
        assert int(locked.headers["retry-after"]) == 900
        # The right code is not even looked at while locked out: still unused, nothing removed.
        assert (await _overview(client, auth))["recovery_codes_left"] == 10
        assert len((await _overview(client, auth))["factors"]) == 1

        failures = await _payloads(fastapi_app, user["id"], "user.mfa_failed")
        assert len(failures) == 3  # the refused attempt records nothing
        assert [f["locked_for_seconds"] for f in failures] == [None, None, 900]
        assert all(f["ip"] == "127.0.0.1" and f["reason"] == "invalid_code" for f in failures)

        # The domain counts the same way: another address still gets its own attempts.
        elsewhere = _who()
        assert await _verify(fastapi_app, user["id"], wrong, who=elsewhere) is None
        with pytest.raises(TooManyRequests):
            for _ in range(3):
                await _verify(fastapi_app, user["id"], wrong, who=elsewhere)


# --- recovery codes -------------------------------------------------------------------------------


async def test_a_recovery_code_works_once(app: App) -> None:
    fastapi_app, client = app
    user, auth = await signed_in(client)
    _, _, codes = await _enrol(client, auth)
    assert await _verify(fastapi_app, user["id"], codes[0]) == "recovery_code"
    assert await _verify(fastapi_app, user["id"], codes[0]) is None
    # Typed loosely: lower case, spaces for dashes.
    assert (
        await _verify(fastapi_app, user["id"], codes[1].lower().replace("-", " "))
        == "recovery_code"
    )
    assert (await _overview(client, auth))["recovery_codes_left"] == 8
    used = await _payloads(fastapi_app, user["id"], "user.recovery_code_used")
    assert [u["recovery_codes_left"] for u in used] == [9, 8]
    assert set(used[0]) == {"id", "ip", "recovery_codes_left"}
    # Another account's codes are no use here.
    other, other_auth = await signed_in(client)
    await _enrol(client, other_auth)
    assert await _verify(fastapi_app, other["id"], codes[2]) is None


async def test_new_recovery_codes_need_the_password_and_kill_the_old_ones(app: App) -> None:
    fastapi_app, client = app
    user, auth = await signed_in(client)
    assert_problem(
        await client.post(RECOVERY_URL, json={"current_password": PASSWORD}, headers=auth), 409
    )
    _, _, old = await _enrol(client, auth)
    assert await _verify(fastapi_app, user["id"], old[0]) == "recovery_code"

    refused = await client.post(RECOVERY_URL, json={"current_password": "a guess"}, headers=auth)
    assert_problem(refused, 400)
    assert (await _overview(client, auth))["recovery_codes_left"] == 9

    response = await client.post(RECOVERY_URL, json={"current_password": PASSWORD}, headers=auth)
    new = _ok(response)["recovery_codes"]
    assert response.headers["cache-control"] == "no-store"
    assert len(new) == 10 and not set(new) & set(old)
    assert (await _overview(client, auth))["recovery_codes_left"] == 10
    assert await _verify(fastapi_app, user["id"], old[1]) is None
    assert await _verify(fastapi_app, user["id"], new[0]) == "recovery_code"
    [event] = await _payloads(fastapi_app, user["id"], "user.recovery_codes_regenerated")
    assert event == {"id": user["id"], "recovery_codes_issued": 10, "recovery_codes_revoked": 9}


# --- removal --------------------------------------------------------------------------------------


async def test_removing_needs_the_password_or_a_code(app: App) -> None:
    fastapi_app, client = app
    user, auth = await signed_in(client)
    factor_id, secret, _ = await _enrol(client, auth)

    assert_problem(await _remove(client, auth, factor_id), 422)
    both = {"current_password": PASSWORD, "code": "123456"}
    assert_problem(await _remove(client, auth, factor_id, **both), 422)
    assert_problem(await _remove(client, auth, factor_id, current_password="a guess"), 400)
    wrong = _wrong_code(secret, datetime.now(UTC))
    assert_problem(await _remove(client, auth, factor_id, code=wrong), 400)
    assert [f["id"] for f in (await _overview(client, auth))["factors"]] == [factor_id]
    assert not await outbox(fastapi_app, user["id"], "user.mfa_removed")

    response = await _remove(client, auth, factor_id, current_password=PASSWORD)
    assert response.status_code == 204, response.text
    # The last authenticator took the recovery codes with it.
    assert await _overview(client, auth) == {"factors": [], "recovery_codes_left": 0}
    assert not await _recovery_rows(fastapi_app, user["id"])
    assert not await _has_second_factor(fastapi_app, user["id"])
    [event] = await _payloads(fastapi_app, user["id"], "user.mfa_removed")
    assert event == {
        "id": user["id"],
        "factor_id": factor_id,
        "kind": "totp",
        "name": "Phone",
        "via": "password",
        "factors_left": 0,
        "recovery_codes_deleted": 10,
    }
    assert_problem(await _remove(client, auth, factor_id, current_password=PASSWORD), 404)


async def test_a_code_of_another_authenticator_or_a_recovery_code_removes_one(app: App) -> None:
    fastapi_app, client = app
    user, auth = await signed_in(client)
    first, _, codes = await _enrol(client, auth)
    second, secret, _ = await _enrol(client, auth)

    # A code of the second authenticator (the step after its confirmation's) removes the first;
    # the recovery codes stay while an authenticator does.
    code = pyotp.TOTP(secret).at(time.time() + mfa.TOTP_PERIOD)
    response = await _remove(client, auth, first, code=code)
    assert response.status_code == 204, response.text
    assert [f["id"] for f in (await _overview(client, auth))["factors"]] == [second]
    assert (await _overview(client, auth))["recovery_codes_left"] == 10
    removed = (await _payloads(fastapi_app, user["id"], "user.mfa_removed"))[-1]
    assert removed["factor_id"] == first and removed["via"] == "otp"
    assert removed["factors_left"] == 1 and removed["recovery_codes_deleted"] == 0

    # A recovery code proves it too (and is spent with it): the last one takes the rest along.
    response = await _remove(client, auth, second, code=codes[0])
    assert response.status_code == 204, response.text
    removed = (await _payloads(fastapi_app, user["id"], "user.mfa_removed"))[-1]
    assert removed["via"] == "recovery_code" and removed["factors_left"] == 0
    assert removed["recovery_codes_deleted"] == 10
    assert len(await outbox(fastapi_app, user["id"], "user.recovery_code_used")) == 1
    assert await _overview(client, auth) == {"factors": [], "recovery_codes_left": 0}


async def test_an_open_enrolment_is_removed_without_an_event(app: App) -> None:
    fastapi_app, client = app
    user, auth = await signed_in(client)
    started = await _start(client, auth)
    response = await _remove(client, auth, started["factor_id"], current_password=PASSWORD)
    assert response.status_code == 204, response.text
    assert (await _overview(client, auth))["factors"] == []
    assert not await outbox(fastapi_app, user["id"], "user.mfa_removed")


# --- at rest and in events ------------------------------------------------------------------------


async def test_secrets_are_sealed_and_codes_hashed_at_rest(app: App) -> None:
    fastapi_app, client = app
    user, auth = await signed_in(client)
    factor_id, secret, codes = await _enrol(client, auth)
    [row] = await _factor_rows(fastapi_app, user["id"])
    assert row.secret is not None and secret not in row.secret and row.secret.startswith("v1.")
    sealer = _security(fastapi_app).sealer
    assert sealer.unseal(row.secret, f"totp:{factor_id}".encode()) == secret.encode()
    with pytest.raises(UnsealError):  # another key cannot open it
        Sealer([secrets.token_bytes(32)]).unseal(row.secret, f"totp:{factor_id}".encode())
    with pytest.raises(UnsealError):  # bound to its factor: no use on another row
        sealer.unseal(row.secret, f"totp:{uuid.uuid4()}".encode())

    stored = {r.code_hash for r in await _recovery_rows(fastapi_app, user["id"])}
    assert stored == {hash_token(c.replace("-", "")) for c in codes}
    assert not stored & {c.replace("-", "") for c in codes}


async def test_events_carry_no_secret_code_or_hash(app: App) -> None:
    fastapi_app, client = app
    user, auth = await signed_in(client)
    factor_id, secret, codes = await _enrol(client, auth)
    _ok(await client.post(RECOVERY_URL, json={"current_password": PASSWORD}, headers=auth))
    rows = await _recovery_rows(fastapi_app, user["id"])
    new_code_hashes = {r.code_hash for r in rows}
    assert_problem(await _remove(client, auth, factor_id, code="AAAA-AAAA-AAAA-AAAA"), 400)
    assert_problem(await _remove(client, auth, factor_id, code=codes[0]), 400)  # revoked
    assert_problem(await _remove(client, auth, factor_id, current_password="a guess"), 400)
    assert (await _remove(client, auth, factor_id, current_password=PASSWORD)).status_code == 204

    events = await outbox(fastapi_app, user["id"])
    types = {e.type for e in events}
    assert {"user.mfa_enrolled", "user.recovery_codes_regenerated", "user.mfa_failed"} <= types
    assert "user.mfa_removed" in types
    text = json.dumps([e.payload for e in events])
    forbidden = [secret, *codes, *(c.replace("-", "") for c in codes), *new_code_hashes]
    forbidden += [hash_token(c.replace("-", "")) for c in codes]
    for value in forbidden:
        assert value not in text
    assert all(e.sealed is None for e in events if e.type.startswith(("user.mfa", "user.rec")))
    await assert_outbox_carries_no_secrets(fastapi_app)


# --- races ----------------------------------------------------------------------------------------


async def test_twenty_confirmations_with_one_code_confirm_once(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings(LOCKOUT_FAILURE_THRESHOLD=1000)) as (fastapi_app, client):
        user, auth = await signed_in(client)
        started = await _start(client, auth)
        code = pyotp.TOTP(started["secret"]).now()
        answers = await asyncio.gather(
            *(_confirm(client, auth, started["factor_id"], code) for _ in range(20))
        )
        statuses = sorted(a.status_code for a in answers)
        assert statuses.count(200) == 1, statuses
        # 401: the ones checked after the first committed meet a user who now has a factor,
        # which this password-only session did not sign in with (step-up).
        assert set(statuses) <= {200, 400, 401, 409}, statuses
        assert len(await outbox(fastapi_app, user["id"], "user.mfa_enrolled")) == 1
        assert len(await _recovery_rows(fastapi_app, user["id"])) == 10


async def test_twenty_uses_of_one_code_succeed_once(make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings(LOCKOUT_FAILURE_THRESHOLD=1000)) as (fastapi_app, client):
        user, _ = await signed_in(client)
        _, secret, codes = await _enrol_at(fastapi_app, user["id"], T0)
        later = T0 + timedelta(seconds=30)
        totp = await asyncio.gather(
            *(_verify(fastapi_app, user["id"], _code_at(secret, later), later) for _ in range(20))
        )
        assert totp.count("otp") == 1 and totp.count(None) == 19, totp
        recovery = await asyncio.gather(
            *(_verify(fastapi_app, user["id"], codes[0]) for _ in range(20))
        )
        assert recovery.count("recovery_code") == 1 and recovery.count(None) == 19, recovery
        assert len(await outbox(fastapi_app, user["id"], "user.recovery_code_used")) == 1


# --- bad input ------------------------------------------------------------------------------------


async def test_bad_input_is_refused_and_changes_nothing(app: App) -> None:
    fastapi_app, client = app
    user, auth = await signed_in(client)
    factor_id, secret, _ = await _enrol(client, auth)
    other, other_auth = await signed_in(client)
    theirs = (await _start(client, other_auth))["factor_id"]
    before = await _overview(client, auth)
    events_before = len(await outbox(fastapi_app, user["id"]))

    async def post(url: str, raw: bytes) -> httpx.Response:
        headers = {**auth, "Content-Type": "application/json"}
        return await client.post(url, content=raw, headers=headers)

    assert_problem(await post(TOTP_URL, b'{"name": "a\\u0000b"}'), 400)
    for name in ("x" * 101, "", "   ", "bell\u0007", "evil\u202eenohp", "line\u2028break"):
        assert_problem(await client.post(TOTP_URL, json={"name": name}, headers=auth), 422)
    assert_problem(await client.post(TOTP_URL, json={"name": "x", "extra": 1}, headers=auth), 422)
    assert_problem(await client.post(TOTP_URL, json={"name": ["x"]}, headers=auth), 422)

    confirm = f"{TOTP_URL}/{factor_id}/confirm"
    assert_problem(await post(confirm, b'{"code": "12\\u000034"}'), 400)
    assert_problem(await client.post(confirm, json={"code": "1" * 65}, headers=auth), 422)
    assert_problem(await client.post(confirm, json={"code": ""}, headers=auth), 422)
    assert_problem(await client.post(confirm, json={"code": 123456}, headers=auth), 422)
    unknown = str(uuid.uuid4())
    code = pyotp.TOTP(secret).at(time.time() + 30)
    assert_problem(await _confirm(client, auth, unknown, code), 404)
    assert_problem(await _confirm(client, auth, "not-a-uuid", code), 422)
    assert_problem(await _confirm(client, auth, "9" * 5000, code), 422)
    # Another user's enrolment is no business of this one: 404, never 409 or 400.
    assert_problem(await _confirm(client, auth, theirs, code), 404)
    assert_problem(await _remove(client, auth, theirs, current_password=PASSWORD), 404)
    assert_problem(await _remove(client, auth, unknown, current_password=PASSWORD), 404)
    assert_problem(await _remove(client, auth, factor_id, code="1" * 65), 422)
    assert_problem(await _remove(client, auth, factor_id, current_password="x" * 1025), 422)
    assert_problem(await client.post(RECOVERY_URL, json={}, headers=auth), 422)
    long = {"current_password": "x" * 1025}
    assert_problem(await client.post(RECOVERY_URL, json=long, headers=auth), 422)
    # Without a token, nothing at all.
    for response in (
        await client.get(MFA_URL),
        await client.post(TOTP_URL, json={}),
        await client.post(RECOVERY_URL, json={"current_password": PASSWORD}),
    ):
        assert_problem(response, 401)

    assert await _overview(client, auth) == before
    assert len(await outbox(fastapi_app, user["id"])) == events_before
    [their_row] = await _factor_rows(fastapi_app, other["id"])
    assert their_row.confirmed_at is None


def test_the_domain_refuses_names_the_api_would() -> None:
    assert mfa.factor_name(None) == mfa.DEFAULT_NAME
    assert mfa.factor_name(" Key \u200d ") == "Key \u200d"
    for bad in ("", " ", "x" * 101, "a\x00b", "a\nb", "a\u202eb", "\ud800"):
        with pytest.raises(InvalidInput):
            mfa.factor_name(bad)
    assert mfa.normalise_recovery_code("abcd efgh-jklm-npqr") == "ABCDEFGHJKLMNPQR"
    assert mfa.normalise_recovery_code("ABCD-EFGH-JKLM-NPQ1") is None
