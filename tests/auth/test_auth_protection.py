"""Brute-force limits, working without Redis, secrets kept out of logs, and request size limits."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from src.app.container import app_services
from src.config.logging import make_formatter
from src.config.settings import Settings
from src.services.connections import connections_of
from tests.support.app import (
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
    ME_URL,
    REGISTER_URL,
    SESSIONS_URL,
    TOKEN_URL,
    assert_oauth_error,
    assert_problem,
    assert_unauthenticated,
    client_from,
    fresh_ip,
    one_time_token,
    password_grant,
    refresh_grant,
    user_row,
)
from tests.support.servers import RedisServer

LOCKOUT = {"LOCKOUT_FAILURE_THRESHOLD": 3, "LOCKOUT_WAIT_INCREMENT_SECONDS": 2}


async def _lock_out(client: httpx.AsyncClient, email: str) -> int:
    """Fail the threshold's worth of logins; then even the right password gets 429. Returns the
    Retry-After it announced."""
    for _ in range(3):
        assert_oauth_error(await password_grant(client, email, "a wrong password"), "invalid_grant")
    locked = await password_grant(client, email, PASSWORD)
    body = assert_problem(locked, 429)
    retry_after = int(locked.headers["retry-after"])
    assert 1 <= retry_after <= 2
    assert body["retry_after"] == retry_after
    return retry_after


# --- brute force ----------------------------------------------------------------------------------


async def test_lockout_refuses_even_the_right_password_until_it_ends(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings(**LOCKOUT)) as (_, client):
        user = await register(client)
        other = await register(client)
        retry_after = await _lock_out(client, user["email"])
        # An unknown account locks the same way: the lock-out does not reveal which exist.
        await _lock_out(client, unique_email("nobody"))
        # Others are not affected.
        assert (await password_grant(client, other["email"])).status_code == 200

        # Refused attempts are not counted, so polling waits the lock-out out.
        async def signed_in() -> bool:
            return (await password_grant(client, user["email"])).status_code == 200

        await eventually(signed_in, timeout=retry_after + 10, interval=0.3)


async def test_guessing_the_current_password_locks_out_like_login(
    make_settings: Callable[..., Settings],
) -> None:
    """A stolen access token must not allow unlimited guesses at the current password."""
    async with running_app(make_settings(**LOCKOUT)) as (_, client):
        user = await register(client)
        headers = bearer(await login(client, user["email"]))
        url = f"{API}/users/me/password"
        for _ in range(3):
            wrong = {"current_password": "a wrong guess", "new_password": "a brand new secret"}
            assert_problem(await client.post(url, json=wrong, headers=headers), 400)
        right = {"current_password": PASSWORD, "new_password": "a brand new secret"}
        locked = await client.post(url, json=right, headers=headers)
        assert_problem(locked, 429)
        assert 1 <= int(locked.headers["retry-after"]) <= 2

        # Nothing changed: the old password is still the password (once the lock-out ends).
        async def old_password_works() -> bool:
            return (await password_grant(client, user["email"], PASSWORD)).status_code == 200

        await eventually(old_password_works, timeout=int(locked.headers["retry-after"]) + 10)


async def test_per_ip_limit(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(LOGIN_RATE_LIMIT_PER_IP=3)
    async with running_app(settings) as (app, client):
        user = await register(client)
        async with client_from(app, fresh_ip()) as attacker, client_from(app, fresh_ip()) as owner:
            for _ in range(3):
                response = await password_grant(attacker, unique_email("guess"), "guess")
                assert_oauth_error(response, "invalid_grant")
            refused = await password_grant(attacker, user["email"], PASSWORD)
            assert_problem(refused, 429)
            assert 1 <= int(refused.headers["retry-after"]) <= 60
            # The account itself is fine from anywhere else.
            assert (await password_grant(owner, user["email"])).status_code == 200


async def test_limits_hold_when_redis_goes_down(
    make_settings: Callable[..., Settings], redis_process: RedisServer
) -> None:
    settings = make_settings(REDIS_PORT=redis_process.port, LOGIN_RATE_LIMIT_PER_IP=6, **LOCKOUT)
    async with running_app(settings) as (app, client):
        guard = app_services(app).security.guard
        user = await register(client)
        other = await register(client)
        assert (await password_grant(client, user["email"])).status_code == 200
        assert not guard.degraded and guard.fallback_count == 0

        redis_process.stop()
        await _lock_out(client, user["email"])
        assert guard.degraded and guard.fallback_count > 0
        # Login otherwise works.
        assert (await password_grant(client, other["email"])).status_code == 200

        async with client_from(app, fresh_ip()) as attacker:
            for _ in range(6):
                response = await password_grant(attacker, unique_email("guess"), "guess")
                assert_oauth_error(response, "invalid_grant")
            assert_problem(await password_grant(attacker, other["email"]), 429)


# --- Redis down -----------------------------------------------------------------------------------


async def test_everything_works_with_redis_down_from_the_start(
    make_settings: Callable[..., Settings], redis_process: RedisServer
) -> None:
    redis_process.stop()
    async with running_app(make_settings(REDIS_PORT=redis_process.port)) as (app, client):
        assert not connections_of(app).redis_available
        user = await register(client)
        tokens = await login(client, user["email"])
        assert (await client.get(ME_URL, headers=bearer(tokens))).json()["id"] == user["id"]
        refreshed = await refresh_grant(client, tokens["refresh_token"])
        assert refreshed.status_code == 200, refreshed.text
        tokens = refreshed.json()
        assert len((await client.get(SESSIONS_URL, headers=bearer(tokens))).json()) == 1

        assert (await client.post(f"{API}/auth/logout", headers=bearer(tokens))).status_code == 204
        assert_unauthenticated(await client.get(ME_URL, headers=bearer(tokens)))
        assert_oauth_error(await refresh_grant(client, tokens["refresh_token"]), "invalid_grant")


async def test_logout_holds_when_redis_dies_with_the_session_cached(
    make_settings: Callable[..., Settings], redis_process: RedisServer
) -> None:
    async with running_app(make_settings(REDIS_PORT=redis_process.port)) as (app, client):
        assert connections_of(app).redis_available
        user = await register(client)
        tokens = await login(client, user["email"])
        assert (await client.get(ME_URL, headers=bearer(tokens))).status_code == 200

        redis_process.stop()
        assert (await client.post(f"{API}/auth/logout", headers=bearer(tokens))).status_code == 204
        assert_unauthenticated(await client.get(ME_URL, headers=bearer(tokens)))

        redis_process.start()
        await eventually(lambda: connections_of(app).redis_available, timeout=10)
        assert_unauthenticated(await client.get(ME_URL, headers=bearer(tokens)))
        again = await login(client, user["email"])
        assert (await client.get(ME_URL, headers=bearer(again))).status_code == 200


# --- secrets never logged nor echoed --------------------------------------------------------------


def _slices(secret: str, size: int = 16) -> set[str]:
    if len(secret) <= size:
        return {secret}
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


async def test_no_secret_reaches_a_log_line_or_an_error_body(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = {
        "password": PASSWORD,
        "wrong password": "wrong-password-for-the-log-test",
        "weak password": "Zq9#Lm2",
        "wrong current password": "not-the-current-password-at-all",
        "reset password": "password set through the reset link",
        "changed password": "password set through the change form",
    }
    errors: list[httpx.Response] = []

    async with running_app(make_settings(LOG_LEVEL="DEBUG")) as (app, client):

        async def call(expected: int, url: str, **kwargs: Any) -> dict[str, Any]:
            response = await client.post(url, **kwargs)
            assert response.status_code == expected, response.text
            if expected >= 400:
                errors.append(response)
            return response.json() if response.content else {}

        def keep_tokens(name: str, tokens: dict[str, Any]) -> dict[str, Any]:
            secrets[f"access token {name}"] = tokens["access_token"]
            secrets[f"refresh token {name}"] = tokens["refresh_token"]
            return tokens

        email = unique_email()
        user = await register(client, email)
        verification = await one_time_token(app, user["id"], "user.verification_requested")
        secrets["verification token"] = verification
        wrong_login = {
            "grant_type": "password",
            "username": email,
            "password": secrets["wrong password"],
        }
        await call(400, TOKEN_URL, data=wrong_login)
        first = keep_tokens("1", await login(client, email))
        refresh = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
        second = keep_tokens("2", await call(200, TOKEN_URL, data=refresh))
        await call(400, TOKEN_URL, data=refresh)  # reuse
        tampered = second["access_token"][:-4] + "AAAA"
        response = await client.get(ME_URL, headers=bearer(tampered))
        assert_unauthenticated(response)
        errors.append(response)

        third = keep_tokens("3", await login(client, email))
        change_url = f"{API}/users/me/password"
        weak = {"current_password": PASSWORD, "new_password": secrets["weak password"]}
        await call(422, change_url, json=weak, headers=bearer(third))
        wrong = {"current_password": secrets["wrong current password"], "new_password": "whatever1"}
        await call(400, change_url, json=wrong, headers=bearer(third))

        await call(202, f"{API}/auth/password-reset/request", json={"email": email})
        reset = await one_time_token(app, user["id"], "user.password_reset_requested")
        secrets["reset token"] = reset
        confirm = {"token": reset, "new_password": secrets["reset password"]}
        await call(204, f"{API}/auth/password-reset/confirm", json=confirm)
        await call(400, f"{API}/auth/password-reset/confirm", json=confirm)

        fourth = keep_tokens("4", await login(client, email, secrets["reset password"]))
        change = {
            "current_password": secrets["reset password"],
            "new_password": secrets["changed password"],
        }
        await call(204, change_url, json=change, headers=bearer(fourth))
        await call(200, f"{API}/auth/verify-email/confirm", json={"token": verification})
        await call(400, f"{API}/auth/verify-email/confirm", json={"token": verification})
        await call(204, f"{API}/auth/logout", headers=bearer(fourth))

        row = await user_row(app, email)
        assert row is not None
        secrets["password hash"] = row.password_hash

    assert len(caplog.records) > 20, "the flow should have logged (is DEBUG capture working?)"
    # Formatted as the service writes them too: an audit line's fields are not in its message.
    as_written = make_formatter("text")
    messages = [record.getMessage() for record in caplog.records] + [caplog.text]
    messages += [as_written.format(record) for record in caplog.records]
    for name, secret in secrets.items():
        windows = _slices(secret)
        leaks = [m for m in messages if any(w in m for w in windows)]
        assert not leaks, f"{name} (or a part of it) was logged: {leaks[0][:300]!r}"
    assert not [m for m in messages if "$argon2" in m]

    assert len(errors) == 7
    for response in errors:
        for name, secret in secrets.items():
            assert not any(w in response.text for w in _slices(secret)), (name, response.text)
        assert "argon2" not in response.text


# --- request size ---------------------------------------------------------------------------------


async def test_oversized_bodies_get_413(make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings(MAX_REQUEST_BODY_BYTES=1024)) as (app, client):
        email = unique_email()
        big = await client.post(REGISTER_URL, json={"email": email, "password": "p" * 2000})
        assert "1024 bytes" in assert_problem(big, 413)["detail"]
        assert await user_row(app, email) is None

        form = {"grant_type": "password", "username": email, "password": "p" * 2000}
        assert_problem(await client.post(TOKEN_URL, data=form), 413)

        # Within the limit all is well.
        assert (
            await client.post(REGISTER_URL, json={"email": email, "password": PASSWORD})
        ).status_code == 201


def _chunked(payload: bytes, size: int = 256) -> Callable[[], AsyncIterator[bytes]]:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), size):
            yield payload[start : start + size]

    return chunks


async def test_oversized_streamed_bodies_get_413(make_settings: Callable[..., Settings]) -> None:
    """No Content-Length: the limit must hold while the body streams in."""
    async with running_app(make_settings(MAX_REQUEST_BODY_BYTES=1024)) as (app, client):
        email = unique_email()
        json_headers = {"Content-Type": "application/json"}
        big = json.dumps({"email": email, "password": "p" * 2000}).encode()
        response = await client.post(REGISTER_URL, content=_chunked(big)(), headers=json_headers)
        assert "content-length" not in response.request.headers
        assert_problem(response, 413)
        assert await user_row(app, email) is None

        form = f"grant_type=password&username={email}&password={'p' * 2000}".encode()
        form_headers = {"Content-Type": "application/x-www-form-urlencoded"}
        response = await client.post(TOKEN_URL, content=_chunked(form)(), headers=form_headers)
        assert_problem(response, 413)

        small = json.dumps({"email": email, "password": PASSWORD}).encode()
        response = await client.post(
            REGISTER_URL, content=_chunked(small, 16)(), headers=json_headers
        )
        assert response.status_code == 201, response.text
