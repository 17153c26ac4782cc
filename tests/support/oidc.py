"""Helpers for OpenID Connect tests: clients, PKCE, the hosted sign-in form, live servers."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import secrets
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import uvicorn
from starlette.types import ASGIApp

from tests.support.servers import free_port, wait_for_port

REDIRECT_URI = "https://app.example.com/callback"


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge), RFC 7636 appendix B."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


async def create_client(
    client: httpx.AsyncClient, admin: dict[str, str], **fields: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "Test app",
        "client_type": "confidential",
        "redirect_uris": [REDIRECT_URI],
        "grant_types": ["authorization_code", "refresh_token"],
        "scopes": ["openid", "profile", "email", "offline_access"],
        "first_party": True,
    }
    body.update(fields)
    response = await client.post("/api/v1/clients", json=body, headers=admin)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def authorize_query(client_id: str, challenge: str, **extra: str) -> str:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid profile email",
        "state": "state-" + secrets.token_hex(4),
        "nonce": "nonce-" + secrets.token_hex(4),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(extra)
    return urlencode({k: v for k, v in params.items() if v != ""})


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.forms.append({"action": values.get("action", ""), "fields": {}})
        elif tag in ("input", "button") and self.forms and values.get("name"):
            if values.get("type") in ("hidden", None) or tag == "input":
                self.forms[-1]["fields"].setdefault(values["name"], values.get("value", ""))


def forms_of(html: str) -> list[dict[str, Any]]:
    parser = _Forms()
    parser.feed(html)
    return parser.forms


def form_posting_to(html: str, action: str) -> dict[str, str]:
    """The fields (hidden ones with their values) of the form that posts to ``action``."""
    for form in forms_of(html):
        if form["action"] == action:
            fields: dict[str, str] = form["fields"]
            return fields
    raise AssertionError(f"no form posting to {action} in:\n{html[:2000]}")


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def sign_in(
    client: httpx.AsyncClient, query: str, email: str, password: str
) -> httpx.Response:
    """Follow the hosted pages like a browser: authorize, then the sign-in form. Returns the
    answer to the form (a redirect to the application, or the consent page)."""
    page = await client.get(f"/oauth2/authorize?{query}")
    assert page.status_code == 200, page.text
    fields = form_posting_to(page.text, "/account/signin")
    fields.update(email=email, password=password)
    return await client.post("/account/signin", data=fields)


async def allow(client: httpx.AsyncClient, consent_page: httpx.Response) -> httpx.Response:
    fields = form_posting_to(consent_page.text, "/oauth2/consent")
    fields["decision"] = "allow"
    return await client.post("/oauth2/consent", data=fields)


async def code_flow(
    client: httpx.AsyncClient, client_id: str, email: str, password: str, **extra: str
) -> tuple[str, str, dict[str, str]]:
    """(code, verifier, authorization response parameters) for a first-party client."""
    verifier, challenge = pkce_pair()
    query = authorize_query(client_id, challenge, **extra)
    page = await client.get(f"/oauth2/authorize?{query}")
    if page.status_code == 302:  # signed in already: straight back with a code
        params = query_of(page.headers["location"])
        return params["code"], verifier, params
    assert page.status_code == 200, page.text
    fields = form_posting_to(page.text, "/account/signin")
    fields.update(email=email, password=password)
    answer = await client.post("/account/signin", data=fields)
    assert answer.status_code == 303, answer.text
    params = query_of(answer.headers["location"])
    return params["code"], verifier, params


async def exchange(
    client: httpx.AsyncClient,
    code: str,
    verifier: str | None,
    client_id: str,
    secret: str | None = None,
    redirect_uri: str = REDIRECT_URI,
) -> httpx.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
    if verifier is not None:
        data["code_verifier"] = verifier
    auth = (client_id, secret) if secret else None
    if secret is None:
        data["client_id"] = client_id
    return await client.post("/oauth2/token", data=data, auth=auth)


def strip_cookies(client: httpx.AsyncClient) -> None:
    client.cookies.clear()


@contextlib.contextmanager
def live_server(app: ASGIApp, port: int | None = None) -> Iterator[str]:
    """An ASGI app on a real uvicorn socket, in a thread of this process."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        wait_for_port(port, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
