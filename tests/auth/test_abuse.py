"""Abuse an outsider would try: lock the owner out, out-guess the threshold with parallel requests,
mail-bomb an address, mass-register, and ask the service which accounts exist.

Each request comes from an address of its own choosing (httpx's ASGI transport sets the peer),
so the limits per client address and per account can be told apart.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event
from starlette.types import Message, Receive, Scope, Send

from src.app.container import app_services
from src.config.settings import Settings
from src.db.models import User
from tests.support.app import (
    OPERATOR,
    PASSWORD,
    bearer,
    eventually,
    login,
    register,
    running_app,
    unique_email,
)
from tests.support.auth import (
    API,
    REGISTER_URL,
    assert_oauth_error,
    assert_problem,
    client_from,
    fresh_ip,
    one_time_token,
    outbox,
    password_grant,
)
from tests.support.oidc import form_posting_to
from tests.support.servers import RedisServer

RESET_URL = f"{API}/auth/password-reset/request"
VERIFY_URL = f"{API}/auth/verify-email/request"
RESET_REQUESTED = "user.password_reset_requested"


# --- lock-out is not a weapon ---------------------------------------------------------------------


async def test_failures_from_elsewhere_never_lock_the_owner_out(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        LOCKOUT_FAILURE_THRESHOLD=3,
        LOCKOUT_WAIT_INCREMENT_SECONDS=900,
        LOCKOUT_ACCOUNT_THRESHOLD=6,
        LOCKOUT_ACCOUNT_DELAY_SECONDS=5,
        LOCKOUT_ACCOUNT_MAX_DELAY_SECONDS=30,
    )
    # Two addresses guess three times each: both lock themselves out, and the account reaches
    # its own threshold of six.
    async with running_app(settings) as (app, client):
        user = await register(client)
        home = fresh_ip()
        async with client_from(app, home) as owner:
            assert (await password_grant(owner, user["email"])).status_code == 200

        # An attacker guesses from many addresses; each address is locked out on its own...
        attackers = [fresh_ip() for _ in range(2)]
        for ip in attackers:
            async with client_from(app, ip) as attacker:
                for _ in range(3):
                    wrong = await password_grant(attacker, user["email"], "a guess")
                    assert_oauth_error(wrong, "invalid_grant")
                locked = await password_grant(attacker, user["email"], PASSWORD)
                assert_problem(locked, 429)
                assert int(locked.headers["retry-after"]) == 900

        # ...a new address only waits a little (the account is under attack)...
        async with client_from(app) as travelling:
            slowed = await password_grant(travelling, user["email"])
            assert_problem(slowed, 429)
            assert 1 <= int(slowed.headers["retry-after"]) <= 30
        # ...and the owner, at home, signs in as if nothing had happened.
        async with client_from(app, home) as owner:
            assert (await password_grant(owner, user["email"])).status_code == 200


async def _push_past_the_account_threshold(app: FastAPI, email: str, failures: int) -> None:
    for _ in range(failures):
        async with client_from(app) as attacker:
            assert_oauth_error(await password_grant(attacker, email, "a guess"), "invalid_grant")


ACCOUNT_UNDER_ATTACK = {"LOCKOUT_ACCOUNT_THRESHOLD": 3, "LOCKOUT_ACCOUNT_DELAY_SECONDS": 30}


async def test_only_a_password_sign_in_makes_an_address_known(
    make_settings: Callable[..., Settings],
) -> None:
    """A stolen refresh token used from the attacker's address must not make that address
    "known" (which would lift the account's delay for the attacker's guesses)."""
    async with running_app(make_settings(**ACCOUNT_UNDER_ATTACK)) as (app, client):
        user = await register(client)
        home, attacker_ip = fresh_ip(), fresh_ip()
        async with client_from(app, home) as owner:
            tokens = await login(owner, user["email"])
        async with client_from(app, attacker_ip) as attacker:
            stolen = await attacker.post(
                f"{API}/auth/login",
                data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
            )
            assert stolen.status_code == 200
        await _push_past_the_account_threshold(app, user["email"], 3)
        async with client_from(app, attacker_ip) as attacker:
            assert_problem(await password_grant(attacker, user["email"], "a guess"), 429)
        async with client_from(app, home) as owner:
            assert (await password_grant(owner, user["email"])).status_code == 200


async def test_a_known_ipv6_address_is_known_across_its_64(
    make_settings: Callable[..., Settings],
) -> None:
    """Privacy extensions rotate the address within the /64 the limits count by."""
    async with running_app(make_settings(**ACCOUNT_UNDER_ATTACK)) as (app, client):
        user = await register(client)
        prefix = f"2001:db8:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}"
        async with client_from(app, f"{prefix}::a") as owner:
            await login(owner, user["email"])
        await _push_past_the_account_threshold(app, user["email"], 3)
        async with client_from(app, f"{prefix}:1234:5678:9abc:def0") as rotated:
            assert (await password_grant(rotated, user["email"])).status_code == 200


async def test_a_password_reset_ends_the_accounts_delay(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings(**ACCOUNT_UNDER_ATTACK)) as (app, client):
        user = await register(client)
        await _push_past_the_account_threshold(app, user["email"], 3)
        async with client_from(app) as travelling:
            assert_problem(await password_grant(travelling, user["email"]), 429)
        await client.post(RESET_URL, json={"email": user["email"]})
        link = await one_time_token(app, user["id"], RESET_REQUESTED)
        confirm = {"token": link, "new_password": "a brand new passphrase"}
        assert (
            await client.post(f"{API}/auth/password-reset/confirm", json=confirm)
        ).status_code == 204
        async with client_from(app) as travelling:
            signed_in = await password_grant(travelling, user["email"], "a brand new passphrase")
            assert signed_in.status_code == 200


async def test_parallel_guesses_check_no_more_passwords_than_the_threshold(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_app(make_settings(LOCKOUT_FAILURE_THRESHOLD=5)) as (app, client):
        user = await register(client)
        hasher = app_services(app).security.hasher
        checked: list[str] = []
        real_verify = hasher.verify

        async def counting_verify(stored_hash: str, password: str) -> bool:
            checked.append(password)
            return bool(await real_verify(stored_hash, password))

        monkeypatch.setattr(hasher, "verify", counting_verify)
        async with client_from(app) as attacker:
            answers = await asyncio.gather(
                *(password_grant(attacker, user["email"], f"guess {n}") for n in range(20))
            )
        codes = sorted(a.status_code for a in answers)
        assert codes == [400] * 5 + [429] * 15, codes
        assert len(checked) == 5
        assert len(await outbox(app, user["id"], "user.login_failed")) == 5


# --- throttles on mail and registration ---------------------------------------------------------


async def test_registration_is_throttled_per_client_address(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings(MAIL_RATE_LIMIT_PER_IP=2)) as (app, _):
        ip = fresh_ip()
        async with client_from(app, ip) as bot:
            for _ in range(2):
                await register(bot)
            email = unique_email("third")
            refused = await bot.post(REGISTER_URL, json={"email": email, "password": PASSWORD})
            assert_problem(refused, 429)
            assert int(refused.headers["retry-after"]) > 0
        async with client_from(app) as someone_else:
            await register(someone_else, email=email)


async def test_reset_requests_for_one_address_are_capped_and_answered_the_same(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings(MAIL_RATE_LIMIT_PER_ADDRESS=2)) as (app, client):
        victim = await register(client)
        answers = []
        for _ in range(5):
            async with client_from(app) as sender:  # a new address each time: per target counts
                answers.append(await sender.post(RESET_URL, json={"email": victim["email"]}))
        assert {a.status_code for a in answers} == {202}
        assert len({a.content for a in answers}) == 1
        assert len(await outbox(app, victim["id"], RESET_REQUESTED)) == 2


async def test_verification_requests_are_capped_per_client_address(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings(MAIL_RATE_LIMIT_PER_IP=2)) as (app, _):
        users = []
        for _ in range(3):
            async with client_from(app) as newcomer:
                users.append(await register(newcomer))
        async with client_from(app) as sender:
            for user in users:
                answer = await sender.post(VERIFY_URL, json={"email": user["email"]})
                assert answer.status_code == 202
        asked = [len(await outbox(app, u["id"], "user.verification_requested")) for u in users]
        assert asked == [2, 2, 1]  # one at registration, one more for the first two only


async def test_throttles_hold_while_redis_is_down(
    make_settings: Callable[..., Settings], redis_process: RedisServer
) -> None:
    settings = make_settings(REDIS_PORT=redis_process.port, MAIL_RATE_LIMIT_PER_ADDRESS=1)
    async with running_app(settings) as (app, client):
        victim = await register(client)
        redis_process.stop()
        for _ in range(3):
            async with client_from(app) as sender:
                answer = await sender.post(RESET_URL, json={"email": victim["email"]})
                assert answer.status_code == 202
        assert len(await outbox(app, victim["id"], RESET_REQUESTED)) == 1
        assert app_services(app).security.throttle.degraded


# --- no account oracle ---------------------------------------------------------------------------


class _ResponseWatch:
    """Wraps the app to note when the response starts, and records the SQL run before that."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.started = False
        self.before: list[str] = []
        self.after: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.started = True
            await send(message)

        await self.app(scope, receive, watch)

    def statement(self, _conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        (self.after if self.started else self.before).append(sql.split()[0].upper())

    @contextmanager
    def listening(self) -> Iterator[None]:
        engine = app_services(self.app).engine.sync_engine
        event.listen(engine, "before_cursor_execute", self.statement)
        try:
            yield
        finally:
            event.remove(engine, "before_cursor_execute", self.statement)


@pytest.mark.parametrize("url", [RESET_URL, VERIFY_URL])
async def test_mail_requests_do_no_work_before_answering(
    make_settings: Callable[..., Settings], url: str
) -> None:
    """Known and unknown addresses take the same path until the answer is out: nothing at all.
    Timing (measured over real sockets in ``make bench``) then cannot tell them apart."""
    async with running_app(make_settings()) as (app, client):
        known = await register(client)
        seen: dict[str, _ResponseWatch] = {}
        for name, email in (("known", known["email"]), ("unknown", unique_email("nobody"))):
            watch = seen[name] = _ResponseWatch(app)
            transport = httpx.ASGITransport(app=watch)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as watched:
                with watch.listening():
                    response = await watched.post(url, json={"email": email})
            assert response.status_code == 202
        assert seen["known"].before == seen["unknown"].before == []
        # The work did happen, after the answer: the account was looked up (and for the known
        # one, a link recorded).
        assert "SELECT" in seen["unknown"].after
        assert "INSERT" in seen["known"].after and "INSERT" not in seen["unknown"].after


async def test_anonymous_health_shows_statuses_only(
    make_settings: Callable[..., Settings], redis_process: RedisServer
) -> None:
    async with running_app(make_settings(REDIS_PORT=redis_process.port)) as (app, client):
        user = await register(client)
        before = (await client.get(f"{API}/health")).content
        await client.post(RESET_URL, json={"email": user["email"]})
        await client.post(RESET_URL, json={"email": unique_email("nobody")})
        # Nothing an anonymous caller sees moves when a reset is asked for a real account.
        assert (await client.get(f"{API}/health")).content == before

        redis_process.stop()

        async def redis_down() -> dict[str, Any] | None:
            # Anonymous callers share one report for a second: poll until it says so.
            body: dict[str, Any] = (await client.get(f"{API}/health")).json()
            return body if body["status"] == "degraded" else None

        body = await eventually(redis_down)
        assert body == {
            "status": "degraded",
            "checks": {
                "database": {"status": "healthy"},
                "redis": {"status": "unhealthy"},
                "kafka": {"status": "disabled"},
                "mail": {"status": "disabled"},
            },
        }
        single = await client.get(f"{API}/health/redis")
        assert single.status_code == 503 and single.json() == {"status": "unhealthy"}

        # Operators see everything: with the configured token, or as an administrator.
        detailed = (await client.get(f"{API}/health", headers=OPERATOR)).json()
        assert detailed["version"] and "error" in detailed["checks"]["redis"]
        assert "pending" in str(detailed["checks"]["kafka"]["details"])
        admin = await _admin_headers(app, client)
        assert "error" in (await client.get(f"{API}/health/redis", headers=admin)).json()
        # Anyone else is anonymous: a user's token, a wrong token, garbage.
        user_auth = bearer(await login(client, user["email"]))
        for headers in (user_auth, bearer("wrong"), {"Authorization": "Basic Zm9vOmJhcg=="}):
            assert (await client.get(f"{API}/health/redis", headers=headers)).json() == {
                "status": "unhealthy"
            }


async def _admin_headers(app: FastAPI, client: httpx.AsyncClient) -> dict[str, str]:
    admin = await register(client)
    async with app_services(app).sessionmaker() as db:
        row = await db.get(User, uuid.UUID(admin["id"]))
        assert row is not None
        row.role = "admin"
        await db.commit()
    return bearer(await login(client, admin["email"]))


# --- one spelling of an address -------------------------------------------------------------------


async def test_every_path_uses_one_normal_form_of_the_address(app: tuple[FastAPI, Any]) -> None:
    fastapi_app, client = app
    local = f"zo\u00eb.{uuid.uuid4().hex[:8]}"  # precomposed e with diaeresis
    user = await register(client, email=f"{local}@Example.COM")
    decomposed = f"{local.replace(chr(0xEB), 'e' + chr(0x308)).upper()}@example.com"
    assert decomposed != user["email"]

    assert (await password_grant(client, decomposed)).status_code == 200
    duplicate = await client.post(REGISTER_URL, json={"email": decomposed, "password": PASSWORD})
    assert_problem(duplicate, 409)
    await client.post(RESET_URL, json={"email": decomposed})
    assert len(await outbox(fastapi_app, user["id"], RESET_REQUESTED)) == 1


@pytest.mark.parametrize(
    "address",
    [
        "p\u0430ypal@example.com",  # Cyrillic a among Latin letters
        "\uff41dmin@example.com",  # full-width a
        "admin@ex\u0430mple.com",  # mixed scripts in the domain
        "ceo@\u0430\u0440\u0440\u04cf\u0435.com",  # all Cyrillic, reads "apple"
        "\u0440\u0430\u0443\u0440\u0430\u04cf@example.com",  # all Cyrillic, reads "paypal"
    ],
)
async def test_look_alike_addresses_are_refused(
    make_settings: Callable[..., Settings], address: str
) -> None:
    async with running_app(make_settings()) as (_, client):
        refused = await client.post(REGISTER_URL, json={"email": address, "password": PASSWORD})
        assert "not accepted" in assert_problem(refused, 422)["detail"]
    async with running_app(make_settings(EMAIL_REFUSE_CONFUSABLE=False)) as (_, client):
        response = await client.post(REGISTER_URL, json={"email": address, "password": PASSWORD})
        assert response.status_code in (201, 409), response.text


async def test_single_script_international_addresses_are_welcome(
    app: tuple[FastAPI, Any],
) -> None:
    _, client = app
    tag = str(uuid.uuid4().int)[:8]  # digits belong to every script
    for address in (
        f"\u043f\u043e\u0447\u0442\u0430{tag}@example.com",
        f"\u7530\u4e2d{tag}@example.jp",
    ):
        await register(client, email=address)


async def test_a_wrong_password_costs_what_an_unknown_account_costs(
    make_settings: Callable[..., Settings],
) -> None:
    """Before the answer, both run the same statements (the lookup); the failure event of the
    existing account is written after it, so no write gives the account away."""
    async with running_app(make_settings()) as (app, client):
        known = await register(client)
        seen: dict[str, _ResponseWatch] = {}
        for name, email in (("known", known["email"]), ("unknown", unique_email("nobody"))):
            watch = seen[name] = _ResponseWatch(app)
            transport = httpx.ASGITransport(app=watch)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as watched:
                with watch.listening():
                    response = await password_grant(watched, email, "not the password")
            assert_oauth_error(response, "invalid_grant")
        assert seen["known"].before == seen["unknown"].before
        assert "INSERT" not in seen["known"].before
        assert "INSERT" in seen["known"].after and seen["unknown"].after == []
        assert len(await outbox(app, known["id"], "user.login_failed")) == 1


async def test_a_browser_that_signed_in_before_is_known_wherever_it_goes(
    make_settings: Callable[..., Settings],
) -> None:
    """The hosted pages leave a sealed known-device note: the owner's browser is not slowed by
    failures elsewhere even from an address it never used; another browser there is."""
    async with running_app(make_settings(**ACCOUNT_UNDER_ATTACK)) as (app, client):
        user = await register(client)

        async def sign_in(browser: httpx.AsyncClient) -> httpx.Response:
            page = await browser.get("/account/signin")
            fields = form_posting_to(page.text, "/account/signin")
            fields.update(email=user["email"], password=PASSWORD)
            return await browser.post("/account/signin", data=fields)

        async with client_from(app) as laptop:
            assert (await sign_in(laptop)).status_code == 303
            note = laptop.cookies.get("ums_device")
            assert note and user["id"] not in note  # sealed: it names nobody readably
        await _push_past_the_account_threshold(app, user["email"], 3)
        async with client_from(app) as stranger:
            assert (await sign_in(stranger)).status_code == 429
        # A note is no key: forged, it counts for nothing.
        async with client_from(app) as forger:
            forger.cookies.set("ums_device", note[:-6] + "AAAAAA")
            assert (await sign_in(forger)).status_code == 429
        async with client_from(app) as travelling:
            travelling.cookies.set("ums_device", note)
            assert (await sign_in(travelling)).status_code == 303
