"""What every request and response goes through: client addresses behind proxies, header size,
security headers, CORS.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from src.api.client_address import client_ip
from src.config.settings import Settings
from tests.support.app import PASSWORD, bearer, login, register, running_app
from tests.support.auth import QUICK_SETTINGS, assert_problem

API = "/api/v1"
PROXY = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**QUICK_SETTINGS, **overrides})

    return factory


# --- the client's address (pure logic) ------------------------------------------------------------


XFF, FORWARDED = "X-Forwarded-For", "Forwarded"


@pytest.mark.parametrize(
    ("peer", "header", "lines", "expected"),
    [
        # No trusted proxy in front: the peer, whatever the headers claim.
        ("192.0.2.1", XFF, ["6.6.6.6"], "192.0.2.1"),
        ("192.0.2.1", FORWARDED, ["for=6.6.6.6"], "192.0.2.1"),
        # Our proxy: the address it saw, read from the right.
        ("10.0.0.5", XFF, ["6.6.6.6, 198.51.100.7"], "198.51.100.7"),
        ("10.0.0.5", XFF, ["198.51.100.7, 10.0.0.9"], "198.51.100.7"),
        # A client's own line, and the line the proxy added after it: one list, from the right.
        ("10.0.0.5", XFF, ["203.0.113.99", "198.51.100.50"], "198.51.100.50"),
        (
            "10.0.0.5",
            FORWARDED,
            ['for=198.51.100.7;proto=https, for="[2001:db8::2]:4711"'],
            "198.51.100.7",
        ),
        ("10.0.0.5", FORWARDED, ['for="[2001:db9::7]:4711"'], "2001:db9::7"),
        ("10.0.0.5", XFF, ["198.51.100.7:5555"], "198.51.100.7"),
        ("10.0.0.5", XFF, ["::ffff:198.51.100.7"], "198.51.100.7"),
        # Text that is no address never becomes "the client": the last trusted hop stands in.
        ("10.0.0.5", XFF, ["<script>"], "10.0.0.5"),
        ("10.0.0.5", XFF, ["x" * 10_000], "10.0.0.5"),
        ("10.0.0.5", XFF, ["198.51.100.7, unknown"], "10.0.0.5"),
        ("10.0.0.5", XFF, [""], "10.0.0.5"),
        ("10.0.0.5", XFF, [], "10.0.0.5"),
        ("10.0.0.5", XFF, ["fe80::1%" + "a" * 10_000], "10.0.0.5"),  # a zone is free text
        ("10.0.0.5", FORWARDED, ['for="[fe80::1%eth0 user=x]:443"'], "10.0.0.5"),
        # Only proxies all the way: the leftmost of them.
        ("10.0.0.5", XFF, ["10.1.1.1, 10.2.2.2"], "10.1.1.1"),
        (None, XFF, ["6.6.6.6"], "unknown"),
        ("not-an-ip", XFF, [], "unknown"),
    ],
)
def test_client_address(peer: str | None, header: str, lines: list[str], expected: str) -> None:
    assert client_ip(peer, lines, header, PROXY) == expected


# --- the client's address (through the API) -------------------------------------------------------


async def _session_ip(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    user = await register(client)
    response = await client.post(
        f"{API}/auth/login",
        data={
            "grant_type": "password",
            "username": user["email"],
            "password": PASSWORD,
        },
        headers=headers,
    )
    assert response.status_code == 200, response.text
    [session] = (
        await client.get(f"{API}/users/me/sessions", headers=bearer(response.json()))
    ).json()
    address: str = session["ip_address"]
    return address


async def test_forwarded_headers_count_only_from_trusted_proxies(
    make_settings: Callable[..., Settings],
) -> None:
    spoofed = {"X-Forwarded-For": "6.6.6.6"}
    async with running_app(make_settings()) as (_, client):
        assert await _session_ip(client, spoofed) == "127.0.0.1"
    async with running_app(make_settings(TRUSTED_PROXIES="127.0.0.1/32")) as (_, client):
        assert await _session_ip(client, spoofed) == "6.6.6.6"
        # A forged or broken header is never stored; a huge one still signs in.
        assert await _session_ip(client, {"X-Forwarded-For": "x" * 10_000}) == "127.0.0.1"
        # The header the proxy does not write is the client's own: ignored.
        assert await _session_ip(client, {"Forwarded": "for=6.6.6.6"}) == "127.0.0.1"
    settings = make_settings(TRUSTED_PROXIES="127.0.0.1/32", FORWARDED_HEADER="Forwarded")
    async with running_app(settings) as (_, client):
        both = {"Forwarded": "for=198.51.100.9", "X-Forwarded-For": "203.0.113.66"}
        assert await _session_ip(client, both) == "198.51.100.9"


# --- size of the headers --------------------------------------------------------------------------


async def test_oversized_headers_get_431_before_any_work(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings(MAX_REQUEST_HEADER_BYTES=4096)) as (_, client):
        user = await register(client)
        auth = bearer(await login(client, user["email"]))
        huge = {"Authorization": "Bearer " + "a" * 100_000}
        body = assert_problem(await client.get(f"{API}/users/me", headers=huge), 431)
        assert "4096 bytes" in body["detail"]
        padded = {**auth, "X-Padding": "p" * 5000}
        assert_problem(await client.get(f"{API}/users/me", headers=padded), 431)
        assert (await client.get(f"{API}/users/me", headers=auth)).status_code == 200


# --- security headers -----------------------------------------------------------------------------

EXPECTED = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
}


async def test_every_answer_carries_the_security_headers(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings()) as (_, client):
        user = await register(client)
        auth = bearer(await login(client, user["email"]))
        answers = [
            await client.get(f"{API}/users/me", headers=auth),
            await client.get(f"{API}/users/me"),  # 401
            await client.get(f"{API}/nowhere"),  # 404
            await client.post(f"{API}/auth/register", content=b"\x00"),  # refused by the guard
            await client.get(f"{API}/health/live"),
        ]
        for answer in answers:
            for name, value in EXPECTED.items():
                assert answer.headers.get(name) == value, (answer.request.url, name)
            assert answer.headers["cache-control"] == "no-store", answer.request.url
            assert "strict-transport-security" not in answer.headers
        # A route that sets its own caching keeps it.
        jwks = await client.get("/.well-known/jwks.json")
        assert jwks.headers["cache-control"].startswith("public")
        assert jwks.headers["x-content-type-options"] == "nosniff"


async def test_hsts_when_served_over_https(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(PUBLIC_BASE_URL="https://accounts.example.com")
    async with running_app(settings) as (_, client):
        answer = await client.get(f"{API}/health/live")
        assert answer.headers["strict-transport-security"].startswith("max-age=")


# --- CORS -----------------------------------------------------------------------------------------


async def _preflight(client: httpx.AsyncClient, origin: str) -> httpx.Response:
    return await client.options(
        f"{API}/users/me",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )


async def test_cors_is_off_by_default(make_settings: Callable[..., Settings]) -> None:
    async with running_app(make_settings()) as (_, client):
        preflight = await _preflight(client, "https://app.example.com")
        assert "access-control-allow-origin" not in preflight.headers
        simple = await client.get(f"{API}/health/live", headers={"Origin": "https://x.example"})
        assert "access-control-allow-origin" not in simple.headers


async def test_cors_allows_exactly_the_configured_origins(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        CORS_ALLOW_ORIGINS="https://app.example.com, https://admin.example.com"
    )
    async with running_app(settings) as (_, client):
        allowed = await _preflight(client, "https://app.example.com")
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        for origin in ("https://evil.example.com", "https://app.example.com.evil.test", "null"):
            refused = await _preflight(client, origin)
            assert "access-control-allow-origin" not in refused.headers, origin


def test_cors_origins_must_be_exact() -> None:
    for value in ("*", "https://*.example.com", "app.example.com", "https://app.example.com/path"):
        with pytest.raises(ValueError, match="exact origin"):
            Settings(_env_file=None, CORS_ALLOW_ORIGINS=value)
    with pytest.raises(ValueError, match="not an IP address"):
        Settings(_env_file=None, TRUSTED_PROXIES="proxy.internal")


# --- the unexpected -------------------------------------------------------------------------------


async def test_an_unexpected_error_is_one_500_with_the_headers_and_one_log_record(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_app(make_settings()) as (app, client):

        async def broken() -> None:
            raise RuntimeError("a bug with a secret-looking message: s3cr3t")

        app.add_api_route("/boom", broken)
        answer = await client.get("/boom")
        body = assert_problem(answer, 500)
        assert "s3cr3t" not in answer.text and "Traceback" not in answer.text
        assert body == {"type": "about:blank", "title": "Internal Server Error", "status": 500,
                        "instance": "/boom"}  # fmt: skip
        for name, value in EXPECTED.items():
            assert answer.headers.get(name) == value, name
        assert (await client.get(f"{API}/health/live")).status_code == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


async def test_two_content_types_are_refused(make_settings: Callable[..., Settings]) -> None:
    """Parsers disagree on which one counts; a NUL must not hide behind the difference."""
    body = b'{"email": "a@example.com", "password": "long enough", "full_name": "x\\u0000y"}'
    async with running_app(make_settings()) as (_, client):
        for headers in (
            [("Content-Type", "application/json"), ("Content-Type", "text/plain")],
            [("Content-Type", "text/plain"), ("Content-Type", "application/json")],
        ):
            answer = await client.post(f"{API}/auth/register", content=body, headers=headers)
            assert_problem(answer, 400)
        # No Content-Type at all: FastAPI reads JSON, so the guard looks for NUL as JSON too.
        answer = await client.post(f"{API}/auth/register", content=body)
        assert "NUL" in assert_problem(answer, 400)["detail"]
